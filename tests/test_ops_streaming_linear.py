"""The streaming linear op against F.linear.

On a machine without CUDA these run the Triton kernel in Triton's interpreter (see conftest.py);
on a GPU they run the compiled kernel, at real model sizes too.
"""

import importlib

import pytest
import torch
import torch.nn.functional as F

from hf_fused.ops import streaming_linear
from test_ops import ATOL, DEVICE, DTYPES, requires_cuda

# The package exports a function of the same name, which shadows the module as an attribute.
op_module = importlib.import_module("hf_fused.ops.streaming_linear")
common = importlib.import_module("hf_fused.ops._common")


def make_inputs(M, K, N, dtype, *, bias=False, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 3
    weight = torch.randn(N, K, generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) if bias else None
    to = dict(dtype=dtype, device=device)
    return x.to(**to), weight.to(**to), None if b is None else b.to(**to)


def assert_close_to_reference(y, x, weight, bias, residual=None):
    """The rule from flash-attention's tests: at most 2x PyTorch's own error, plus a small atol."""
    exact = F.linear(x.cpu().double(), weight.cpu().double(), None if bias is None else bias.cpu().double())
    torch_out = F.linear(x, weight, bias)
    if residual is not None:  # as the stock decoder layer adds it
        exact, torch_out = exact + residual.cpu().double(), residual + torch_out
    assert y.shape == torch_out.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    kernel_err = (y.cpu().double() - exact).abs().max().item()
    torch_err = (torch_out.cpu().double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + ATOL[x.dtype], f"kernel err {kernel_err:.3g}, PyTorch err {torch_err:.3g}"


# One token streams; more go to F.linear. K=1100 spans three 512-wide tiles, the last one partial;
# N=37 and K=100 are not powers of two.
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("N, K", [(37, 100), (96, 1100)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_accuracy(M, N, K, bias, dtype):
    x, weight, b = make_inputs(M, K, N, dtype, bias=bias, seed=M + K)
    assert_close_to_reference(streaming_linear(x, weight, b), x, weight, b)


@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_is_added(M, dtype):
    """A decoder layer's residual add, in the kernel's epilogue at one token."""
    x, weight, b = make_inputs(M, 1100, 96, dtype, bias=True, seed=M)
    residual = (10 * torch.randn(M, 96, generator=torch.Generator().manual_seed(5))).to(x)
    assert_close_to_reference(streaming_linear(x, weight, b, residual), x, weight, b, residual)
    assert_close_to_reference(streaming_linear(x[None], weight, None, residual[None])[0], x, weight, None, residual)


# The tensor-core path for a few tokens (multi_token="stream"), with and without bias and
# residual; on the GPU also at the Llama-3-8B o_proj and down_proj shapes. x's rows 3 apart.
@pytest.mark.parametrize("N, K", [(37, 100), (96, 1100)] + ([(4096, 4096), (4096, 14336)] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("M", [2, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias, residual", [(False, False), (True, True)])
def test_tensor_core_stream_for_a_few_tokens(bias, residual, dtype, M, N, K):
    x, weight, b = make_inputs(3 * M, K, N, dtype, bias=bias, seed=M + K)
    x = x[::3]
    r = (10 * torch.randn(M, N, generator=torch.Generator().manual_seed(7))).to(x) if residual else None
    y = op_module.streaming_linear_2d(x, weight, b, r, multi_token="stream")
    assert_close_to_reference(y, x, weight, b, r)


def test_the_stream_path_leaves_fp32_and_many_tokens_to_cublas(monkeypatch):
    calls = []
    monkeypatch.setattr(op_module, "launch_stream", lambda x, *args, **kwargs: calls.append(tuple(x.shape)))
    for M, dtype in [(4, torch.float32), (op_module.STREAM_MAX_M + 1, torch.bfloat16)]:
        x, weight, _ = make_inputs(M, 100, 37, dtype)
        op_module.streaming_linear_2d(x, weight, None, None, multi_token="stream")
    assert calls == []
    x, weight, _ = make_inputs(4, 100, 37, torch.bfloat16)
    op_module.streaming_linear_2d(x, weight, None, None, multi_token="stream")
    op_module.streaming_linear_2d(x, weight, None, None)
    assert calls == [(4, 100)], "the default leaves a few tokens to cuBLAS"


def test_one_token_runs_the_kernel(monkeypatch):
    """In the registered op (compiled code; eager calls are tests/test_eager_launch.py's), one
    token launches the streaming kernel with its own row split, more tokens F.linear."""
    launched = []
    monkeypatch.setattr(op_module, "launch_stream", lambda *args, **kw: launched.append(args[1].shape))
    x, weight, _ = make_inputs(1, 64, 96, torch.float32)
    torch.ops.hf_fused.streaming_linear(x, weight, None)
    torch.ops.hf_fused.streaming_linear(torch.cat([x, x]), weight, None)
    assert launched == ([torch.Size([96, 64])] if op_module.runs_triton(x) else [])


@pytest.mark.parametrize("rows_per_program", [1, 5, 64, None])
def test_row_splits(rows_per_program):
    """Every row split covers each output row exactly once, the last program's rows masked.
    (Triton's interpreter always takes an equal share per SM instead: see _decode_split.)"""
    x, weight, bias = make_inputs(1, 100, 37, torch.float16, bias=True)
    y = x.new_empty(37)
    config = op_module.StreamConfig(BLOCK_K=64, num_warps=4, rows_per_program=rows_per_program)
    if not op_module.runs_triton(x):
        pytest.skip("needs a GPU or Triton's interpreter")
    op_module.launch_stream(x, weight, bias, y, config)
    assert_close_to_reference(y[None], x, weight, bias)


@pytest.mark.parametrize("M", [1, 5])
def test_leading_dims_and_non_contiguous_x(M):
    wide, weight, bias = make_inputs(M, 128, 96, torch.float16, bias=True)
    weight = weight[:, :64].contiguous()
    x = wide[None, :, ::2]  # (1, M, 64), every other feature: a strided last dimension
    assert x.stride(-1) == 2
    y = streaming_linear(x, weight, bias)
    assert y.shape == (1, M, 96)
    assert_close_to_reference(y, x.contiguous(), weight, bias)


def test_zero_tokens():
    x, weight, _ = make_inputs(1, 64, 96, torch.float32)
    assert streaming_linear(x[:0], weight).shape == (0, 96)


def test_reference_path_without_triton(monkeypatch):
    """On CPU without the interpreter, the op is F.linear, bit for bit."""
    monkeypatch.setattr(common, "triton_interpreter_enabled", lambda: False)
    x, weight, bias = make_inputs(1, 64, 96, torch.bfloat16, bias=True, device="cpu")
    assert torch.equal(streaming_linear(x, weight, bias), F.linear(x, weight, bias))


BAD_INPUTS = [
    ("weight rows of the wrong length", dict(weight=torch.ones(96, 32)), "weight must have shape"),
    ("1-d weight", dict(weight=torch.ones(96)), "weight must have shape"),
    ("bias of the wrong length", dict(bias=torch.ones(95)), "bias must have shape"),
    ("dtype mismatch", dict(weight=torch.ones(96, 64, dtype=torch.float16)), "dtype"),
    ("integer input", dict(x=torch.ones(1, 64, dtype=torch.int32)), "float16, bfloat16 or float32"),
    ("K of 0", dict(x=torch.ones(1, 0), weight=torch.ones(96, 0)), "K"),
    ("devices differ", dict(bias=torch.ones(96, device="meta")), "device"),
    ("residual of the wrong shape", dict(residual=torch.ones(96)), "residual must have the output's shape"),
    ("residual of the wrong dtype", dict(residual=torch.ones(1, 96, dtype=torch.float16)), "dtype"),
    ("strided residual", dict(residual=torch.ones(1, 192)[:, ::2]), "residual must be contiguous"),
    ("residual for many tokens", dict(x=torch.ones(3, 64), residual=torch.ones(1, 96)), "residual must have"),
]


@pytest.mark.parametrize("case, override, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_value_error(case, override, message):
    args = dict(x=torch.ones(1, 64), weight=torch.ones(96, 64), bias=None, residual=None)
    args.update(override)
    with pytest.raises(ValueError, match=message):
        streaming_linear(**args)


@pytest.mark.parametrize("M", [1, 3])
def test_opcheck(M):
    x, weight, bias = make_inputs(M, 64, 96, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.hf_fused.streaming_linear, (x, weight, bias))
    torch.library.opcheck(torch.ops.hf_fused.streaming_linear, (x[None], weight, None))
    residual = torch.randn(M, 96, dtype=x.dtype, device=x.device)
    torch.library.opcheck(torch.ops.hf_fused.streaming_linear, (x, weight, None, residual))


def test_compiles_without_graph_break():
    x, weight, _ = make_inputs(1, 64, 96, torch.float32)
    fn = torch.compile(lambda x: streaming_linear(x, weight) * 2, fullgraph=True)
    torch.testing.assert_close(fn(x), 2 * streaming_linear(x, weight))


# ---- GPU only: the compiled kernel at real sizes, CUDA graphs ----

# o_proj and down_proj of each shape: (K, N).
REAL_SHAPES = {"llama3-8b/o_proj": (4096, 4096), "llama3-8b/down_proj": (14336, 4096),
               "llama3.2-1b/down_proj": (8192, 2048), "smollm2-135m/o_proj": (576, 576)}


@requires_cuda
@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_sizes_on_gpu(shape, dtype):
    K, N = REAL_SHAPES[shape]
    x, weight, _ = make_inputs(1, K, N, dtype, seed=K)
    assert_close_to_reference(streaming_linear(x, weight), x, weight, None)
    residual = torch.randn(1, N, device=x.device, dtype=dtype)
    assert_close_to_reference(streaming_linear(x, weight, None, residual), x, weight, None, residual)


@requires_cuda
def test_cuda_graph_capture():
    x, weight, bias = make_inputs(1, 512, 768, torch.bfloat16, bias=True)
    expected = streaming_linear(x, weight, bias)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = streaming_linear(static_x, weight, bias)
    static_y.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(static_y, expected, rtol=0, atol=0)
    static_x.mul_(-2)
    graph.replay()
    torch.testing.assert_close(static_y, streaming_linear(-2 * x, weight, bias), rtol=0, atol=0)
