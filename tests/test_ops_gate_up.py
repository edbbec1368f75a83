"""The fused RMSNorm+gate/up op against the unfused PyTorch computation.

On a machine without CUDA these run the Triton kernels in Triton's interpreter (see conftest.py);
on a GPU they run the compiled kernels, at real model sizes too.
"""

import importlib

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.gemma.modeling_gemma import GemmaMLP, GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaConfig, LlamaMLP, LlamaRMSNorm

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_gate_up_ref
from test_ops import ATOL, DEVICE, DTYPES, EPS, requires_cuda

# The package exports a function of the same name, which shadows the module as an attribute.
op_module = importlib.import_module("hf_fused.ops.rmsnorm_gate_up")
common = importlib.import_module("hf_fused.ops._common")

ACTIVATIONS = ["silu", "gelu_tanh"]
HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}


def make_inputs(M, K, I, dtype, *, device=DEVICE, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=gen) * 3
    norm_weight = 1 + 0.5 * torch.randn(K, generator=gen)
    # Gate values of a few units, so that both activations are exercised off their linear range.
    gate_up_weight = 2 * torch.randn(2 * I, K, generator=gen) / K**0.5
    to = dict(dtype=dtype, device=device)
    return x.to(**to), norm_weight.to(**to), gate_up_weight.to(**to)


def assert_close_to_reference(y, x, norm_weight, gate_up_weight, norm_style, activation):
    """The rule from flash-attention's tests: at most 2x PyTorch's own error, plus a small atol."""
    kwargs = dict(eps=EPS, norm_style=norm_style, activation=activation)
    exact = rmsnorm_gate_up_ref(x.cpu(), norm_weight.cpu(), gate_up_weight.cpu(), upcast=True, **kwargs)
    torch_out = rmsnorm_gate_up_ref(x, norm_weight, gate_up_weight, **kwargs)
    assert y.shape == torch_out.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    kernel_err = (y.cpu().double() - exact).abs().max().item()
    torch_err = (torch_out.cpu().double() - exact).abs().max().item()
    assert kernel_err <= 2 * torch_err + ATOL[x.dtype], f"kernel err {kernel_err:.3g}, PyTorch err {torch_err:.3g}"


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("norm_style", ["llama", "gemma"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_is_transformers_norm_then_mlp_input(dtype, norm_style, activation):
    """The reference is what transformers' norm and gated MLP hand to down_proj, bit for bit."""
    config = LlamaConfig(hidden_size=64, intermediate_size=48, hidden_act=HF_ACT[activation])
    mlp = (LlamaMLP if norm_style == "llama" else GemmaMLP)(config).to(dtype)
    norm = LlamaRMSNorm(64, eps=EPS) if norm_style == "llama" else GemmaRMSNorm(64, eps=EPS)
    x, norm_weight, gate_up_weight = make_inputs(5, 64, 48, dtype, device="cpu")
    norm.weight.data = norm_weight.clone() if norm_style == "llama" else (norm_weight - 1).clone()
    mlp.gate_proj.weight.data, mlp.up_proj.weight.data = gate_up_weight.chunk(2)
    with torch.no_grad():
        h = norm.to(dtype)(x)
        expected = mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h)
    assert type(mlp.act_fn) is type(ACT2FN[HF_ACT[activation]])
    got = rmsnorm_gate_up_ref(x, norm.weight.data, gate_up_weight, eps=EPS, norm_style=norm_style, activation=activation)
    assert torch.equal(got, expected)


# M=1..64 takes the weight-streaming kernel (16 and up through tl.dot), larger M the split path.
# K=80 and I=104 are not powers of two.
@pytest.mark.parametrize("M", [1, 3, 16, 37, 100])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_style", ["llama", "gemma"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_kernel_accuracy(M, dtype, norm_style, activation):
    x, norm_weight, gate_up_weight = make_inputs(M, 80, 104, dtype, seed=M)
    y = rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps=EPS, norm_style=norm_style, activation=activation)
    assert_close_to_reference(y, x, norm_weight, gate_up_weight, norm_style, activation)


# The tensor-core path for a few tokens, which multi_token="stream" takes; on the GPU also at the
# Llama-3-8B and Gemma-2-2B shapes. x's rows 2 apart: the kernel takes x's strides.
@pytest.mark.parametrize("K, I", [(80, 104)] + ([(4096, 14336), (2304, 9216)] if torch.cuda.is_available() else []))
@pytest.mark.parametrize("M", [2, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("norm_style, activation", [("llama", "silu"), ("gemma", "gelu_tanh")])
def test_tensor_core_stream_for_a_few_tokens(norm_style, activation, dtype, M, K, I):
    x, norm_weight, gate_up_weight = make_inputs(2 * M, K, I, dtype, seed=M)
    x = x[::2]
    y = op_module.rmsnorm_gate_up_2d(x, norm_weight, gate_up_weight, EPS, norm_style == "gemma", activation,
                                     multi_token="stream")
    assert_close_to_reference(y, x, norm_weight, gate_up_weight, norm_style, activation)


def test_the_stream_path_leaves_fp32_and_many_tokens_to_the_split(monkeypatch):
    calls = []
    monkeypatch.setattr(op_module, "launch_decode", lambda *args, **kwargs: calls.append(args[0].shape))
    for M, dtype in [(4, torch.float32), (op_module.STREAM_MAX_M + 1, torch.bfloat16)]:
        x, norm_weight, gate_up_weight = make_inputs(M, 80, 104, dtype)
        op_module.rmsnorm_gate_up_2d(x, norm_weight, gate_up_weight, EPS, False, "silu", multi_token="stream")
    assert calls == []
    x, norm_weight, gate_up_weight = make_inputs(4, 80, 104, torch.bfloat16)
    op_module.rmsnorm_gate_up_2d(x, norm_weight, gate_up_weight, EPS, False, "silu", multi_token="stream")
    assert calls == [(4, 80)]


# numpy's exp warns where float32 overflows to inf, which is the intended path to -0.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activation_tails(activation):
    """Gate values far out on both sides: no inf or nan from the exp, -0 and identity limits as PyTorch."""
    K, I = 16, 8
    x = torch.ones(1, K, device=DEVICE)
    gate_up_weight = torch.zeros(2 * I, K, device=DEVICE)
    # Gate rows give g = 16 * scale (x normalizes to ones); up rows give u = 1.
    gate_up_weight[:I] = torch.tensor([-100.0, -20.0, -5.0, -0.5, 0.0, 0.5, 5.0, 100.0], device=DEVICE)[:, None] / K
    gate_up_weight[I:] = 1.0 / K
    y = rmsnorm_gate_up(x, torch.ones(K, device=DEVICE), gate_up_weight, eps=0.0, activation=activation)
    want = rmsnorm_gate_up_ref(x, torch.ones(K, device=DEVICE), gate_up_weight, eps=0.0, activation=activation)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("M", [1, 70])
def test_leading_dims_and_non_contiguous_x(M):
    x, norm_weight, gate_up_weight = make_inputs(2 * M * 2, 64, 48, torch.float16)
    # A (2, M, 64) view whose rows are 128 elements apart, as a slice of a wider activation is.
    strided = x.view(2, M, 128)[..., :64]
    assert not strided.is_contiguous()
    y = rmsnorm_gate_up(strided, norm_weight, gate_up_weight, eps=EPS)
    assert y.shape == (2, M, 48)
    torch.testing.assert_close(y, rmsnorm_gate_up(strided.contiguous(), norm_weight, gate_up_weight, eps=EPS),
                               rtol=0, atol=0)


def test_zero_tokens():
    x, norm_weight, gate_up_weight = make_inputs(1, 64, 48, torch.float32)
    assert rmsnorm_gate_up(x[:0], norm_weight, gate_up_weight, eps=EPS).shape == (0, 48)


def test_reference_path_without_triton(monkeypatch):
    """On CPU without the interpreter, the op is the plain PyTorch computation, bit for bit."""
    monkeypatch.setattr(common, "triton_interpreter_enabled", lambda: False)
    x, norm_weight, gate_up_weight = make_inputs(7, 64, 48, torch.bfloat16, device="cpu")
    kwargs = dict(eps=EPS, norm_style="gemma", activation="gelu_tanh")
    y = rmsnorm_gate_up(x, norm_weight, gate_up_weight, **kwargs)
    assert torch.equal(y, rmsnorm_gate_up_ref(x, norm_weight, gate_up_weight, **kwargs))


BAD_INPUTS = [
    ("x has K=64, norm weight 32", dict(norm_weight=torch.ones(32)), "norm_weight must have shape"),
    ("weight rows of the wrong length", dict(gate_up_weight=torch.ones(96, 32)), "gate_up_weight must have shape"),
    ("odd number of weight rows", dict(gate_up_weight=torch.ones(95, 64)), r"gate_up_weight must have shape \(2I"),
    ("no weight rows", dict(gate_up_weight=torch.ones(0, 64)), "gate_up_weight must have shape"),
    ("1-d weight", dict(gate_up_weight=torch.ones(96)), "gate_up_weight must have shape"),
    ("dtype mismatch", dict(gate_up_weight=torch.ones(96, 64, dtype=torch.float16)), "dtype"),
    ("integer input", dict(x=torch.ones(4, 64, dtype=torch.int32)), "float16, bfloat16 or float32"),
    ("K of 0", dict(x=torch.ones(4, 0), norm_weight=torch.ones(0), gate_up_weight=torch.ones(96, 0)), "K"),
    ("unknown norm style", dict(norm_style="layernorm"), "norm_style"),
    ("unknown activation", dict(activation="gelu"), "activation must be one of"),
    ("devices differ", dict(gate_up_weight=torch.ones(96, 64, device="meta")), "device"),
]


@pytest.mark.parametrize("case, override, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_clear_value_error(case, override, message):
    args = dict(x=torch.ones(4, 64), norm_weight=torch.ones(64), gate_up_weight=torch.ones(96, 64))
    args.update(override)
    with pytest.raises(ValueError, match=message):
        rmsnorm_gate_up(args.pop("x"), args.pop("norm_weight"), args.pop("gate_up_weight"), eps=EPS, **args)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gemma", [False, True])
def test_opcheck(gemma, activation):
    x, norm_weight, gate_up_weight = make_inputs(3, 64, 48, torch.float32)
    op = torch.ops.hf_fused.rmsnorm_gate_up
    torch.library.opcheck(op, (x, norm_weight, gate_up_weight, EPS, gemma, activation))
    torch.library.opcheck(op, (x[None], norm_weight, gate_up_weight, EPS, gemma, activation))


def test_compiles_without_graph_break():
    x, norm_weight, gate_up_weight = make_inputs(5, 64, 48, torch.float32)
    fn = torch.compile(lambda x: rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps=EPS) * 2, fullgraph=True)
    torch.testing.assert_close(fn(x), 2 * rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps=EPS))


# ---- GPU only: bf16 through the compiled kernels, real sizes, CUDA graphs ----

REAL_SHAPES = {"llama3-8b": (4096, 14336), "llama3.2-1b": (2048, 8192), "gemma2-2b": (2304, 9216)}


@requires_cuda
@pytest.mark.parametrize("M", [1, 4, 16, 64, 256, 2048])
@pytest.mark.parametrize("shape", REAL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_real_sizes_on_gpu(shape, M, dtype):
    K, I = REAL_SHAPES[shape]
    norm_style, activation = ("gemma", "gelu_tanh") if shape.startswith("gemma") else ("llama", "silu")
    x, norm_weight, gate_up_weight = make_inputs(M, K, I, dtype, seed=M)
    y = rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps=EPS, norm_style=norm_style, activation=activation)
    assert_close_to_reference(y, x, norm_weight, gate_up_weight, norm_style, activation)


@requires_cuda
@pytest.mark.parametrize("M", [1, 300])
def test_cuda_graph_capture(M):
    x, norm_weight, gate_up_weight = make_inputs(M, 512, 1024, torch.bfloat16)
    expected = rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps=EPS)
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = rmsnorm_gate_up(static_x, norm_weight, gate_up_weight, eps=EPS)
    static_y.fill_(float("nan"))
    graph.replay()
    torch.testing.assert_close(static_y, expected, rtol=0, atol=0)
    static_x.copy_(x.flip(0))
    graph.replay()
    torch.testing.assert_close(static_y, rmsnorm_gate_up(x.flip(0), norm_weight, gate_up_weight, eps=EPS),
                               rtol=0, atol=0)
