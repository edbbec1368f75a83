"""The fused RMSNorm+QKV op against the unfused PyTorch computation.

On a machine without CUDA these run the Triton kernels in Triton's interpreter (see conftest.py);
on a GPU they run the compiled kernels, at real model sizes too.
"""

import importlib
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from hf_fused.ops import rmsnorm_qkv, rmsnorm_qkv_ref

# The package exports a function of the same name, which shadows the module as an attribute.
op_module = importlib.import_module("hf_fused.ops.rmsnorm_qkv")
common = importlib.import_module("hf_fused.ops._common")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Added to 2x PyTorch's own error: about one unit in the last place at the outputs' scale for
# 16-bit types; for fp32, room for a K-long sequential sum where cuBLAS sums in a tree.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def make_inputs(M, K, N, dtype, *, bias=False, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 3
    norm_weight = 1 + 0.5 * torch.randn(K, generator=gen)
    qkv_weight = torch.randn(N, K, generator=gen) / K**0.5
    b = torch.randn(N, generator=gen) if bias else None
    to = dict(dtype=dtype, device=device)
    return x.to(**to), norm_weight.to(**to), qkv_weight.to(**to), None if b is None else b.to(**to)


def assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, norm_style):
    """The rule from flash-attention's tests: at most 2x PyTorch's own error, plus a small atol."""
    kwargs = dict(eps=EPS, norm_style=norm_style)
    exact = rmsnorm_qkv_ref(x.cpu(), norm_weight.cpu(), qkv_weight.cpu(), None if bias is None else bias.cpu(),
                            upcast=True, **kwargs)
    torch_out = rmsnorm_qkv_ref(x, norm_weight, qkv_weight, bias, **kwargs)
    assert y.shape == torch_out.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    kernel_err = (y.cpu().double() - exact).abs().max().item()
    torch_err = (torch_out.cpu().double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + ATOL[x.dtype], f"kernel err {kernel_err:.3g}, PyTorch err {torch_err:.3g}"


@pytest.mark.parametrize("norm_style", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_norm_then_linear(dtype, norm_style):
    x, norm_weight, qkv_weight, bias = make_inputs(5, 64, 48, dtype, bias=True, device="cpu")
    norm = LlamaRMSNorm(64, eps=EPS) if norm_style == "llama" else GemmaRMSNorm(64, eps=EPS)
    norm.weight.data = norm_weight.clone() if norm_style == "llama" else (norm_weight - 1).clone()
    with torch.no_grad():
        expected = F.linear(norm.to(dtype)(x), qkv_weight, bias)
    nw = norm.weight.data
    assert torch.equal(rmsnorm_qkv_ref(x, nw, qkv_weight, bias, eps=EPS, norm_style=norm_style), expected)


# M=1..64 takes the weight-streaming kernel (16 and up through tl.dot), larger M the tiled GEMM.
# K=80 and N=48+... mimic head_dim 80 and GQA row counts that are not powers of two.
@pytest.mark.parametrize("M", [1, 3, 16, 37, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_style", ["llama", "gemma"])
def test_kernel_accuracy(M, dtype, norm_style):
    x, norm_weight, qkv_weight, _ = make_inputs(M, 80, 208, dtype, seed=M)
    y = rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS, norm_style=norm_style)
    assert_close_to_reference(y, x, norm_weight, qkv_weight, None, norm_style)


# On the GPU also the Llama-3-8B shape, where the tensor-core tiles are the ones decode_config picks.
@pytest.mark.parametrize("K, N", [(80, 208)] + ([(4096, 6144)] if CUDA else []))
@pytest.mark.parametrize("M", [3, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tokens_as_rows, norm_stages", [(False, 1), (True, 1), (True, 3)])
def test_tensor_core_decode_in_both_orientations(tokens_as_rows, norm_stages, dtype, M, K, N):
    x, norm_weight, qkv_weight, bias = make_inputs(M, K, N, dtype, bias=True, seed=M)
    config = replace(op_module.decode_config(M, N, K, torch.device(DEVICE)), tokens_as_rows=tokens_as_rows,
                     NORM_STAGES=norm_stages)
    if norm_stages > 1:  # several blocks for the pipelined reduction to take, the last one partial
        config = replace(config, NORM_BLOCK_K=min(config.NORM_BLOCK_K, 32))
    y = x.new_empty(M, N)
    op_module.launch_decode(x, norm_weight, qkv_weight, bias, y, EPS, False, config)
    assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, "llama")


@pytest.mark.parametrize("prefill", op_module.PREFILL_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_style", ["llama", "gemma"])
def test_prefill_paths(prefill, dtype, norm_style):
    x, norm_weight, qkv_weight, bias = make_inputs(100, 80, 208, dtype, bias=True)
    y = op_module.rmsnorm_qkv_2d(x, norm_weight, qkv_weight, bias, EPS, norm_style == "gemma", prefill=prefill)
    assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, norm_style)


@pytest.mark.parametrize("norm_style", ["llama", "gemma"])
def test_tma_prefill_runs_its_kernel(monkeypatch, norm_style):
    # More row and column tiles than the interpreter's three programs, with partial last tiles
    # in M, N and K: the persistent loop and TMA's zero padding both count.
    x, norm_weight, qkv_weight, bias = make_inputs(130, 80, 264, torch.bfloat16, bias=True)
    assert op_module.tma_applies(x, qkv_weight)
    launched, launch_tma = [], op_module.launch_tma

    def spy(*args):
        launched.append(args)
        launch_tma(*args)

    monkeypatch.setattr(op_module, "launch_tma", spy)
    y = op_module.rmsnorm_qkv_2d(x, norm_weight, qkv_weight, bias, EPS, norm_style == "gemma", prefill="tma")
    assert len(launched) == 1
    assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, norm_style)

@pytest.mark.parametrize("M", [1, 4, op_module.DECODE_MAX_M])
def test_a_few_tokens_split_when_asked(monkeypatch, M):
    """multi_token="split" takes the norm pass and cuBLAS for 2 to DECODE_MAX_M tokens; one token
    streams whatever it says."""
    x, norm_weight, qkv_weight, bias = make_inputs(M, 80, 208, torch.bfloat16, bias=True)
    streamed, launch_decode = [], op_module.launch_decode

    def spy(*args, **kwargs):
        streamed.append(args[0].shape)
        launch_decode(*args, **kwargs)

    monkeypatch.setattr(op_module, "launch_decode", spy)
    y = op_module.rmsnorm_qkv_2d(x, norm_weight, qkv_weight, bias, EPS, False, multi_token="split")
    assert streamed == ([(1, 80)] if M == 1 else [])
    assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, "llama")


TMA_REFUSALS = [
    ("fp16 (x * w can overflow)", dict(dtype=torch.float16)),
    ("fp32", dict(dtype=torch.float32)),
    ("N not a multiple of 8", dict(N=100)),
    ("x rows not 16-byte aligned", dict(K=84)),
]


@pytest.mark.parametrize("case, override", TMA_REFUSALS, ids=[c[0] for c in TMA_REFUSALS])
def test_tma_prefill_falls_back_to_split(monkeypatch, case, override):
    shape = dict(K=80, N=208, dtype=torch.bfloat16) | override
    x, norm_weight, qkv_weight, _ = make_inputs(100, shape["K"], shape["N"], shape["dtype"])
    assert not op_module.tma_applies(x, qkv_weight)
    monkeypatch.setattr(op_module, "launch_tma", lambda *args: pytest.fail("launched the TMA kernel"))
    y = op_module.rmsnorm_qkv_2d(x, norm_weight, qkv_weight, None, EPS, False, prefill="tma")
    assert_close_to_reference(y, x, norm_weight, qkv_weight, None, "llama")


@pytest.mark.parametrize("M", [1, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias(M, dtype):
    x, norm_weight, qkv_weight, bias = make_inputs(M, 64, 96, dtype, bias=True)
    y = rmsnorm_qkv(x, norm_weight, qkv_weight, bias, eps=EPS)
    assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, "llama")


@pytest.mark.parametrize("M", [2, 70])
def test_smollm2_shape(M):
    x, norm_weight, qkv_weight, _ = make_inputs(M, 576, 960, torch.float16)
    y = rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS)
    assert_close_to_reference(y, x, norm_weight, qkv_weight, None, "llama")


@pytest.mark.parametrize("M", [1, 70])
def test_leading_dims_and_non_contiguous_x(M):
    x, norm_weight, qkv_weight, _ = make_inputs(2 * M * 2, 64, 96, torch.float16)
    # A (2, M, 64) view whose rows are 128 elements apart, as a slice of a wider activation is.
    wide = x.view(2, M, 128)
    strided = wide[..., :64]
    assert not strided.is_contiguous()
    y = rmsnorm_qkv(strided, norm_weight, qkv_weight, eps=EPS)
    assert y.shape == (2, M, 96)
    expected = rmsnorm_qkv(strided.contiguous(), norm_weight, qkv_weight, eps=EPS)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_zero_tokens():
    x, norm_weight, qkv_weight, _ = make_inputs(1, 64, 96, torch.float32)
    y = rmsnorm_qkv(x[:0], norm_weight, qkv_weight, eps=EPS)
    assert y.shape == (0, 96)


def test_reference_path_without_triton(monkeypatch):
    """On CPU without the interpreter, the op is the plain PyTorch computation, bit for bit."""
    monkeypatch.setattr(common, "triton_interpreter_enabled", lambda: False)
    x, norm_weight, qkv_weight, bias = make_inputs(7, 64, 96, torch.bfloat16, bias=True, device="cpu")
    y = rmsnorm_qkv(x, norm_weight, qkv_weight, bias, eps=EPS, norm_style="gemma")
    assert torch.equal(y, rmsnorm_qkv_ref(x, norm_weight, qkv_weight, bias, eps=EPS, norm_style="gemma"))


BAD_INPUTS = [
    ("x has K=64, norm weight 32", dict(norm_weight=torch.ones(32)), "norm_weight must have shape"),
    ("weight rows of the wrong length", dict(qkv_weight=torch.ones(96, 32)), "qkv_weight must have shape"),
    ("1-d weight", dict(qkv_weight=torch.ones(96)), "qkv_weight must have shape"),
    ("bias of the wrong length", dict(bias=torch.ones(95)), "bias must have shape"),
    ("dtype mismatch", dict(qkv_weight=torch.ones(96, 64, dtype=torch.float16)), "dtype"),
    ("integer input", dict(x=torch.ones(4, 64, dtype=torch.int32)), "float16, bfloat16 or float32"),
    ("K of 0", dict(x=torch.ones(4, 0), norm_weight=torch.ones(0), qkv_weight=torch.ones(96, 0)), "K"),
    ("unknown norm style", dict(norm_style="layernorm"), "norm_style"),
    ("devices differ", dict(norm_weight=torch.ones(64, device="meta")), "device"),
]


@pytest.mark.parametrize("case, override, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_value_error(case, override, message):
    args = dict(x=torch.ones(4, 64), norm_weight=torch.ones(64), qkv_weight=torch.ones(96, 64), bias=None,
                norm_style="llama")
    args.update(override)
    x = args.pop("x")
    with pytest.raises(ValueError, match=message):
        rmsnorm_qkv(x, args.pop("norm_weight"), args.pop("qkv_weight"), args.pop("bias"), eps=EPS, **args)


@pytest.mark.parametrize("gemma", [False, True])
def test_opcheck(gemma):
    x, norm_weight, qkv_weight, bias = make_inputs(3, 64, 96, torch.float32, bias=True)
    torch.library.opcheck(torch.ops.hf_fused.rmsnorm_qkv, (x, norm_weight, qkv_weight, bias, EPS, gemma))
    torch.library.opcheck(torch.ops.hf_fused.rmsnorm_qkv, (x[None], norm_weight, qkv_weight, None, EPS, gemma))


def test_compiles_without_graph_break():
    x, norm_weight, qkv_weight, _ = make_inputs(5, 64, 96, torch.float32)
    fn = torch.compile(lambda x: rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS) * 2, fullgraph=True)
    torch.testing.assert_close(fn(x), 2 * rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS))


# ---- GPU only: bf16 through the compiled kernels, real sizes, CUDA graphs ----

REAL_SHAPES = {"llama3-8b": (4096, 6144), "llama3.2-1b": (2048, 3072), "smollm2-135m": (576, 960)}


@requires_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 2048])
@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefill", op_module.PREFILL_PATHS)
def test_real_sizes_on_gpu(shape, M, dtype, prefill):
    K, N = REAL_SHAPES[shape]
    x, norm_weight, qkv_weight, bias = make_inputs(M, K, N, dtype, bias=shape == "llama3.2-1b", seed=M)
    y = op_module.rmsnorm_qkv_2d(x, norm_weight, qkv_weight, bias, EPS, False, prefill=prefill)
    assert_close_to_reference(y, x, norm_weight, qkv_weight, bias, "llama")


@requires_cuda
@pytest.mark.parametrize("M", [1, 300])
def test_cuda_graph_capture(M):
    x, norm_weight, qkv_weight, _ = make_inputs(M, 512, 768, torch.bfloat16)
    expected = rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = rmsnorm_qkv(static_x, norm_weight, qkv_weight, eps=EPS)
    static_y.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(static_y, expected, rtol=0, atol=0)
    static_x.copy_(x.flip(0))
    graph.replay()
    torch.testing.assert_close(static_y, rmsnorm_qkv(x.flip(0), norm_weight, qkv_weight, eps=EPS), rtol=0, atol=0)


@requires_cuda
def test_compile_reduce_overhead_on_gpu():
    x, norm_weight, qkv_weight, _ = make_inputs(1, 1024, 1536, torch.bfloat16)
    fn = torch.compile(lambda x: rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS), mode="reduce-overhead",
                       fullgraph=True)
    for _ in range(3):
        out = fn(x).clone()
    torch.testing.assert_close(out, rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS), rtol=0, atol=0)
