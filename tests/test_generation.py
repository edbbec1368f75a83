"""hf_fused.generation.generate gives transformers' greedy tokens, patched or not, and samples as
transformers' warpers say."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

import hf_fused
from hf_fused import generation, sampling
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


def test_refuses_to_compile_over_a_sliding_window_cache(ids):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, vocab_size=256, sliding_window=4)
    sliding = AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(ValueError, match="sliding-window layers"):
        generation.generate(sliding, ids, NEW, compile=True)
    # Uncompiled, the same cache decodes as transformers does.
    want = sliding.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=None, pad_token_id=0,
                            cache_implementation="static")
    assert torch.equal(generation.generate(sliding, ids, 3, compile=False), want)


@pytest.mark.parametrize("vocab", [5, 128, 1000, 128256])
def test_two_pass_argmax_is_the_first_maximum(vocab):
    generator = torch.Generator().manual_seed(vocab)
    # Few distinct values, so rows hold ties, in and across chunks; one row is all -inf.
    logits = torch.randint(0, 4, (4, vocab), generator=generator).float()
    logits[3] = float("-inf")
    assert torch.equal(generation._two_pass_argmax(logits), logits.argmax(-1))
    assert torch.equal(generation.argmax(logits), logits.argmax(-1))
    assert torch.equal(torch.compile(generation.argmax)(logits), logits.argmax(-1))


def test_state_is_freed_with_the_model():
    import gc
    import weakref

    model = build_random_model("tiny-llama")
    generation.generate(model, torch.randint(256, (1, 4)), 2)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


# Sampling. The filters must be transformers' own and the draws must follow softmax of what they
# leave, so both are checked against transformers' warpers on the same logits.

# (temperature, top_k, top_p): plain softmax, with top-k, with top-p, with both.
SAMPLING_SETTINGS = [(1.0, None, 1.0), (0.7, 10, 1.0), (1.3, None, 0.8), (0.8, 12, 0.9)]


def transformers_probs(logits, temperature, top_k, top_p):
    """softmax of transformers' warpers, in the order its generate applies them."""
    warpers = LogitsProcessorList()
    if temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p))
    return warpers(None, logits.float()).softmax(dim=-1)


def sampling_params(temperature, top_k, top_p, seed=0):
    params = sampling.SamplingParams.allocate(torch.device("cpu"))
    params.set(temperature, top_k, top_p, torch.Generator().manual_seed(seed))
    return params


def assert_draws_follow(tokens, probs):
    """Each token's count within 5 standard deviations of its expectation (a false failure has
    probability about 6e-7 per token), and never a token transformers' filters drop."""
    n = tokens.numel()
    counts = torch.bincount(tokens.view(-1), minlength=probs.numel()).double()
    expected = n * probs.double()
    assert (counts[probs == 0] == 0).all(), "a filtered token was drawn"
    bound = 5 * (expected * (1 - probs.double())).sqrt() + 1
    worst = ((counts - expected).abs() - bound).max()
    assert worst <= 0, f"counts off by {worst:.1f} beyond 5 sigma"


def test_philox_matches_random123_known_answers():
    words = lambda *values: tuple(torch.tensor(v) for v in values)  # noqa: E731
    # Random123's kat_vectors for philox4x32_10: counter, key, expected output.
    known = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in known:
        assert tuple(int(w) for w in sampling.philox4x32(words(*counter), words(*key))) == expected


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_SETTINGS)
def test_filters_match_transformers(temperature, top_k, top_p):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 3
    ours = sampling.filter_scores(logits, sampling_params(temperature, top_k, top_p))
    assert torch.equal(ours.isinf(), transformers_probs(logits, temperature, top_k, top_p) == 0)
    assert torch.allclose(ours.softmax(-1), transformers_probs(logits, temperature, top_k, top_p))


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_SETTINGS)
def test_draws_follow_transformers_distribution(temperature, top_k, top_p):
    logits = torch.randn(40, generator=torch.Generator().manual_seed(2)) * 2
    draws = 20_000  # one row per draw: the batch row is part of the noise's counter
    position = torch.zeros(draws, 1, dtype=torch.int64)
    tokens = sampling.sample(logits.expand(draws, -1), position, sampling_params(temperature, top_k, top_p))
    assert_draws_follow(tokens, transformers_probs(logits[None], temperature, top_k, top_p)[0])


# With top-k on, sample filters and draws on topk's candidates only: top-k alone and with top-p,
# top_k=1, a top_k close to its cap (126 of 128), and one above the vocabulary.
CANDIDATE_SETTINGS = [(1.0, 1, 1.0), (0.7, 50, 1.0), (0.7, 50, 0.9), (1.3, 5, 0.5), (0.9, 126, 0.95),
                      (1.0, 2000, 0.8)]


def full_vocabulary(cand_scores, cand_ids, vocab):
    """The candidates' scores put back at their token ids, -inf elsewhere, as filter_scores gives them."""
    return torch.full((cand_scores.shape[0], vocab), float("-inf")).scatter(-1, cand_ids, cand_scores)


@pytest.mark.parametrize("temperature,top_k,top_p", CANDIDATE_SETTINGS)
def test_candidates_draw_what_the_full_sort_draws(temperature, top_k, top_p):
    """The same filtered scores, and so, with noise for the candidates' ids only, the same tokens
    as the full-vocabulary path for every key and position."""
    batch, vocab = 8, 1000
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(4)) * 3
    first_position = torch.arange(batch).view(batch, 1) * 37
    token_ids = torch.arange(vocab)
    for seed in range(20):
        params = sampling_params(temperature, top_k, top_p, seed)
        full_scores = sampling.filter_scores(logits, params)
        assert torch.equal(full_vocabulary(*sampling.filter_candidates(logits, params), vocab), full_scores)
        for step in range(5):
            position = first_position + step
            expected = (full_scores + sampling.gumbel_noise(params.key, position, token_ids)).argmax(dim=-1)
            assert torch.equal(sampling.sample(logits, position, params), expected)


def test_candidates_keep_ties_with_the_kth_score():
    logits = torch.randn(2, 1000, generator=torch.Generator().manual_seed(5))
    logits[:, :30] = logits.topk(10).values[:, -1:]  # ties with the 10th largest, within the cap of 64
    params = sampling_params(1.0, 10, 1.0)
    kept = full_vocabulary(*sampling.filter_candidates(logits, params), 1000).isfinite()
    assert (kept.sum(dim=-1) > 10).all()
    assert torch.equal(kept, transformers_probs(logits, 1.0, 10, 1.0) > 0)


def test_top_k_cap_picks_the_step(model, ids):
    """A top_k under the same cap reuses the step (top_k is a tensor); one beyond it gets its own."""
    generation.reset(model)
    settings = dict(do_sample=True, temperature=0.7, top_p=0.9, seed=0)
    steps = lambda: set(getattr(model, generation._STATE_ATTR).steps)  # noqa: E731
    generation.generate(model, ids, 2, top_k=50, **settings)
    assert steps() == {(False, (128, True))}
    generation.generate(model, ids, 2, top_k=60, **settings)
    assert steps() == {(False, (128, True))}
    generation.generate(model, ids, 2, top_k=200, **settings)
    assert steps() == {(False, (128, True)), (False, (512, True))}


def test_first_generated_token_follows_transformers_distribution(model):
    """End to end: the token sampled from the prefill, over many rows and seeds."""
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    settings = dict(temperature=0.9, top_k=40, top_p=0.95)
    generation.reset(model)
    firsts = [generation.generate(model, prompt.expand(1000, -1), 1, do_sample=True, seed=seed, **settings)[:, -1]
              for seed in range(3)]
    probs = transformers_probs(model(prompt).logits[:, -1], settings["temperature"], settings["top_k"],
                               settings["top_p"])
    assert_draws_follow(torch.cat(firsts), probs[0])


def test_sampling_is_reproducible(model, ids):
    generation.reset(model)
    settings = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9)
    first = generation.generate(model, ids, NEW, seed=7, **settings)
    assert torch.equal(generation.generate(model, ids, NEW, seed=7, **settings), first)
    # seed=7 is a CPU generator seeded with 7, since the model is on CPU.
    assert torch.equal(generation.generate(model, ids, NEW, generator=torch.Generator().manual_seed(7), **settings),
                       first)
    assert not torch.equal(generation.generate(model, ids, NEW, seed=8, **settings), first)
    # Greedy stays greedy whatever the sampling arguments, as in transformers.
    assert torch.equal(generation.generate(model, ids, NEW, seed=7, temperature=0.8), hf_greedy(model, ids))


def test_top_k_1_is_greedy(model, ids):
    generation.reset(model)
    out = generation.generate(model, ids, NEW, do_sample=True, top_k=1, temperature=1.5, seed=0)
    assert torch.equal(out, hf_greedy(model, ids))


def test_compiled_sampling_step_matches_eager(model, ids):
    """The sampling traces into the fullgraph-compiled step and draws the same noise there."""
    settings = dict(do_sample=True, temperature=0.8, top_k=50, top_p=0.9, seed=3)
    generation.reset(model)
    torch._dynamo.reset()
    compiled = generation.generate(model, ids, NEW, compile=True, **settings)
    assert torch.equal(compiled, generation.generate(model, ids, NEW, compile=False, **settings))


@pytest.mark.parametrize("kwargs,name", [
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(do_sample=True, temperature=-1.0), "temperature"),
    (dict(do_sample=True, top_p=0.0), "top_p"),
    (dict(do_sample=True, top_p=1.5), "top_p"),
    (dict(do_sample=True, top_k=-1), "top_k"),
    (dict(do_sample=True, top_k=2.5), "top_k"),
    (dict(do_sample=True, seed=0, generator=torch.Generator()), "generator or seed"),
])
def test_bad_sampling_arguments(model, ids, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generation.generate(model, ids, NEW, **kwargs)
