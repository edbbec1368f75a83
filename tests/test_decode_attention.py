"""The decode-attention op against transformers' sdpa attention, and fuse="attention" in a model.

On a machine without CUDA these run the Triton kernels in Triton's interpreter (see conftest.py);
on a GPU they run the compiled kernels, at the Llama-3-8B shape too.
"""

import copy
import importlib
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers import StaticCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import hf_fused
from hf_fused import generation
from hf_fused.models import build_random_model
from hf_fused.ops import decode_attention, decode_attention_ref
from hf_fused.patches.attention import ATTENTION_NAME, decode_attention_forward
from test_ops import ATOL, DEVICE, DTYPES, requires_cuda

# The package exports a function of the same name, which shadows the module as an attribute.
op_module = importlib.import_module("hf_fused.ops.decode_attention")
ALL = ("qkv", "mlp", "gemv", "attention")


def make_inputs(B, Hq, Hkv, M, S, D, dtype, lengths, *, device=DEVICE, seed=0):
    """q, k, v and the mask transformers builds for M new tokens ending at each row's length:
    query m of row b sits at position lengths[b] - M + m and attends every key up to it."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)
               for shape in ((B, M, Hq, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    positions = torch.tensor(lengths)[:, None] - M + torch.arange(M)[None, :]
    mask = (torch.arange(S)[None, None, :] <= positions[:, :, None])[:, None].to(device)
    return q.transpose(1, 2), k, v, mask  # q as transformers hands it: a transposed view


def sdpa(q, k, v, mask, scaling):
    """What transformers' sdpa attention function returns for these inputs."""
    module = SimpleNamespace(num_key_value_groups=q.shape[1] // k.shape[1], is_causal=True)
    return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)[0]


def assert_close_to_reference(out, q, k, v, mask, scaling):
    """The rule from flash-attention's tests: at most 2x PyTorch's own error, plus a small atol."""
    exact = decode_attention_ref(*(t.cpu() if t is not None else None for t in (q, k, v, mask)), scaling, upcast=True)
    torch_out = sdpa(q, k, v, mask, scaling)
    assert out.shape == torch_out.shape and out.dtype == q.dtype and out.is_contiguous()
    assert torch.isfinite(out).all()
    kernel_err = (out.cpu().double() - exact).abs().max().item()
    torch_err = (torch_out.cpu().double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + ATOL[q.dtype], f"kernel err {kernel_err:.3g}, PyTorch err {torch_err:.3g}"


def test_reference_is_transformers_sdpa():
    q, k, v, mask = make_inputs(3, 8, 2, 4, 75, 24, torch.float32, [1, 40, 75], device="cpu")
    torch.testing.assert_close(decode_attention_ref(q, k, v, mask, 0.3), sdpa(q, k, v, mask, 0.3), rtol=1e-5, atol=1e-6)


# Three rows of the cache at once: 1 valid key, a length ending mid-tile, the full cache (S=75
# is not a multiple of the 64-key tile; D=24 is not a power of two). With M=4 the first row's
# earlier query tokens attend nothing, and give 0 as sdpa does.
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_accuracy(dtype, group, M):
    q, k, v, mask = make_inputs(3, 2 * group, 2, M, 75, 24, dtype, [1, 40, 75], seed=group + M)
    assert_close_to_reference(decode_attention(q, k, v, mask, scaling=24**-0.5), q, k, v, mask, 24**-0.5)


@pytest.mark.parametrize("mask_shape", ["none", "per_head", "broadcast"])
def test_mask_none_and_broadcast(mask_shape):
    q, k, v, mask = make_inputs(2, 4, 2, 1, 33, 16, torch.float16, [20, 33])
    mask = {"none": None, "per_head": mask.expand(2, 4, 1, 33).clone(), "broadcast": mask[:1]}[mask_shape]
    if mask_shape == "per_head":
        mask[:, 1, :, 5:9] = False  # heads of one group that attend different keys
    assert_close_to_reference(decode_attention(q, k, v, mask, scaling=0.25), q, k, v, mask, 0.25)


@pytest.mark.parametrize("num_splits", [1, 3, 100])
def test_split_counts_agree(num_splits):
    """Any split of the keys gives the same result: one program for all, several, one per tile."""
    q, k, v, mask = make_inputs(2, 4, 2, 4, 90, 16, torch.float32, [90, 50])
    if not op_module.runs_triton(q):
        pytest.skip("needs a GPU or Triton's interpreter")
    out = q.new_empty(2, 4, 4, 16)
    op_module.launch_decode(q, k, v, mask, 0.25, out, op_module.DecodeConfig(BLOCK_N=16, num_splits=num_splits))
    torch.testing.assert_close(out, decode_attention_ref(q, k, v, mask, 0.25), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_one_split_writes_the_output_without_the_merge(with_mask):
    """A cache of one tile is one split: the split kernel writes the output, eager and traced;
    a row with no key to attend gives 0, as the merge gives it."""
    q, k, v, mask = make_inputs(2, 8, 2, 2, 40, 16, torch.float32, [40, 9])
    mask[1, :, 0] = False  # row 1's first token attends nothing
    mask = mask if with_mask else None
    if not op_module.runs_triton(q):
        pytest.skip("needs a GPU or Triton's interpreter")
    out = q.new_empty(2, 2, 8, 16)
    assert len(op_module.decode_launches(q, k, v, mask, 0.25, out)) == 1
    with torch.no_grad():
        eager = decode_attention(q, k, v, mask, scaling=0.25)
        traced = torch.ops.hf_fused.decode_attention(q, k, v, mask, 0.25)
    want = decode_attention_ref(q, k, v, mask, 0.25)
    torch.testing.assert_close(eager, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(traced, eager)
    if with_mask:
        assert not eager[1, 0].any()


def test_splits_fill_the_gpu_and_cover_every_key():
    for batch_heads, S in [(8, 384), (8, 4224), (32, 4224), (1, 1), (64, 100)]:
        splits, split_len = op_module.split_keys(batch_heads, S, 64, torch.device("cpu"))
        assert split_len % 64 == 0 and (splits - 1) * split_len < S <= splits * split_len


@pytest.mark.parametrize("with_mask", [True, False], ids=["mask", "no-mask"])
def test_eager_launch_matches_the_registered_op(with_mask):
    """Eager calls replay launches resolved once per signature, as the other ops' eager decode calls."""
    q, k, v, mask = make_inputs(2, 8, 2, 1, 40, 16, DTYPES[0], [40, 9])
    mask = mask if with_mask else None
    with torch.no_grad():
        want = torch.ops.hf_fused.decode_attention(q, k, v, mask, 0.25)
        before = len(op_module._EAGER_LAUNCHES)
        first, second = (decode_attention(q, k, v, mask, scaling=0.25) for _ in range(2))
        assert len(op_module._EAGER_LAUNCHES) in (before, before + 1)
    assert torch.equal(first, want) and torch.equal(second, want)


def _bad(**changes):
    q, k, v, mask = make_inputs(1, 4, 2, 1, 8, 16, torch.float32, [8])
    args = dict(q=q, k=k, v=v, mask=mask, scaling=0.25)
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(q=lambda a: a["q"][0]), "q must be"),
    (_bad(v=lambda a: a["v"][:, :, :4]), "one shape"),
    (_bad(q=lambda a: a["q"].expand(1, 4, 17, 16), mask=None), "1 to 16 query tokens"),
    (_bad(k=lambda a: a["k"][:, :1].expand(1, 3, 8, 16), v=lambda a: a["v"][:, :1].expand(1, 3, 8, 16)), "dividing Hq"),
    (_bad(k=lambda a: a["k"].half()), "one floating dtype"),
    (_bad(mask=lambda a: a["mask"].float()), "mask must be a bool"),
    (_bad(mask=lambda a: a["mask"][..., :5]), "mask must be a bool"),
    (_bad(q=lambda a: torch.cat([a["q"], a["q"]], -1)[..., ::2]), "contiguous in the head dimension"),
    (_bad(scaling=float("nan")), "scaling must be a finite float"),
])
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(**args)


@pytest.fixture
def launches(monkeypatch):
    """The (B, Hq, M, D) query shape of every kernel launch, traced (launch_decode) or eager."""
    shapes = []
    for name in ("launch_decode", "_eager_decode"):
        launch = getattr(op_module, name)
        monkeypatch.setattr(op_module, name, lambda q, *args, launch=launch, **kw: (shapes.append(tuple(q.shape)), launch(q, *args, **kw))[1])
    return shapes


def tiny(attn="sdpa"):
    model = build_random_model("tiny-llama", torch.float32, DEVICE, std=0.2)
    model.set_attn_implementation(attn)
    return model


def prompts(left_pad=False):
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[0, :3], mask[0, :3] = 0, 0
    return ids, mask


@pytest.mark.parametrize("fuse, left_pad", [(("attention",), False), (ALL, True)], ids=["attention", "all-left-padded"])
def test_static_generate_matches_stock(fuse, left_pad, launches):
    stock = tiny()
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    ids, mask = prompts(left_pad)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static")
    want = stock.generate(ids, **kwargs)
    launches.clear()
    assert torch.equal(model.generate(ids, **kwargs), want)
    # 5 decode steps x 2 layers; a padded prompt's 7 tokens come with a mask, and take the kernel too.
    prefill = [(2, 4, 7, 16)] * 2 * left_pad
    if DEVICE == "cpu":
        assert launches == prefill + [(2, 4, 1, 16)] * 5 * 2
    else:  # generate compiles the decode step there: its graph launches the kernels, traced here once or more
        assert launches[: len(prefill)] == prefill and (2, 4, 1, 16) in launches
    assert torch.equal(generation.generate(model, ids, 6, attention_mask=mask), want)


def test_a_few_tokens_over_a_filled_cache_match_stock(launches):
    """Four tokens at once after a prefill (a speculative step): the kernel with M=4 and a causal mask."""
    stock = tiny()
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=("attention",))
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    logits = []
    for m in (stock, model):
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            m(input_ids=ids[:, :7], use_cache=True, **{generation._cache_kwarg(m): cache})
            positions = torch.arange(7, 11, device=DEVICE).expand(2, 4)
            logits.append(m(input_ids=ids[:, 7:], position_ids=positions, use_cache=True,
                            **{generation._cache_kwarg(m): cache}).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)
    assert launches == [(2, 4, 4, 16)] * 2


def test_unpatch_restores_and_nothing_global_changes():
    sdpa_before, mask_before = ALL_ATTENTION_FUNCTIONS["sdpa"], ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    names_before = set(ALL_ATTENTION_FUNCTIONS) - {ATTENTION_NAME}
    stock, other = tiny(), tiny()
    model = copy.deepcopy(stock)
    hf_fused.patch_model(model, fuse=ALL)
    assert model.config._attn_implementation == ATTENTION_NAME and hf_fused.is_patched(model)
    assert other.config._attn_implementation == "sdpa" and not hf_fused.is_patched(other)
    assert set(ALL_ATTENTION_FUNCTIONS) - {ATTENTION_NAME} == names_before
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is sdpa_before and ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is mask_before
    assert ALL_ATTENTION_FUNCTIONS[ATTENTION_NAME] is decode_attention_forward
    hf_fused.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa" and not hf_fused.is_patched(model)
    assert "_hf_fused_attention" not in model.__dict__
    assert model.config.to_dict() == stock.config.to_dict()
    stock_state = stock.state_dict()
    assert all(torch.equal(t, stock_state[name]) for name, t in model.state_dict().items())


def test_attention_alone_patches_once_and_unpatches():
    model = hf_fused.patch_model(tiny(), fuse=["attention"])
    assert hf_fused.patch_model(model, fuse=("attention",)) is model
    with pytest.raises(ValueError, match="unpatch_model it"):
        hf_fused.patch_model(model, fuse=("qkv", "attention"))
    hf_fused.unpatch_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_only_a_model_on_sdpa_takes_it(caplog):
    with pytest.raises(hf_fused.UnsupportedModelError, match="stands in for 'sdpa' only"):
        hf_fused.patch_model(tiny("eager"), fuse=("attention",))
    with caplog.at_level(logging.WARNING, logger="hf_fused"):
        model = hf_fused.patch_model(tiny("eager"), fuse=("qkv", "attention"))
    assert model.config._attn_implementation == "eager" and "attention runs 'eager'" in caplog.text


@pytest.mark.parametrize("kwargs, reason", [
    (dict(sliding_window=3), "sliding_window is set"),
    (dict(softcap=None, dropout=0.5), "dropout"),
    (dict(output_attentions=True), "output_attentions"),
])
def test_what_the_kernel_cannot_express_goes_to_sdpa(kwargs, reason, launches, caplog, monkeypatch):
    monkeypatch.setattr(importlib.import_module("hf_fused.patches.attention"), "_logged", set())
    q, k, v, mask = make_inputs(2, 4, 2, 1, 20, 16, torch.float32, [20, 9])
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    torch.manual_seed(0)
    want = sdpa_attention_forward(module, q, k, v, mask, scaling=0.25, **kwargs)[0]
    with caplog.at_level(logging.INFO, logger="hf_fused"):
        torch.manual_seed(0)
        got = decode_attention_forward(module, q, k, v, mask, scaling=0.25, **kwargs)[0]
    assert torch.equal(got, want) and not launches
    assert reason in caplog.text


def test_eager_decoding_over_a_dynamic_cache_goes_to_sdpa(launches, caplog, monkeypatch):
    """No mask and one query token is transformers' dynamic cache: its length changes every step."""
    monkeypatch.setattr(importlib.import_module("hf_fused.patches.attention"), "_logged", set())
    q, k, v, _ = make_inputs(2, 4, 2, 1, 20, 16, torch.float32, [20, 20])
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    want = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)[0]
    with caplog.at_level(logging.INFO, logger="hf_fused"):
        got = decode_attention_forward(module, q, k, v, None, scaling=0.25)[0]
    assert torch.equal(got, want) and not launches
    assert "a dynamic cache" in caplog.text
    # Traced, the same call takes the kernel: a compiled step launches it from its graph.
    compiled = torch.compile(lambda *a: decode_attention_forward(module, *a, None, scaling=0.25)[0], backend="eager")
    torch.testing.assert_close(compiled(q, k, v), want, rtol=1e-4, atol=1e-5)
    assert launches == [(2, 4, 1, 16)]


def assert_compiled_step_matches_stock(fuse, backend):
    """A patched model's decode step over a static cache, compiled with fullgraph=True (so a
    graph break fails), gives the logits of the stock model's eager step."""
    stock = tiny()
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    ids, _ = prompts()
    logits = []
    for m, compiled in ((stock, False), (model, True)):
        cache = StaticCache(config=m.config, max_cache_len=12)

        def step(tokens, positions, m=m, cache=cache):
            return m(input_ids=tokens, position_ids=positions, use_cache=True, **{generation._cache_kwarg(m): cache}).logits

        with torch.no_grad():
            step(ids, torch.arange(7, device=DEVICE).expand(2, 7))
            step = torch.compile(step, fullgraph=True, backend=backend) if compiled else step
            logits.append(step(ids[:, :1], torch.full((2, 1), 7, device=DEVICE)))
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_decode_step_has_no_graph_break(backend):
    assert_compiled_step_matches_stock(("attention",), backend)


# The Llama-3-8B attention shape over a 4096-token static cache: rows at the full cache, mid-way
# and nearly empty, one and four query tokens.
@requires_cuda
@pytest.mark.parametrize("M", [1, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_accuracy_llama3_8b_shape(dtype, M):
    q, k, v, mask = make_inputs(3, 32, 8, M, 4096, 128, dtype, [4096, 1500, 5])
    assert_close_to_reference(decode_attention(q, k, v, mask, scaling=128**-0.5), q, k, v, mask, 128**-0.5)
    out = torch.empty_like(q.transpose(1, 2))
    op_module.launch_decode(q, k, v, mask, 128**-0.5, out, op_module.DecodeConfig(num_splits=1))
    assert_close_to_reference(out, q, k, v, mask, 128**-0.5)
