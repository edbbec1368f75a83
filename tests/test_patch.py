"""patch_model on tiny random models of every supported family, against the stock model."""

import copy
import importlib
import logging

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import hf_fused
from hf_fused.patches import SPECS, FamilySpec
from hf_fused.patches.fused import (
    DeferredOProj,
    FusedMLP,
    FusedRMSNormGateUp,
    FusedRMSNormQKV,
    PackedPassThrough,
    PassThroughNorm,
    ResidualFusedLayer,
    StreamingLinear,
    feed_fused_qkv,
)

BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,  # GQA
    head_dim=16,
    vocab_size=96,
    max_position_embeddings=256,
    initializer_range=0.1,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
MULTIPLIERS = dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3, logits_scaling=2.0)
# Per family, what makes its attention differ; sliding windows are shorter than the prompts + new tokens.
EXTRA = {
    "llama": dict(),
    "mistral": dict(sliding_window=8),
    "mixtral": dict(sliding_window=8, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=32),
    "qwen3": dict(),
    "qwen3_moe": dict(MOE),
    "gemma": dict(attention_bias=True),
    "gemma2": dict(sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=3.0, query_pre_attn_scalar=8),
    "gemma3_text": dict(sliding_window=8, query_pre_attn_scalar=8, layer_types=["sliding_attention", "full_attention"]),
    "phi3": dict(partial_rotary_factor=0.5, sliding_window=8),
    "granite": dict(attention_bias=True, **MULTIPLIERS),
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2, **MULTIPLIERS),
    "smollm3": dict(no_rope_layer_interval=2),  # layer 1 is NoPE
}
FAMILIES = sorted(SPECS)
EAGER_ONLY = {"gemma2"}  # transformers has no sdpa path with its logit softcapping
LOW_PRECISION_ATOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}
MLP = ("qkv", "mlp")
ALL = ("qkv", "mlp", "gemv")
RESIDUAL = (*ALL, "residual")
FUSES = [("qkv",), MLP, ALL, RESIDUAL]
# Their MLPs are mixtures of experts: patch_model(fuse=MLP) leaves them as they are, so the
# slow end-to-end tests run them with the QKV fusion only.
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "granitemoe"}


def param_id(value) -> str:
    return "+".join(value) if isinstance(value, tuple) else str(value)


def test_every_supported_family_is_tested():
    assert set(EXTRA) == set(SPECS)


def build(family: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    attn = "eager" if family in EAGER_ONLY else attn
    torch.manual_seed(seed)
    config = AutoConfig.for_model(family, **BASE, **EXTRA[family])
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    with torch.no_grad():
        # Gemma norms start at zero and Llama's at one: perturb them all so the norm weight matters.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def prompt(batch: int = 2, length: int = 10, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids left-padded on row 0, and their attention mask."""
    ids = torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :pad], mask[0, :pad] = BASE["pad_token_id"], 0
    return ids, mask


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def storage_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def snapshot(model: nn.Module) -> tuple:
    modules = [(name, id(m), type(m)) for name, m in model.named_modules()]
    forwards = [name for name, m in model.named_modules() if "forward" in m.__dict__]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return modules, forwards, state


def assert_same_snapshot(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[1] == b[1]
    assert list(a[2]) == list(b[2])
    assert all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# The MLP fusion is independent of the attention implementation: its cases run one each.
@pytest.mark.parametrize(
    "family, attn, fuse",
    [(f, a, ("qkv",)) for f in FAMILIES for a in ("eager", "sdpa") if a == "eager" or f not in EAGER_ONLY]
    + [(f, "eager" if f in EAGER_ONLY else "sdpa", fuse) for f in FAMILIES if f not in MOE for fuse in (MLP, ALL)],
    ids=param_id,
)
def test_logits_match(family, attn, fuse):
    stock = build(family, attn)
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    assert hf_fused.is_patched(model) and not hf_fused.is_patched(stock)
    ids, mask = prompt()
    ref32 = logits(stock, ids, mask)
    torch.testing.assert_close(logits(model, ids, mask), ref32, rtol=1e-5, atol=1e-5)
    if attn == "eager" and family not in EAGER_ONLY:
        return  # low precision once per family and fusion: each kernel launch is slow in Triton's interpreter
    # Casting after patching must carry the fused weights along. The fused model may err at
    # most twice as much as the stock model in the same precision, against fp32.
    for dtype, atol in LOW_PRECISION_ATOL.items():
        stock_err = (logits(stock.to(dtype), ids, mask) - ref32).abs().max()
        fused_err = (logits(model.to(dtype), ids, mask) - ref32).abs().max()
        assert fused_err <= 2 * stock_err + atol, (dtype, fused_err, stock_err)


@pytest.mark.parametrize(
    "family, fuse", [(f, fuse) for f in FAMILIES for fuse in FUSES if f not in MOE or "mlp" not in fuse], ids=param_id
)
def test_greedy_generate_matches(family, fuse):
    stock = build(family)
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    ids, mask = prompt()
    kwargs = dict(attention_mask=mask, max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0)
    # Left padding with a mask, dynamic cache, then the static cache.
    for extra in ({}, {"cache_implementation": "static"}):
        with torch.no_grad():
            want = stock.generate(ids, **kwargs, **extra)
            got = model.generate(ids, **kwargs, **extra)
        assert want.shape[1] == ids.shape[1] + 16
        assert torch.equal(got, want), extra


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_unpatch_restores_exactly(family, fuse):
    model = build(family)
    ids, mask = prompt()
    before, want = snapshot(model), logits(model, ids, mask)
    params = [(name, id(p)) for name, p in model.named_parameters()]
    hf_fused.unpatch_model(hf_fused.patch_model(model, fuse=fuse))
    assert not hf_fused.is_patched(model)
    assert_same_snapshot(snapshot(model), before)
    assert [(name, id(p)) for name, p in model.named_parameters()] == params
    assert torch.equal(logits(model, ids, mask), want)
    # A cast while patched reaches the restored projections too.
    hf_fused.patch_model(model, fuse=fuse).to(torch.bfloat16)
    hf_fused.unpatch_model(model)
    state = model.state_dict()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, before[2][k].to(v.dtype)) for k, v in state.items())


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_keeps_keys_and_loads_both_ways(family, fuse):
    stock = build(family)
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    want, got = stock.state_dict(), model.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # A standard state_dict loads into the patched model, and the patched one into a stock model.
    other = hf_fused.patch_model(build(family, seed=1), fuse=fuse)
    other.load_state_dict(want)
    ids, mask = prompt()
    torch.testing.assert_close(logits(other, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)
    plain = build(family, seed=2)
    plain.load_state_dict(got)
    assert torch.equal(logits(plain, ids, mask), logits(stock, ids, mask))


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_into_plain_transformers(family, fuse, tmp_path):
    stock = build(family)
    hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse).save_pretrained(tmp_path)
    attn = stock.config._attn_implementation
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attn).eval()
    assert not hf_fused.is_patched(loaded)
    ids, mask = prompt()
    assert torch.equal(logits(loaded, ids, mask), logits(stock, ids, mask))


def fused_weight_ptrs(model: nn.Module) -> list[int]:
    fused = [m for m in model.modules() if isinstance(m, (FusedRMSNormQKV, FusedRMSNormGateUp))]
    return [m.operands()[1].data_ptr() for m in fused]


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_no_memory_growth(family, fuse):
    model = build(family)
    before = storage_bytes(model)
    hf_fused.patch_model(model, fuse=fuse)
    assert abs(storage_bytes(model) - before) <= 0.01 * before
    # verify_patch unpatches and repatches: the fused buffers are reused, not copied.
    ptrs = fused_weight_ptrs(model)
    assert hf_fused.verify_patch(model, prompt()[0]).ok
    assert fused_weight_ptrs(model) == ptrs
    assert abs(storage_bytes(model) - before) <= 0.01 * before
    hf_fused.unpatch_model(model)
    assert abs(storage_bytes(model) - before) <= 0.01 * before


@pytest.mark.parametrize("family", FAMILIES)
def test_mlp_fusion_takes_the_mlp_norm_and_skips_moe_layers(family, caplog):
    model = build(family)
    with caplog.at_level(logging.WARNING, logger="hf_fused"):
        hf_fused.patch_model(model, fuse=MLP)
    # Exactly these modules of a layer are stood in for; gemma2/3's post_attention_layernorm,
    # which normalizes the attention output, is not one of them. No module gets an instance
    # forward (torch.compile would check each in Python on every call): the attention is fed by
    # a pre-hook.
    spec = SPECS[family]
    want = {"input_layernorm": PassThroughNorm} | ({"self_attn.qkv_proj": PackedPassThrough} if spec.qkv == "packed" else {})
    if family not in MOE:
        want |= {"mlp": FusedMLP, spec.mlp_norm: PassThroughNorm}
    layer = model.model.layers[0]
    stand_ins = (PassThroughNorm, PackedPassThrough, FusedMLP)
    assert {name: type(m) for name, m in layer.named_modules() if isinstance(m, stand_ins)} == want
    assert not any("forward" in m.__dict__ for m in layer.modules())
    assert list(layer.self_attn._forward_pre_hooks.values()) == [feed_fused_qkv]
    n_fused = sum(isinstance(m, FusedRMSNormGateUp) for m in model.modules())
    warnings = [r.getMessage() for r in caplog.records]
    if family in MOE:
        assert n_fused == 0 and len(warnings) == 1 and "left as it is in 2 of 2" in warnings[0]
        with pytest.raises(hf_fused.UnsupportedModelError, match="nothing to fuse"):
            hf_fused.patch_model(build(family), fuse=("mlp",))
    else:
        assert n_fused == BASE["num_hidden_layers"] and not warnings


def test_mlp_alone_leaves_attention_stock():
    stock = build("llama")
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=("mlp",))
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert not any(isinstance(m, FusedRMSNormQKV) for m in model.modules())
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)
    assert hf_fused.verify_patch(model, ids).ok and hf_fused.is_patched(model)


def _mlp_bias(model):
    for layer in model.model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj):
            proj.bias = nn.Parameter(torch.randn(proj.out_features) * 0.1)


def _erf_gelu(model):
    for layer in model.model.layers:
        layer.mlp.act_fn = nn.GELU()


def _hooked_mlp(model):
    from accelerate.hooks import ModelHook, add_hook_to_module

    for layer in model.model.layers:
        add_hook_to_module(layer.mlp, ModelHook())


def _quantized_gate(model):
    model.model.layers[1].mlp.gate_proj = _quantized(model.model.layers[1].mlp.gate_proj)


@pytest.mark.parametrize(
    "mutate, reason, n_fused",
    [
        (_mlp_bias, "biases", 0),
        (_erf_gelu, "computes other than", 0),
        (_hooked_mlp, "instance forward", 0),
        (_quantized_gate, "QuantLinear", 1),
    ],
    ids=["bias", "erf-gelu", "hooked", "quantized-one-layer"],
)
def test_mlp_it_cannot_fuse_exactly_stays_stock(mutate, reason, n_fused, caplog):
    stock = build("llama")
    mutate(stock)
    model = copy.deepcopy(stock)
    with caplog.at_level(logging.WARNING, logger="hf_fused"):
        hf_fused.patch_model(model, fuse=MLP)
    assert sum(isinstance(m, FusedRMSNormGateUp) for m in model.modules()) == n_fused
    assert [reason in r.getMessage() for r in caplog.records] == [True]
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)


def test_gemv_alone_swaps_in_the_same_parameters():
    stock = build("llama")
    model = copy.deepcopy(stock)
    attn = model.model.layers[0].self_attn
    o_proj, weight = attn.o_proj, attn.o_proj.weight
    hf_fused.patch_model(model, fuse=("gemv",))
    assert isinstance(attn.o_proj, StreamingLinear) and attn.o_proj.weight is weight
    assert sum(isinstance(m, StreamingLinear) for m in model.modules()) == 2 * BASE["num_hidden_layers"]
    # Nothing else changed: no instance forwards, no fused norms.
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert list(model.state_dict()) == list(stock.state_dict())
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)
    hf_fused.unpatch_model(model)
    assert attn.o_proj is o_proj and o_proj.weight is weight


@pytest.mark.parametrize("family, fuse", [("llama", ALL), ("qwen2", ALL), ("phi3", ALL), ("gemma", ALL),
                                          ("llama", RESIDUAL), ("gemma", RESIDUAL)], ids=param_id)
def test_one_sequence_decode_streams(family, fuse, monkeypatch):
    """Batch-1 decode is where o_proj and down_proj take the streaming kernel (with the residual
    added in it, for fuse="residual") through its eager launch: called directly in eager code,
    and from the op's launch op in compiled code (compiled_launchable). Both ways generate what
    the stock model does, and neither takes the registered op's launch."""
    op_module = importlib.import_module("hf_fused.ops.streaming_linear")
    launched = {"op": 0, "eager": 0}

    def counted(path, fn):
        def call(*args, **kwargs):
            launched[path] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(op_module, "launch_stream", counted("op", op_module.launch_stream))
    monkeypatch.setattr(op_module, "_eager_stream", counted("eager", op_module._eager_stream))
    stock = build(family)
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    assert all(isinstance(layer, ResidualFusedLayer) == ("residual" in fuse) for layer in model.model.layers)
    ids = prompt(batch=1, pad=0)[0]
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0)
    for compiling in (False, True):
        # On CPU, torch.compile traces the op's reference path (the interpreter runs no kernel
        # on fake tensors), so the compiled dispatch is taken here by saying it is compiling.
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        launched.update(op=0, eager=0)
        for extra in ({}, {"cache_implementation": "static"}):
            with torch.no_grad():
                got, want = model.generate(ids, **kwargs, **extra), stock.generate(ids, **kwargs, **extra)
            assert torch.equal(got, want), (compiling, extra)
        # Five one-token steps a generate, two projections a layer; none in the prompt's forward.
        streams = 2 * 5 * 2 * BASE["num_hidden_layers"] if op_module.runs_triton(ids.float()) else 0
        assert launched == {"op": 0, "eager": streams}


def _hooked_o_proj(model):
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *args: None)


def _quantized_down(model):
    model.model.layers[1].mlp.down_proj = _quantized(model.model.layers[1].mlp.down_proj)


@pytest.mark.parametrize("family, mutate, reason, n_streamed", [
    ("llama", _hooked_o_proj, "self_attn.o_proj has hooks", 3),
    ("llama", _quantized_down, "mlp.down_proj is QuantLinear", 3),
    ("mixtral", None, "mlp.down_proj is missing", 2),
], ids=["hooked", "quantized", "moe"])
def test_gemv_leaves_what_it_cannot_stream(family, mutate, reason, n_streamed, caplog):
    stock = build(family)
    if mutate:
        mutate(stock)
    model = copy.deepcopy(stock)
    with caplog.at_level(logging.WARNING, logger="hf_fused"):
        hf_fused.patch_model(model, fuse=("gemv",))
    assert sum(isinstance(m, StreamingLinear) for m in model.modules()) == n_streamed
    assert [reason in r.getMessage() for r in caplog.records] == [True]
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fuse", ["mlp", (), ("qkv", "lm_head"), None, ("qkv", "gemv", "residual"), ("mlp", "rope")],
                         ids=repr)
def test_bad_fuse_is_a_value_error(fuse):
    model = build("llama")
    with pytest.raises(ValueError, match="fuse must"):
        hf_fused.patch_model(model, fuse=fuse)
    assert not hf_fused.is_patched(model)


def _hooked_layer_0_o_proj(model):
    model.model.layers[0].self_attn.o_proj.register_forward_hook(lambda *args: None)


@pytest.mark.parametrize("family, mutate, reason, n_fused", [
    ("llama", _hooked_layer_0_o_proj, "residual: the layer's o_proj or down_proj is not streamed", 1),
    ("granite", None, "GraniteDecoderLayer adds its residuals otherwise", 0),
    ("gemma2", None, "Gemma2DecoderLayer adds its residuals otherwise", 0),
    ("qwen3_moe", None, "residual: the layer's MLP is not fused", 0),
], ids=["hooked", "granite", "gemma2", "moe"])
def test_residual_fusion_leaves_layers_it_cannot_take(family, mutate, reason, n_fused, caplog):
    """A layer whose forward adds its residuals otherwise, or whose o_proj, down_proj or MLP
    the other fusions left as they are, keeps its class and its adds, logged."""
    stock = build(family)
    if mutate:
        mutate(stock)
    model = copy.deepcopy(stock)
    with caplog.at_level(logging.WARNING, logger="hf_fused"):
        hf_fused.patch_model(model, fuse=RESIDUAL)
    fused = [isinstance(layer, ResidualFusedLayer) for layer in model.model.layers]
    assert sum(fused) == n_fused
    assert any(reason in r.getMessage() for r in caplog.records)
    for layer, is_fused in zip(model.model.layers, fused):
        assert isinstance(layer.self_attn.o_proj, DeferredOProj) == is_fused
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)


def test_patching_again_with_other_fusions_needs_unpatch_first():
    model = hf_fused.patch_model(build("llama"), fuse=MLP)
    modules = [(name, id(m)) for name, m in model.named_modules()]
    hf_fused.patch_model(model, fuse=("mlp", "qkv"))  # the same fusions: a no-op
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    with pytest.raises(ValueError, match="unpatch_model"):
        hf_fused.patch_model(model, fuse=("qkv",))
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    hf_fused.patch_model(hf_fused.unpatch_model(model), fuse=("qkv",))
    assert not any(isinstance(m, FusedRMSNormGateUp) for m in model.modules())


def test_verify_patch_reports_and_leaves_model_patched():
    model = hf_fused.patch_model(build("qwen3"), verify=True)
    ids, mask = prompt()
    want = logits(model, ids, mask)
    model.train()
    report = hf_fused.verify_patch(model, ids, mask)
    assert report.ok and report.top1_agreement == 1.0 and report.rel_err < 1e-5 and report.max_abs_diff < 1e-4
    assert hf_fused.is_patched(model) and all(m.training for m in model.modules())
    assert torch.equal(logits(model.eval(), ids, mask), want)
    with pytest.raises(ValueError):
        hf_fused.verify_patch(build("llama"), ids)


@pytest.mark.parametrize("op", ["rmsnorm_qkv", "rmsnorm_gate_up"])
def test_verify_failure_unpatches_and_raises(op, monkeypatch):
    # A kernel off by 1%: verify must catch it and undo the patch.
    from hf_fused.patches import fused

    real = getattr(fused, op)
    monkeypatch.setattr(fused, op, lambda *args, **kwargs: 1.01 * real(*args, **kwargs))
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="disagrees"):
        hf_fused.patch_model(model, verify=True, fuse=MLP)
    assert not hf_fused.is_patched(model)
    assert_same_snapshot(snapshot(model), before)


def test_refuses_a_norm_that_computes_another_style(monkeypatch):
    monkeypatch.setitem(SPECS, "llama", FamilySpec(norm_style="gemma"))
    model = build("llama")
    before = snapshot(model)
    with pytest.raises(hf_fused.UnsupportedModelError, match="LlamaRMSNorm .* gemma-style"):
        hf_fused.patch_model(model)
    assert_same_snapshot(snapshot(model), before)


def test_multimodal_gemma3_patches_only_its_text_decoder():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = AutoConfig.for_model("gemma3_text", **BASE, **EXTRA["gemma3_text"]).to_dict()
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision.update(image_size=28, patch_size=14)  # 4 patches: mm_tokens_per_image
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=95)
    torch.manual_seed(0)
    stock = Gemma3ForConditionalGeneration(config).eval()
    model = hf_fused.patch_model(copy.deepcopy(stock))
    fused = [name for name, m in model.named_modules() if isinstance(m, FusedRMSNormQKV)]
    assert len(fused) == 2 and all("language_model" in name for name in fused)
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)
    assert list(model.state_dict()) == list(stock.state_dict())


def test_double_patch_is_a_noop_and_other_models_are_untouched():
    attention_class = type(build("llama").model.layers[0].self_attn)
    attention_class_forward = attention_class.forward
    model, other = build("llama"), build("llama")
    ids, mask = prompt()
    other_logits, other_before = logits(other, ids, mask), snapshot(other)
    hf_fused.patch_model(model)
    modules = [(name, id(m)) for name, m in model.named_modules()]
    hf_fused.patch_model(model)
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    # The patched instance may get a subclass (fuse="rope"); its class and the other model's are untouched.
    assert attention_class.forward is attention_class_forward
    assert type(other.model.layers[0].self_attn) is attention_class
    assert_same_snapshot(snapshot(other), other_before)
    assert torch.equal(logits(other, ids, mask), other_logits)


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", ["qwen2", "phi3"])
def test_copies_of_a_patched_model_are_patched_and_independent(family, fuse, tmp_path):
    stock = build(family)
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    torch.save(model, tmp_path / "model.pt")
    ids, mask = prompt()
    want = logits(model, ids, mask)
    for clone in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False)):
        assert hf_fused.is_patched(clone)
        with torch.no_grad():
            model.model.layers[0].input_layernorm.weight.mul_(2)
            model.model.layers[0].post_attention_layernorm.weight.mul_(2)
        assert torch.equal(logits(clone, ids, mask), want)
        hf_fused.unpatch_model(clone)
        assert torch.equal(logits(clone, ids, mask), logits(stock, ids, mask))
    assert hf_fused.is_patched(model)


def test_wraps_and_restores_an_existing_instance_forward():
    from accelerate.hooks import ModelHook, add_hook_to_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    stock = build("llama")
    model = copy.deepcopy(stock)
    attn = model.model.layers[0].self_attn
    add_hook_to_module(attn, Count())
    hooked = attn.forward
    hf_fused.patch_model(model)
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)
    assert Count.calls == 1
    hf_fused.unpatch_model(model)
    assert attn.forward is hooked


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
def test_compile_fullgraph(fuse):
    stock = build("llama")
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    ids, mask = prompt()
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    with torch.no_grad():
        got = compiled(input_ids=ids, attention_mask=mask).logits.float()
    torch.testing.assert_close(got, logits(stock, ids, mask), rtol=1e-5, atol=1e-5)


def _unsupported_models():
    tiny = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, intermediate_size=64)
    for model_type, extra in [
        ("olmo2", {}),
        ("cohere", {"pad_token_id": 0}),
        ("gpt2", {"n_embd": 32, "n_layer": 1, "n_head": 2}),
        ("bert", {}),
    ]:
        yield model_type, lambda mt=model_type, e=extra: _auto(mt, **{**tiny, **e})
    yield "my_llama", _unknown_model


def _auto(model_type: str, **kwargs) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_config(AutoConfig.for_model(model_type, **kwargs))


def _unknown_model() -> nn.Module:
    model = build("llama")
    model.config.model_type = "my_llama"
    return model


@pytest.mark.parametrize("model_type, make", list(_unsupported_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_refuses_unsupported_families(model_type, make):
    model = make()
    before = snapshot(model)
    with pytest.raises(hf_fused.UnsupportedModelError, match=model_type) as err:
        hf_fused.patch_model(model)
    assert "llama" in str(err.value) and "phi3" in str(err.value)
    assert isinstance(err.value, ValueError)
    assert_same_snapshot(snapshot(model), before)


class QuantLinear(nn.Linear):
    """Stands in for a quantized linear: a subclass computes something else."""


class LoraWrapped(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x):
        return self.base_layer(x)


def _swap_proj(wrap):
    def mutate(model):
        attn = model.model.layers[1].self_attn
        attn.k_proj = wrap(attn.k_proj)

    return mutate


def _quantized(lin: nn.Linear) -> nn.Linear:
    q = QuantLinear(lin.in_features, lin.out_features, bias=False)
    q.weight = lin.weight
    return q


def _half_k_proj(model):
    model.model.layers[1].self_attn.k_proj.half()


def _normless(model):
    model.model.layers[1].input_layernorm = nn.Identity()


@pytest.mark.parametrize(
    "mutate, match",
    [
        (_swap_proj(_quantized), "QuantLinear"),
        (_swap_proj(LoraWrapped), "LoraWrapped"),
        (_half_k_proj, "dtype"),
        (_normless, "Identity"),
    ],
    ids=["quantized", "lora", "dtype-mismatch", "no-norm-weight"],
)
def test_refuses_layers_it_cannot_fuse_exactly(mutate, match):
    model = build("llama")
    mutate(model)
    before = snapshot(model)
    with pytest.raises(hf_fused.UnsupportedModelError, match=match):
        hf_fused.patch_model(model)
    assert_same_snapshot(snapshot(model), before)
    assert not hf_fused.is_patched(model)


def test_refuses_meta_weights():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **BASE))
    modules = [(name, id(m)) for name, m in model.named_modules()]
    with pytest.raises(hf_fused.UnsupportedModelError, match="meta"):
        hf_fused.patch_model(model)
    assert [(name, id(m)) for name, m in model.named_modules()] == modules
    assert not hf_fused.is_patched(model)


@pytest.mark.parametrize("thing", [object(), nn.Linear(4, 4), "llama"], ids=["object", "module", "str"])
def test_refuses_non_models(thing):
    with pytest.raises(hf_fused.UnsupportedModelError):
        hf_fused.patch_model(thing)
    assert not hf_fused.is_patched(thing)
