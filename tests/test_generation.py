"""hf_fused.generation.generate gives transformers' greedy tokens, patched or not."""

from __future__ import annotations

import pytest
import torch

import hf_fused
from hf_fused import generation
from hf_fused.models import build_random_model

NEW = 10


@pytest.fixture(scope="module")
def model():
    # std 0.2 spreads the logits so greedy picks are far from ties.
    return build_random_model("tiny-llama", torch.float32, "cpu", std=0.2)


def hf_greedy(model, ids, **kwargs):
    return model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs)


@pytest.fixture
def ids():
    return torch.randint(3, 256, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_matches_transformers_greedy(model, ids, patched):
    expected = hf_greedy(model, ids)
    if patched:
        hf_fused.patch_model(model)
    try:
        generation.reset(model)
        assert torch.equal(generation.generate(model, ids, NEW), expected)
        # A second call reuses the cache and must start from a clean one.
        assert torch.equal(generation.generate(model, ids, NEW), expected)
    finally:
        hf_fused.unpatch_model(model)


def test_compiled_step_matches(model, ids):
    generation.reset(model)
    torch._dynamo.reset()
    out = generation.generate(model, ids, NEW, compile=True)
    assert torch.equal(out, hf_greedy(model, ids))


def test_left_padding_matches_unpadded(model, ids):
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    padded = ids.clone()
    padded[1, :3] = 0
    out = generation.generate(model, padded, NEW, attention_mask=mask)
    assert torch.equal(out, hf_greedy(model, padded, attention_mask=mask))
    alone = generation.generate(model, ids[1:, 3:], NEW)
    assert torch.equal(out[1, 8:], alone[0, 5:])


def test_eos_stops_and_pads(model, ids):
    free = generation.generate(model, ids[:1], NEW)
    eos = int(free[0, 8 + 3])  # the 4th new token
    out = generation.generate(model, ids[:1], NEW, eos_token_id=eos, pad_token_id=0)
    first = (free[0, 8:] == eos).nonzero()[0].item()
    assert out.shape[1] == 8 + first + 1  # a single sequence stops right at its EOS
    assert torch.equal(out[0], free[0, : out.shape[1]])


def test_streamer_and_callback_see_every_token(model, ids):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value)

        def end(self):
            self.ended = True

    streamer, seen = Recorder(), []
    out = generation.generate(model, ids[:1], NEW, streamer=streamer, callback=seen.append)
    assert torch.equal(streamer.puts[0], ids[:1])  # the prompt first, as transformers' generate does
    assert torch.equal(torch.cat(streamer.puts[1:]), out[0, 8:]) and streamer.ended
    assert torch.equal(torch.stack(seen, 1), out[:, 8:])


def test_bad_arguments(model, ids):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generation.generate(model, ids, 0)
    with pytest.raises(ValueError, match="batch, seq"):
        generation.generate(model, ids[0], NEW)


def test_refuses_to_compile_over_accelerate_hooks(ids):
    from accelerate.hooks import ModelHook, add_hook_to_module

    hooked = build_random_model("tiny-llama", torch.float32, "cpu", std=0.2)
    add_hook_to_module(hooked.model.layers[0], ModelHook())
    with pytest.raises(ValueError, match="accelerate's hooks"):
        generation.generate(hooked, ids, NEW, compile=True)
    assert generation.generate(hooked, ids, 2, compile=False).shape == (2, ids.shape[1] + 2)


def test_state_is_freed_with_the_model():
    import gc
    import weakref

    model = build_random_model("tiny-llama")
    generation.generate(model, torch.randint(256, (1, 4)), 2)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
