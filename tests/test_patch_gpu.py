"""patch_model on the GPU: bf16 through the compiled Triton kernels, and generate with a static
cache, whose decode step transformers compiles with CUDA graphs."""

import pytest
import torch

import hf_fused
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
