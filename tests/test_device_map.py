"""Models loaded with accelerate's device_map: patched where the weights are in place, refused
(and left untouched) where a layer is offloaded. The multi-GPU half of this needs several GPUs."""

import pytest
import torch
from accelerate import dispatch_model
from transformers import AutoModelForCausalLM

import hf_fused
from hf_fused.models import build_random_model

IDS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    build_random_model("tiny-llama", dtype=torch.float32, device="cpu").save_pretrained(folder)
    return folder


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def test_device_map_load_patches_and_matches(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map="cpu").eval()
    stock = logits(model)
    hf_fused.patch_model(model)
    torch.testing.assert_close(logits(model), stock, rtol=0, atol=1e-5)
    hf_fused.unpatch_model(model)
    assert torch.equal(logits(model), stock)


def test_accelerate_hooks_survive_patch_and_unpatch(checkpoint):
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    stock = logits(model)
    # force_hooks puts accelerate's device-alignment hooks on every module, as a multi-device map does.
    dispatch_model(model, device_map={"": "cpu"}, force_hooks=True)
    attn = model.model.layers[0].self_attn
    hooked_forward = attn.forward
    hf_fused.patch_model(model)
    torch.testing.assert_close(logits(model), stock, rtol=0, atol=1e-5)
    hf_fused.unpatch_model(model)
    assert attn.forward is hooked_forward
    assert torch.equal(logits(model), stock)


def test_offloaded_layer_is_refused_and_model_untouched(checkpoint, tmp_path):
    names = ["model.embed_tokens", "model.layers.0", "model.layers.1", "model.norm", "model.rotary_emb", "lm_head"]
    device_map = {name: "cpu" for name in names} | {"model.layers.1": "disk"}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map, offload_folder=tmp_path).eval()
    stock = logits(model)
    modules_before = dict(model.named_modules())
    with pytest.raises(hf_fused.UnsupportedModelError, match=r"model\.layers\.1.*meta"):
        hf_fused.patch_model(model)
    assert not hf_fused.is_patched(model)
    assert dict(model.named_modules()) == modules_before
    assert torch.equal(logits(model), stock)
