"""Eager decode calls skip the dispatcher and replay a resolved launch: the same output as the
registered op, resolved once per signature, and never used where autograd must record."""

from __future__ import annotations

import importlib

import pytest
import torch

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_qkv, streaming_linear

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
def test_pdl_chain_in_a_cuda_graph_matches_launches_without_it():
    """Two layers' weight kernels, each reading the one before's output, captured in one CUDA
    graph: launched with PDL they must give bit for bit what they give without it. A kernel
    that read its inputs before its wait would read the previous replay's values."""
    qkv_mod, gate_up_mod, linear_mod = (OP_MODULES[name] for name in ("rmsnorm_qkv", "rmsnorm_gate_up", "streaming_linear"))
    K, I, dtype = 4096, 14336, torch.bfloat16
    generator = torch.Generator().manual_seed(0)

    def rand(*size, scale=1.0):
        return (torch.randn(*size, generator=generator) * scale).to(DEVICE, dtype)

    x = rand(1, K)
    layers = [dict(norm=rand(K, scale=0.1) + 1, w_qkv=rand(6144, K, scale=K**-0.5), w_o=rand(K, K, scale=K**-0.5),
                   w_gu=rand(2 * I, K, scale=K**-0.5), w_down=rand(K, I, scale=I**-0.5)) for _ in range(2)]

    def chain(pdl: bool) -> tuple[list, list]:
        launches, outs, h_in = [], [], x
        for layer in layers:
            qkv, h, act, out = (torch.empty(n, device=DEVICE, dtype=dtype) for n in (6144, K, I, K))
            steps = [
                (qkv_mod._rmsnorm_qkv_decode_kernel,
                 qkv_mod.decode_launch(h_in, layer["norm"], layer["w_qkv"], None, qkv.view(1, -1), EPS, False, pdl=pdl)),
                (linear_mod._streaming_linear_kernel,
                 linear_mod.stream_launch(qkv[:K], layer["w_o"], None, h, residual=h_in.view(-1), pdl=pdl)),
                (gate_up_mod._rmsnorm_gate_up_decode_kernel,
                 gate_up_mod.decode_launch(h.view(1, K), layer["norm"], layer["w_gu"], act.view(1, -1), EPS, False,
                                           "silu", pdl=pdl)),
                (linear_mod._streaming_linear_kernel,
                 linear_mod.stream_launch(act, layer["w_down"], None, out, residual=h, pdl=pdl)),
            ]
            launches += [(kernel, *launch) for kernel, launch in steps]
            outs += [qkv, h, act, out]
            h_in = out.view(1, K)
        return launches, outs

    def run(pdl: bool, replays: int = 3) -> list[list]:
        launches, outs = chain(pdl)
        assert all(bool(meta.get("launch_pdl")) == pdl for _, _, _, meta in launches)

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
            results.append([buffer.clone() for buffer in outs])
        return results

    want = run(False, replays=1)[0]
    assert not any(buffer.isnan().any() for buffer in want)
    for replay in run(True):
        for got, expected in zip(replay, want):
            assert torch.equal(got, expected)


def test_the_launch_ops_pass_opcheck():
    """Each launch op's fake (what torch.compile traces) agrees with what it runs."""
    K, N = SHAPES[0]
    x, norm_weight, weight, bias = operands(K, N, torch.bfloat16, bias=True)
    torch.library.opcheck(torch.ops.hf_fused.rmsnorm_qkv_launch, (x, norm_weight, weight, bias, EPS, "llama"))
    torch.library.opcheck(torch.ops.hf_fused.rmsnorm_gate_up_launch, (x, norm_weight, weight, EPS, "gemma", "silu"))
    residual = torch.randn(1, 1, N, device=DEVICE, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.hf_fused.streaming_linear_launch, (x, weight, bias, residual))
