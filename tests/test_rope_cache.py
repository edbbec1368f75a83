"""The rotary + static-cache-write op against transformers' rotary and StaticLayer.update, and
fuse="rope" in a model.

On a machine without CUDA these run the Triton kernel in Triton's interpreter (see conftest.py);
on a GPU they run the compiled kernel, at the Llama-3-8B shape too.
"""

import copy
import functools
import importlib
import logging
import pickle

import pytest
import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import hf_fused
from hf_fused import generation
from hf_fused.models import build_random_model
from hf_fused.ops import rope_cache_write, rope_cache_write_ref, rotary
from hf_fused.patches.rope_cache import RopeCacheAttention
from test_decode_attention import assert_compiled_step_matches_stock
from test_ops import ATOL, DEVICE, DTYPES, requires_cuda
from test_patch import build, logits, prompt

# The package exports a function of the same name, which shadows the module as an attribute.
op_module = importlib.import_module("hf_fused.ops.rope_cache")
patch_module = importlib.import_module("hf_fused.patches.rope_cache")
ROPE = ("qkv", "rope")
EVERY = ("qkv", "mlp", "gemv", "attention", "residual", "rope")


def make_inputs(B, M, Hq, Hkv, D, S, length, dtype, *, cos_rows=None, device=DEVICE, seed=0):
    """A fused q/k/v output, transformers' cos and sin for positions length..length+M-1, and a
    static cache of S positions already holding other values (so that a stray write shows)."""
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, M, (Hq + 2 * Hkv) * D, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    positions = (length + torch.arange(M)).float()[None].expand(cos_rows or B, M)
    freqs = torch.cat([positions[..., None] * inv_freq] * 2, dim=-1)
    keys, values = (torch.randn(B, Hkv, S, D, generator=gen) for _ in range(2))
    to = dict(dtype=dtype, device=device)
    return (qkv.to(**to), freqs.cos().to(**to), freqs.sin().to(**to), keys.to(**to), values.to(**to),
            torch.tensor(length, device=device))


def stock_rotary_and_update(qkv, cos, sin, keys, values, length, Hq, Hkv):
    """What Llama's attention forward computes: apply_rotary_pos_emb, then StaticLayer.update."""
    B, M, _ = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.view(B, M, -1, keys.shape[-1]).split((Hq, Hkv, Hkv), dim=2))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    layer = StaticLayer(max_cache_len=keys.shape[2])
    layer.lazy_initialization(k, v)
    layer.keys.copy_(keys), layer.values.copy_(values), layer.cumulative_length.fill_(int(length))
    layer.update(k, v)
    return q.transpose(1, 2), layer.keys, layer.values


def test_reference_is_transformers_rotary_and_static_cache_update():
    args = make_inputs(2, 3, 4, 2, 16, 12, 5, torch.float32, device="cpu")
    qkv, cos, sin, keys, values, length = args
    want_q, want_k, want_v = stock_rotary_and_update(*args, 4, 2)
    q = rope_cache_write_ref(qkv, cos, sin, keys, values, length, 4, 2)
    torch.testing.assert_close(q, want_q, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(keys, want_k, rtol=1e-6, atol=1e-6)
    assert torch.equal(values, want_v) and int(length) == 5  # the op reads the length, never advances it


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B, M, Hq, Hkv, D, cos_rows", [(1, 1, 4, 2, 16, None), (3, 4, 6, 2, 8, None),
                                                        (2, 2, 4, 4, 32, 1), (2, 1, 20, 4, 16, None)],
                         ids=["one-token", "speculative", "cos-broadcast", "heads-over-blocks"])
def test_kernel_accuracy(dtype, B, M, Hq, Hkv, D, cos_rows):
    """q and k within 2x PyTorch's own error against fp64 (the rule of the other ops); v copied
    exactly; the rest of the cache untouched."""
    S, length = 9, 4
    qkv, cos, sin, keys, values, L = make_inputs(B, M, Hq, Hkv, D, S, length, dtype, cos_rows=cos_rows)
    k_before, v_before = keys.clone(), values.clone()
    q = rope_cache_write(qkv, cos, sin, keys, values, L, num_heads=Hq, num_kv_heads=Hkv)

    exact_q, exact_k, exact_v = stock_rotary_and_update(*(t.cpu().double() for t in (qkv, cos, sin, k_before, v_before)),
                                                        L.cpu(), Hq, Hkv)
    torch_q, torch_k, _ = stock_rotary_and_update(qkv, cos, sin, k_before, v_before, L, Hq, Hkv)
    for got, exact, torch_out in ((q, exact_q, torch_q), (keys, exact_k, torch_k)):
        assert got.shape == torch_out.shape and got.dtype == dtype
        kernel_err = (got.cpu().double() - exact).abs().max().item()
        torch_err = (torch_out.cpu().double() - exact).abs().max().item()
        assert kernel_err <= 2 * torch_err + ATOL[dtype], f"kernel err {kernel_err:.3g}, PyTorch err {torch_err:.3g}"
    assert q.is_contiguous() and q.shape == (B, M, Hq, D)
    assert torch.equal(values.cpu(), exact_v.to(dtype))
    written = torch.zeros(S, dtype=torch.bool)
    written[length : length + M] = True
    assert torch.equal(keys[:, :, ~written], k_before[:, :, ~written])
    assert int(L) == length


def test_positions_past_the_cache_are_not_written():
    """Where index_copy_ would fail on the device, the kernel writes the positions that fit."""
    qkv, cos, sin, keys, values, L = make_inputs(1, 3, 2, 1, 8, 6, 4, torch.float32)
    k_before, v_before = keys.clone(), values.clone()
    rope_cache_write(qkv, cos, sin, keys, values, L, num_heads=2, num_kv_heads=1)
    assert not torch.equal(keys[:, :, 4:], k_before[:, :, 4:])
    assert torch.equal(keys[:, :, :4], k_before[:, :, :4]) and torch.equal(values[:, :, :4], v_before[:, :, :4])
    assert torch.equal(values[0, 0, 4:], qkv[0, :2, 24:].to(values.dtype))


def test_eager_launch_matches_the_registered_op():
    """Eager calls replay a launch resolved once per signature, as the other ops' eager calls."""
    args = make_inputs(2, 1, 4, 2, 16, 8, 3, DTYPES[0])
    caches = [tuple(t.clone() for t in args[3:5]) for _ in range(3)]
    with torch.no_grad():
        want = torch.ops.hf_fused.rope_cache_write(*args[:3], *caches[0], args[5], 4, 2)
        before = len(op_module._EAGER_LAUNCHES)
        first, second = (rope_cache_write(*args[:3], *cache, args[5], num_heads=4, num_kv_heads=2) for cache in caches[1:])
        assert len(op_module._EAGER_LAUNCHES) in (before, before + 1)
    assert torch.equal(first, want) and torch.equal(second, want)
    assert all(torch.equal(a, b) for cache in caches[1:] for a, b in zip(cache, caches[0]))


def test_opcheck():
    args = make_inputs(2, 2, 4, 2, 16, 8, 3, torch.float32)
    torch.library.opcheck(torch.ops.hf_fused.rope_cache_write, (*args, 4, 2))


def _bad(**changes):
    qkv, cos, sin, keys, values, length = make_inputs(1, 1, 4, 2, 16, 8, 3, torch.float32)
    args = dict(qkv=qkv, cos=cos, sin=sin, keys=keys, values=values, length=length, num_heads=4, num_kv_heads=2)
    args.update({name: change(args) if callable(change) else change for name, change in changes.items()})
    return args


@pytest.mark.parametrize("args, match", [
    (_bad(qkv=lambda a: a["qkv"][0]), "qkv must be"),
    (_bad(values=lambda a: a["values"][:, :, :4]), "one shape"),
    (_bad(num_heads=6), "must hold 6 query heads"),
    (_bad(num_kv_heads=1), "and 1 key and value heads"),
    (_bad(keys=lambda a: a["keys"][:, :1], values=lambda a: a["values"][:, :1]), r"\(1, 2, 8, 16\)"),
    (_bad(cos=lambda a: a["cos"][..., :8]), "cos must be"),
    (_bad(sin=lambda a: torch.cat([a["sin"], a["sin"]], -1)[..., ::2]), "sin must be"),
    (_bad(length=lambda a: a["length"].int()), "length must be a 0-dim int64"),
    (_bad(keys=lambda a: a["keys"].half(), values=lambda a: a["values"].half()), "in qkv's dtype"),
    (_bad(cos=lambda a: a["cos"].double()), "cos must be on qkv's device in its dtype"),
    (_bad(qkv=lambda a: torch.cat([a["qkv"], a["qkv"]], -1)[..., ::2]), "qkv must be contiguous"),
    (_bad(values=lambda a: torch.cat([a["values"], a["values"]], -1)[..., ::2]), "contiguous in their last dimension"),
])
def test_bad_inputs_raise_and_write_nothing(args, match):
    before = args["keys"].clone(), args["values"].clone()
    with pytest.raises(ValueError, match=match):
        rope_cache_write(**args)
    if args["keys"].shape == before[0].shape and args["keys"].dtype == before[0].dtype:
        assert torch.equal(args["keys"], before[0])


def test_rotary_is_transformers_rotary():
    """Without a cache: q and k as apply_rotary_pos_emb gives them, within 2x its error in low precision."""
    for dtype in DTYPES:
        qkv, cos, sin, keys, values, length = make_inputs(2, 3, 6, 2, 16, 8, 0, dtype, cos_rows=1)
        q, k = rotary(qkv, cos, sin, num_heads=6, num_kv_heads=2)
        assert q.shape == (2, 3, 6, 16) and k.shape == (2, 3, 2, 16) and q.is_contiguous() and k.is_contiguous()
        exact_q, exact_k, _ = stock_rotary_and_update(*(t.cpu().double() for t in (qkv, cos, sin, keys, values)),
                                                      length.cpu(), 6, 2)
        torch_q, torch_k, _ = stock_rotary_and_update(qkv, cos, sin, keys, values, length, 6, 2)
        for got, exact, torch_out in ((q, exact_q, torch_q), (k, exact_k[:, :, :3].transpose(1, 2), torch_k[:, :, :3].transpose(1, 2))):
            kernel_err = (got.cpu().double() - exact).abs().max().item()
            torch_err = (torch_out.cpu().double() - exact).abs().max().item()
            assert kernel_err <= 2 * torch_err + ATOL[dtype], (dtype, kernel_err, torch_err)
        with torch.no_grad():
            want = torch.ops.hf_fused.rotary(qkv, cos, sin, 6, 2)
        assert all(torch.equal(a, b) for a, b in zip((q, k), want))
    torch.library.opcheck(torch.ops.hf_fused.rotary, (qkv.float(), cos.float(), sin.float(), 6, 2))
    with pytest.raises(ValueError, match="must hold 6 query heads and 3 key"):
        rotary(qkv, cos, sin, num_heads=6, num_kv_heads=3)


def spy_on_calls(monkeypatch, *, while_tracing: bool) -> list:
    """(op, fused q/k/v shape) of every rope_cache_write and rotary call the patched attention makes,
    and, with ``while_tracing``, of every one that Dynamo traces into a graph."""
    seen = []

    def spy(qkv, *args, name, op, **kwargs):
        if while_tracing or not torch.compiler.is_compiling():
            seen.append((name, tuple(qkv.shape)))
        return op(qkv, *args, **kwargs)

    for name in ("rope_cache_write", "rotary"):
        monkeypatch.setattr(patch_module, name, functools.partial(spy, name=name, op=getattr(patch_module, name)))
    return seen


@pytest.fixture
def calls(monkeypatch):
    return spy_on_calls(monkeypatch, while_tracing=True)


@pytest.fixture
def eager_calls(monkeypatch):
    # For generate, which compiles static-cache steps on the GPU: a spy traced there would guard
    # the graph on the list's length, and every step would recompile.
    return spy_on_calls(monkeypatch, while_tracing=False)


def tiny():
    return build_random_model("tiny-llama", torch.float32, DEVICE, std=0.2)


@pytest.mark.parametrize("fuse, left_pad", [(ROPE, False), (EVERY, True)], ids=["rope", "every-left-padded"])
def test_static_generate_matches_stock(fuse, left_pad, eager_calls):
    stock = tiny()
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=fuse)
    assert all(isinstance(layer.self_attn, RopeCacheAttention) for layer in model.model.layers)
    ids = torch.randint(3, 256, (2, 7), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    if left_pad:
        ids[0, :3], mask[0, :3] = 0, 0
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
    qkv_width = 4 * 16 + 2 * 2 * 16
    # The 7-token prefill rotates (its cache layer is not yet allocated), then 5 decode steps,
    # 2 layers each: over the dynamic cache they rotate and the cache concatenates; over the
    # static cache one kernel rotates and writes (on the GPU from generate's compiled graph).
    prefill = [("rotary", (2, 7, qkv_width))] * 2
    for extra, op in (({}, "rotary"), ({"cache_implementation": "static"}, "rope_cache_write")):
        want = stock.generate(ids, **kwargs, **extra)
        eager_calls.clear()
        assert torch.equal(model.generate(ids, **kwargs, **extra), want), extra
        if DEVICE == "cpu":
            assert eager_calls == prefill + [(op, (2, 1, qkv_width))] * 5 * 2, extra
    assert torch.equal(generation.generate(model, ids, 6, attention_mask=mask), want)


def test_a_few_tokens_over_a_filled_cache_match_stock(calls):
    """Four tokens at once after a prefill (a speculative step), and the cache they leave."""
    stock = tiny()
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=ROPE)
    ids = torch.randint(3, 256, (2, 11), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out, caches = [], []
    for m in (stock, model):
        cache = StaticCache(config=m.config, max_cache_len=16)
        with torch.no_grad():
            m(input_ids=ids[:, :7], use_cache=True, **{generation._cache_kwarg(m): cache})
            positions = torch.arange(7, 11, device=DEVICE).expand(2, 4)
            out.append(m(input_ids=ids[:, 7:], position_ids=positions, use_cache=True,
                         **{generation._cache_kwarg(m): cache}).logits)
        caches.append(cache)
    torch.testing.assert_close(out[1], out[0], rtol=1e-4, atol=1e-5)
    # The fused q/k/v GEMM sums in another order than F.linear: the cache matches to fp32 rounding.
    for stock_layer, layer in zip(caches[0].layers, caches[1].layers):
        torch.testing.assert_close(layer.keys, stock_layer.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(layer.values, stock_layer.values, rtol=1e-4, atol=1e-5)
        assert int(layer.cumulative_length) == int(stock_layer.cumulative_length) == 11
    assert calls == [("rotary", (2, 7, 4 * 16 + 2 * 2 * 16))] * 2 + [("rope_cache_write", (2, 4, 4 * 16 + 2 * 2 * 16))] * 2


# inductor: the op mutates the cache buffers, which Inductor functionalizes (on CPU it compiles
# the op's reference; on the GPU, the kernel).
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_decode_step_has_no_graph_break(backend, calls):
    assert_compiled_step_matches_stock(ROPE, backend)
    assert ("rope_cache_write", (2, 1, 4 * 16 + 2 * 2 * 16)) in calls  # traced into the graph, not left to the stock forward


@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma"])
def test_other_attentions_keep_their_forward(family, caplog):
    """Only Llama's attention forward is computed by the op; the others are logged and left stock."""
    stock = build(family)
    with caplog.at_level(logging.WARNING, logger="hf_fused"):
        model = hf_fused.patch_model(copy.deepcopy(stock), fuse=ROPE)
    assert not any(isinstance(m, RopeCacheAttention) for m in model.modules())
    assert "forward is not one that hf_fused computes" in caplog.text
    ids, mask = prompt()
    torch.testing.assert_close(logits(model, ids, mask), logits(stock, ids, mask), rtol=1e-5, atol=1e-5)


def test_unpatch_copies_and_pickles(tmp_path):
    stock = tiny()
    keys = list(stock.state_dict())
    attention_class = type(stock.model.layers[0].self_attn)
    model = hf_fused.patch_model(copy.deepcopy(stock), fuse=EVERY)
    assert list(model.state_dict()) == keys
    torch.save(model, tmp_path / "model.pt")
    for clone in (copy.deepcopy(model), torch.load(tmp_path / "model.pt", weights_only=False),
                  pickle.loads(pickle.dumps(model))):
        assert all(isinstance(layer.self_attn, RopeCacheAttention) for layer in clone.model.layers)
        hf_fused.unpatch_model(clone)
        assert all(type(layer.self_attn) is attention_class for layer in clone.model.layers)
    hf_fused.unpatch_model(model)
    assert all(type(layer.self_attn) is attention_class for layer in model.model.layers)
    assert list(model.state_dict()) == keys


def test_rope_needs_the_qkv_fusion():
    model = tiny()
    with pytest.raises(ValueError, match="must include 'qkv'"):
        hf_fused.patch_model(model, fuse=("mlp", "rope"))
    assert not hf_fused.is_patched(model)


# The Llama-3-8B attention shape (32 query, 8 key/value heads of 128) over a 4096-token cache.
@requires_cuda
@pytest.mark.parametrize("B, M", [(1, 1), (4, 1), (2, 4)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_accuracy_llama3_8b_shape(dtype, B, M):
    qkv, cos, sin, keys, values, L = make_inputs(B, M, 32, 8, 128, 4096, 4000, dtype)
    k_before, v_before = keys.clone(), values.clone()
    q = rope_cache_write(qkv, cos, sin, keys, values, L, num_heads=32, num_kv_heads=8)
    exact_q, exact_k, exact_v = stock_rotary_and_update(*(t.double() for t in (qkv, cos, sin, k_before, v_before)), L, 32, 8)
    torch_q, torch_k, _ = stock_rotary_and_update(qkv, cos, sin, k_before, v_before, L, 32, 8)
    for got, exact, torch_out in ((q, exact_q, torch_q), (keys, exact_k, torch_k)):
        kernel_err = (got.double() - exact).abs().max().item()
        torch_err = (torch_out.double() - exact).abs().max().item()
        assert kernel_err <= 2 * torch_err + ATOL[dtype], f"kernel err {kernel_err:.3g}, PyTorch err {torch_err:.3g}"
    assert torch.equal(values, exact_v.to(dtype))
