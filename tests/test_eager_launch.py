"""Eager decode calls skip the dispatcher and replay a resolved launch: the same output as the
registered op, resolved once per signature, and never used where autograd must record."""

from __future__ import annotations

import importlib

import pytest
import torch

from hf_fused.ops import decode_attention, rmsnorm_gate_up, rmsnorm_qkv, rope_cache_write, streaming_linear

# The package re-exports functions under the op modules' names.
OP_MODULES = {name: importlib.import_module(f"hf_fused.ops.{name}") for name in ("rmsnorm_qkv", "rmsnorm_gate_up", "streaming_linear")}
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
EPS = 1e-5
# (K, N): tiny under the interpreter, a real model's on the GPU.
SHAPES = [(4096, 6144)] if CUDA else [(64, 96)]


def operands(K: int, N: int, dtype: torch.dtype, M: int = 1, bias: bool = False):
    generator = torch.Generator().manual_seed(K + N + M)
    x = torch.randn(M, 1, K, generator=generator).to(DEVICE, dtype)
    norm_weight = (torch.rand(K, generator=generator) + 0.5).to(DEVICE, dtype)
    weight = (torch.randn(N, K, generator=generator) / K**0.5).to(DEVICE, dtype)
    b = torch.randn(N, generator=generator).to(DEVICE, dtype) if bias else None
    return x, norm_weight, weight, b


def calls(x, norm_weight, weight, bias):
    """Each op's eager call and its registered op, on the same operands."""
    return {
        "rmsnorm_qkv": (lambda: rmsnorm_qkv(x, norm_weight, weight, bias, eps=EPS),
                        lambda: torch.ops.hf_fused.rmsnorm_qkv(x, norm_weight, weight, bias, EPS, False)),
        "rmsnorm_gate_up": (lambda: rmsnorm_gate_up(x, norm_weight, weight, eps=EPS),
                            lambda: torch.ops.hf_fused.rmsnorm_gate_up(x, norm_weight, weight, EPS, False, "silu")),
        "streaming_linear": (lambda: streaming_linear(x, weight, bias),
                             lambda: torch.ops.hf_fused.streaming_linear(x, weight, bias)),
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("K, N", SHAPES)
@pytest.mark.parametrize("op", list(OP_MODULES))
def test_eager_launch_matches_the_registered_op(op, K, N, dtype):
    bias = op != "rmsnorm_gate_up"  # the gate/up op takes no bias
    eager, registered = calls(*operands(K, N, dtype, bias=bias))[op]
    launches = OP_MODULES[op]._EAGER_LAUNCHES
    with torch.no_grad():
        want = registered()
        before = len(launches)
        first, second = eager(), eager()
    # The first call resolved one launch (or found one an earlier test resolved); the second reused it.
    assert len(launches) in (before, before + 1)
    assert torch.equal(first, want) and torch.equal(second, want)


def test_a_new_signature_resolves_a_new_launch():
    launches = OP_MODULES["rmsnorm_qkv"]._EAGER_LAUNCHES
    K, N = SHAPES[0]
    with torch.no_grad():
        for dtype in (torch.float16, torch.bfloat16):
            x, norm_weight, weight, _ = operands(K, N, dtype)
            rmsnorm_qkv(x, norm_weight, weight, eps=EPS)
        keys = {key for key in launches if key[0][0][0] == x.shape}
        # One launch per dtype: a kernel compiled for one dtype never runs on another.
        assert {key[0][0][2] for key in keys} >= {torch.float16, torch.bfloat16}
        # A view at an odd element offset is not 16-byte aligned: its own launch, same result.
        wide = torch.randn(1, 1, K + 1, device=DEVICE, dtype=torch.bfloat16)
        shifted = wide[..., 1:]
        assert shifted.data_ptr() % 16 != 0
        got = rmsnorm_qkv(shifted, norm_weight.bfloat16(), weight.bfloat16(), eps=EPS)
        want = torch.ops.hf_fused.rmsnorm_qkv(shifted, norm_weight.bfloat16(), weight.bfloat16(), None, EPS, False)
    assert torch.equal(got, want)


@pytest.mark.skipif(not CUDA, reason="replays launch a compiled kernel; the interpreter has none")
def test_a_launch_hook_sees_every_replay():
    """Replays skip Triton's launch metadata while no hook listens; a profiler's hook, added after
    the launch was resolved, still sees each launch, and removing it changes no result."""
    from triton import knobs

    K, N = SHAPES[0]
    x, norm_weight, weight, _ = operands(K, N, torch.bfloat16)
    seen = []

    def hook(metadata):
        seen.append(metadata.get()["name"])

    with torch.no_grad():
        want = rmsnorm_qkv(x, norm_weight, weight, eps=EPS)  # resolves the launch, or finds it
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            hooked = [rmsnorm_qkv(x, norm_weight, weight, eps=EPS) for _ in range(3)]
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
        unhooked = rmsnorm_qkv(x, norm_weight, weight, eps=EPS)
    assert len(seen) == 3 and all("rmsnorm_qkv" in name for name in seen), seen
    assert all(torch.equal(y, want) for y in (*hooked, unhooked))


def test_autograd_takes_the_registered_op():
    K, N = SHAPES[0]
    x, norm_weight, weight, _ = operands(K, N, torch.float32)
    weight.requires_grad_()
    launches = OP_MODULES["rmsnorm_qkv"]._EAGER_LAUNCHES
    launches.clear()
    y = rmsnorm_qkv(x, norm_weight, weight, eps=EPS)
    assert not launches, "a call autograd must record took the eager launch"
    y.sum().backward()
    assert weight.grad is not None and weight.grad.shape == weight.shape


def test_eager_launch_checks_its_inputs_once_resolved_for_a_bad_signature():
    K, N = SHAPES[0]
    x, norm_weight, weight, _ = operands(K, N, torch.bfloat16)
    with torch.no_grad(), pytest.raises(ValueError, match="norm_weight must have shape"):
        rmsnorm_qkv(x, norm_weight[:-1], weight, eps=EPS)
    with torch.no_grad(), pytest.raises(ValueError, match="gate_up_weight must have shape"):
        rmsnorm_gate_up(x, norm_weight, weight[:-1], eps=EPS)


def test_the_launch_cache_keeps_the_newest_signatures(monkeypatch):
    """Signatures that vary without bound (the decode attention's key length over a dynamic
    cache) evict the oldest launches rather than grow the cache."""
    common = importlib.import_module("hf_fused.ops._common")
    monkeypatch.setattr(common, "MAX_CACHED_LAUNCHES", 3)
    cache, built = {}, []
    for key in range(5):
        common.cached_launch(cache, (key,), lambda key=key: built.append(key) or f"launch {key}")
    assert list(cache) == [(2,), (3,), (4,)] and built == [0, 1, 2, 3, 4]
    assert common.cached_launch(cache, (4,), lambda: "rebuilt") == "launch 4"


def graph_targets(fn, *args) -> tuple[list[str], object]:
    """The ops of the graph that torch.compile traces from fn, by name, and fn's output."""
    targets = []

    def backend(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm

    torch._dynamo.reset()
    out = torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return targets, out


@pytest.mark.parametrize("op", list(OP_MODULES))
def test_compiled_decode_calls_take_the_launch_op(op):
    """A traced one-token call takes the op's launch op (the eager launch, PDL included, behind an
    opaque op) and computes what the eager call does; a call autograd must record takes the
    registered op."""
    K, N = SHAPES[0]
    bias = op != "rmsnorm_gate_up"
    eager, _ = calls(*operands(K, N, torch.bfloat16, bias=bias))[op]
    with torch.no_grad():
        want = eager()
        targets, got = graph_targets(lambda: eager())
    assert f"hf_fused.{op}_launch" in targets, targets
    assert torch.equal(got, want)

    x, norm_weight, weight, b = operands(K, N, torch.bfloat16, bias=bias)
    weight.requires_grad_()
    targets, _ = graph_targets(lambda: calls(x, norm_weight, weight, b)[op][0]())
    assert f"hf_fused.{op}_launch" not in targets and f"hf_fused.{op}" in targets, targets


def attention_step_inputs(dtype: torch.dtype = torch.bfloat16, *, B: int = 1, M: int = 1, Hq: int = 4, Hkv: int = 2,
                          D: int = 16, S: int = 80, length: int = 37):
    """A fused q/k/v output, cos and sin, a static cache already holding other values, its length
    and a mask of its written positions: one decode step's inputs to the rotary and attention ops."""
    generator = torch.Generator().manual_seed(B + M + S)

    def rand(*size):
        return torch.randn(*size, generator=generator).to(DEVICE, dtype)

    angles = torch.rand(1, M, D // 2, generator=generator) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    mask = (torch.arange(S) < length + M).view(1, 1, 1, S).expand(1, 1, M, S).to(DEVICE)
    return (rand(B, M, (Hq + 2 * Hkv) * D), cos, sin, rand(B, Hkv, S, D), rand(B, Hkv, S, D),
            torch.tensor(length, device=DEVICE), mask, dict(num_heads=Hq, num_kv_heads=Hkv))


def test_compiled_cache_write_and_attention_take_their_launch_ops():
    """A traced decode step's rotary and cache write, and its attention, take their launch ops
    (which launch with PDL where it runs), and compute and write what the eager calls do."""
    qkv, cos, sin, keys, values, length, mask, heads = attention_step_inputs()

    def step(keys, values):
        q = rope_cache_write(qkv, cos, sin, keys, values, length, **heads)
        return decode_attention(q.transpose(1, 2), keys, values, mask, scaling=0.25)

    caches = [(keys.clone(), values.clone()) for _ in range(2)]
    with torch.no_grad():
        want = step(*caches[0])
        targets, got = graph_targets(step, *caches[1])
    assert "hf_fused.rope_cache_write_launch" in targets and "hf_fused.decode_attention_launch" in targets, targets
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(*caches)), "the compiled step wrote the cache otherwise"
    assert not torch.equal(caches[1][0], keys), "the compiled step did not write the cache"


def test_pdl_is_off_where_it_cannot_run(monkeypatch):
    common = importlib.import_module("hf_fused.ops._common")
    assert common.pdl_meta(False) == {"PDL": False}, "launch_pdl must not reach a launch without PDL"
    assert not common.pdl_supported(torch.device("cpu"))
    if CUDA:
        monkeypatch.setenv("HF_FUSED_PDL", "0")
        common.pdl_supported.cache_clear()
        try:
            assert not common.pdl_supported(torch.device("cuda", torch.cuda.current_device()))
        finally:
            monkeypatch.delenv("HF_FUSED_PDL")
            common.pdl_supported.cache_clear()


@pytest.mark.skipif(not CUDA or torch.cuda.get_device_capability()[0] < 9, reason="PDL needs a Hopper GPU or later")
def test_pdl_and_l2_prefetch_in_a_cuda_graph_match_launches_without_them():
    """Two Llama-3-8B layers' decode kernels, each reading what the one before wrote, captured in
    one CUDA graph: norm+qkv, rotary and cache write, attention (split and merge), o_proj,
    norm+gate/up, down_proj. Launched with PDL, with and without the weight kernels' L2
    prefetch, they must give bit for bit what they give without either. A kernel that read its
    inputs before its wait would read the previous replay's values, or the NaN its buffers are
    poisoned with before each replay."""
    qkv_mod, gate_up_mod, linear_mod = (OP_MODULES[name] for name in ("rmsnorm_qkv", "rmsnorm_gate_up", "streaming_linear"))
    attention_mod, rope_mod = (importlib.import_module(f"hf_fused.ops.{name}") for name in ("decode_attention", "rope_cache"))
    K, I, Hq, Hkv, D, S, length, dtype = 4096, 14336, 32, 8, 128, 384, 200, torch.bfloat16
    generator = torch.Generator().manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(DEVICE, dtype)

    x = rand(1, K)
    angles = torch.rand(1, 1, D // 2, generator=generator) * 6.3
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(DEVICE, dtype) for f in (torch.cos, torch.sin))
    position = torch.tensor(length, device=DEVICE)
    mask = (torch.arange(S, device=DEVICE) <= length).view(1, 1, 1, S)
    layers = [dict(norm=rand(K, scale=0.1) + 1, w_qkv=rand(6144, K, scale=K**-0.5), w_o=rand(K, K, scale=K**-0.5),
                   w_gu=rand(2 * I, K, scale=K**-0.5), w_down=rand(K, I, scale=I**-0.5)) for _ in range(2)]
    # The caches hold earlier tokens, which no replay changes; each replay writes position `length`.
    caches = [(rand(1, Hkv, S, D), rand(1, Hkv, S, D)) for _ in layers]

    def chain(pdl: bool, l2_prefetch: int) -> tuple[list, list]:
        launches, outs, h_in = [], [], x
        for layer, (keys, values) in zip(layers, caches):
            qkv, q, attn, h, act, out = (torch.empty(n, device=DEVICE, dtype=dtype) for n in (6144, K, K, K, I, K))
            attention = attention_mod.decode_launches(q.view(1, 1, Hq, D).transpose(1, 2), keys, values, mask, D**-0.5,
                                                      attn.view(1, 1, Hq, D), pdl=pdl)
            assert len(attention) == 2, "the chain must take the split attention and its merge"
            steps = [
                (qkv_mod._rmsnorm_qkv_decode_kernel,
                 *qkv_mod.decode_launch(h_in, layer["norm"], layer["w_qkv"], None, qkv.view(1, -1), EPS, False, pdl=pdl,
                                        l2_prefetch=l2_prefetch)),
                rope_mod.rope_launch(qkv.view(1, 1, -1), cos, sin, q.view(1, 1, Hq, D), keys, values, position,
                                     num_heads=Hq, num_kv_heads=Hkv, pdl=pdl)[:4],
                *(launch[:4] for launch in attention),
                (linear_mod._streaming_linear_kernel,
                 *linear_mod.stream_launch(attn, layer["w_o"], None, h, residual=h_in.view(-1), pdl=pdl,
                                           l2_prefetch=l2_prefetch)),
                (gate_up_mod._rmsnorm_gate_up_decode_kernel,
                 *gate_up_mod.decode_launch(h.view(1, K), layer["norm"], layer["w_gu"], act.view(1, -1), EPS, False,
                                            "silu", pdl=pdl, l2_prefetch=l2_prefetch)),
                (linear_mod._streaming_linear_kernel,
                 *linear_mod.stream_launch(act, layer["w_down"], None, out, residual=h, pdl=pdl,
                                           l2_prefetch=l2_prefetch)),
            ]
            launches += steps
            partials = [attention[0][2][i] for i in (4, 5, 6)]  # the split kernel's partial max, sum and accumulator
            outs += [qkv, q, *partials, attn, h, act, out]
            h_in = out.view(1, K)
        return launches, outs

    def run(pdl: bool, l2_prefetch: int, replays: int = 3) -> list[list]:
        launches, outs = chain(pdl, l2_prefetch)
        assert all(bool(meta.get("launch_pdl")) == pdl for _, _, _, meta in launches)
        assert sum(meta.get("L2_PREFETCH_BYTES", 0) > 0 for _, _, _, meta in launches) == (8 if l2_prefetch else 0)

        def step():
            for kernel, grid, args, meta in launches:
                kernel[grid](*args, **meta)

        step()  # compiles, outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        results = []
        for _ in range(replays):
            # Poisoned before each replay: an input read ahead of its producer reads NaN.
            for buffer in outs:
                buffer.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
            results.append([buffer.clone() for buffer in outs] + [c.clone() for cache in caches for c in cache])
        return results

    want = run(False, 0, replays=1)[0]
    assert not any(buffer.isnan().any() for buffer in want)
    prefetch = importlib.import_module("hf_fused.ops._common").l2_prefetch_default(torch.device(DEVICE))
    assert prefetch > 0, "a Hopper GPU has the bulk L2 prefetch"
    for pdl, l2_prefetch in [(True, 0), (True, prefetch), (False, prefetch)]:
        for replay in run(pdl, l2_prefetch):
            for got, expected in zip(replay, want):
                assert torch.equal(got, expected), f"pdl={pdl}, l2_prefetch={l2_prefetch}"


def test_the_launch_ops_pass_opcheck():
    """Each launch op's fake (what torch.compile traces) agrees with what it runs."""
    K, N = SHAPES[0]
    x, norm_weight, weight, bias = operands(K, N, torch.bfloat16, bias=True)
    torch.library.opcheck(torch.ops.hf_fused.rmsnorm_qkv_launch, (x, norm_weight, weight, bias, EPS, "llama"))
    torch.library.opcheck(torch.ops.hf_fused.rmsnorm_gate_up_launch, (x, norm_weight, weight, EPS, "gemma", "silu"))
    residual = torch.randn(1, 1, N, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.hf_fused.streaming_linear_launch, (x, weight, bias, residual))
    qkv, cos, sin, keys, values, length, mask, heads = attention_step_inputs()
    torch.library.opcheck(torch.ops.hf_fused.rope_cache_write_launch,
                          (qkv, cos, sin, keys, values, length, heads["num_heads"], heads["num_kv_heads"]))
    q = torch.randn(1, heads["num_heads"], 1, keys.shape[-1], device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.hf_fused.decode_attention_launch, (q, keys, values, mask, 0.25))
