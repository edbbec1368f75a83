"""patch_model on the GPU: bf16 through the compiled Triton kernels, generate with a static
cache, whose decode step transformers compiles with CUDA graphs, and hf_fused.generate's compiled
decoding with the decode attention."""

import copy

import pytest
import torch

import hf_fused
from hf_fused import generation
from test_patch import FAMILIES, FUSES, build, param_id, prompt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_match_on_gpu(family, fuse):
    model = build(family).to("cuda", torch.bfloat16)
    ids, mask = prompt()
    ids, mask = ids.cuda(), mask.cuda()
    report = hf_fused.verify_patch(hf_fused.patch_model(model, fuse=fuse), ids)
    assert report.ok, report
    with torch.no_grad():
        patched = model(input_ids=ids, attention_mask=mask).logits.float()
        hf_fused.unpatch_model(model)
        stock = model(input_ids=ids, attention_mask=mask).logits.float()
    assert (patched.argmax(-1) == stock.argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(patched, stock, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("fuse", FUSES, ids=param_id)
@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_static_cache_generate_on_gpu(family, fuse):
    model = build(family).to("cuda", torch.float32)
    ids, mask = prompt()
    ids, mask = ids.cuda(), mask.cuda()
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        stock = model.generate(ids, **kwargs)
        hf_fused.patch_model(model, fuse=fuse)
        torch._dynamo.reset()
        patched = model.generate(ids, **kwargs)
    assert torch.equal(patched, stock)


def agreeing_tokens(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading positions two (B, S) token tensors share in every row."""
    differs = (a != b).any(0).nonzero()
    return a.shape[1] if len(differs) == 0 else int(differs[0])


# Compiled decoding with every fusion, the decode attention too, gives the tokens of stock compiled
# decoding, as far as stock's own eager and compiled decoding agree with each other: transformers'
# static-cache generate (which compiles its decode step) for every family, and hf_fused.generate
# for those without sliding-window layers (it refuses them). gemma2's softcap keeps transformers'
# eager attention, mistral's sliding window sdpa's: both logged.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "mistral"])
def test_compiled_decode_with_decode_attention_matches_stock(family, dtype):
    stock = build(family).to("cuda", dtype)
    patched = hf_fused.patch_model(copy.deepcopy(stock), fuse=("qkv", "mlp", "gemv", "attention"))
    ids, mask = prompt()
    ids, mask = ids.cuda(), mask.cuda()
    new = 20
    kwargs = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    decoders = {"generate, static cache": lambda m: m.generate(ids, cache_implementation="static", **kwargs)}
    if family in ("llama", "qwen3"):
        decoders["hf_fused.generate"] = lambda m: generation.generate(m, ids, new, attention_mask=mask)
    with torch.no_grad():
        stock_eager = stock.generate(ids, **kwargs)
        for name, decode in decoders.items():
            torch._dynamo.reset()
            stock_compiled = decode(stock)
            torch._dynamo.reset()
            fused = decode(patched)
            agree = agreeing_tokens(stock_eager, stock_compiled)
            # fp32 leaves no room for the paths to part; bf16 may round a near-tie either way.
            assert agree >= ids.shape[1] + (new if dtype == torch.float32 else 1), f"{name}: stock paths agree on {agree}"
            fused_agree = agreeing_tokens(fused, stock_compiled)
            assert fused_agree >= agree, f"{name}: fused agrees with stock on {fused_agree}, stock's paths on {agree}"
