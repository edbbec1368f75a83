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


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fuse", [("qkv",), ("qkv", "mlp"), ("qkv", "mlp", "gemv")], ids="+".join)
def test_layers_on_two_gpus_run_on_their_own_gpu(checkpoint, dtype, fuse):
    """Layer 0 on cuda:0 and layer 1 on cuda:1: each fused kernel must launch on its layer's GPU,
    whichever GPU is current, or it reads inputs another stream has not finished writing."""
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": 1,
                  "model.norm": 1, "lm_head": 1}
    model = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=device_map, dtype=dtype).eval()
    ids = IDS.to("cuda:0")
    with torch.no_grad():
        stock = model(ids).logits.float()
        hf_fused.patch_model(model, fuse=fuse)
        assert model.model.layers[1].self_attn.qkv_fused.weight.device == torch.device("cuda", 1)
        torch.cuda.set_device(0)
        patched = model(ids).logits.float()
    assert torch.isfinite(patched).all()
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(patched, stock, rtol=tolerance, atol=tolerance)
    assert hf_fused.verify_patch(model, ids).ok
