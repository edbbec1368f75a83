"""RMSNorm fused into a gated MLP's gate and up projections, the activation in the epilogue.

For x of shape (M, K), a norm weight w of shape (K,) and W = [Wg; Wu] of shape (2I, K):

    xn = RMSNorm(x)                      as rmsnorm_qkv: both styles, the same roundings
    g  = dtype(xn @ Wg.T)                fp32 accumulation, rounded as nn.Linear's output is
    u  = dtype(xn @ Wu.T)
    y  = dtype(dtype(act(g32)) * u32)    PyTorch's act_fn(gate) * up in the model dtype
    silu(g)      = g / (1 + exp(-g))
    gelu_tanh(g) = 0.5 g (1 + tanh(z)) = g * sigmoid(2z),  z = sqrt(2/pi) (g + 0.044715 g^3)

y (M, I) is what LlamaMLP, GemmaMLP and their kin hand to down_proj.

Paths, chosen by M:
- one token: weight streaming, as rmsnorm_qkv's one-token kernel. Each program streams the
  same rows of Wg and of Wu, so act(g) * u is formed in registers and neither g nor u reaches
  memory.
- 2 to STREAM_MAX_M tokens, multi_token="stream" (bf16 and fp16): the same kernel on tensor
  cores, the tokens as the tiles' rows (rmsnorm_qkv's DecodeConfig.tokens_as_rows).
- more tokens, and "split" (DEFAULT_MULTI_TOKEN): a Triton norm pass, cuBLAS on the concatenated
  [Wg; Wu], the activation in PyTorch. On an H100 an earlier tl.dot streaming kernel, with the
  transposed product (its tokens wgmma's shared-memory operand), lost to this from 4 tokens on:
  at 16 tokens on the Llama-3-8B shape it took 103 µs against 90 µs for the compiled norm + GEMM
  + activation (docs/bench_rmsnorm_gate_up.md), and a batch-4 decode ran 5% slower with it.
  "stream" stays off by default until a GPU has measured it against "split"
  (benchmarks/bench_rmsnorm_gate_up.py times both).

Launch parameters are rmsnorm_qkv's heuristic for the same weight bytes; on an H100 the
Llama-3-8B shape at M=1 runs at 90% of its bytes floor (docs/bench_rmsnorm_gate_up.md).
"""

from __future__ import annotations

import functools
from dataclasses import replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hf_fused.ops._autograd import register_reference_backward
from hf_fused.ops._common import (
    EagerLaunch,
    _await_inputs,
    _decode_split,
    _dot,
    _kernel_flags,
    _normalized_tile,
    _prefetch_rows,
    _round_to,
    _row_rstd,
    _weight_tile,
    cached_launch,
    check_inputs,
    compiled_launchable,
    eager_launchable,
    l2_prefetch_bytes,
    launch_norm,
    on_device_of,
    pdl_meta,
    pdl_supported,
    rmsnorm_ref,
    runs_triton,
    signature,
)
from hf_fused.ops.rmsnorm_qkv import DecodeConfig, decode_config

# transformers' ACT2FN["silu"] and ACT2FN["gelu_pytorch_tanh"] call exactly these.
ACTIVATIONS = {"silu": F.silu, "gelu_tanh": functools.partial(F.gelu, approximate="tanh")}
MULTI_TOKEN_PATHS = ("split", "stream")
DEFAULT_MULTI_TOKEN = "split"
STREAM_MAX_M = 16  # one 16-row tile of tokens


def rmsnorm_gate_up_ref(
    x: Tensor,
    norm_weight: Tensor,
    gate_up_weight: Tensor,
    *,
    eps: float,
    norm_style: str = "llama",
    activation: str = "silu",
    upcast: bool = False,
) -> Tensor:
    """The unfused computation, written as transformers writes it: norm, then
    ``act_fn(gate_proj(x)) * up_proj(x)``. With ``upcast=True`` it all runs in fp64: the accuracy reference."""
    if upcast:
        x, norm_weight, gate_up_weight = x.double(), norm_weight.double(), gate_up_weight.double()
    normed = rmsnorm_ref(x, norm_weight, eps=eps, norm_style=norm_style)
    gate_weight, up_weight = gate_up_weight.chunk(2)
    return ACTIVATIONS[activation](F.linear(normed, gate_weight)) * F.linear(normed, up_weight)


@triton.jit
def _activation(g, GELU: tl.constexpr):
    # fp32, as PyTorch's opmath. Triton has no tanh outside libdevice; 0.5 * (1 + tanh(z)) is
    # sigmoid(2z), which also avoids the cancellation in 1 + tanh(z) for negative z. For very
    # negative g, exp overflows to inf and the result is -0, as in PyTorch.
    if GELU:
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g / (1.0 + tl.exp(-2.0 * z))
    return g / (1.0 + tl.exp(-g))


@triton.jit
def _gated(acc_g, acc_u, dtype: tl.constexpr, GELU: tl.constexpr, INTERPRETED: tl.constexpr):
    """act(g) * u with every rounding of act_fn(gate_proj(x)) * up_proj(x) in ``dtype``."""
    g = _round_to(acc_g, dtype, INTERPRETED).to(tl.float32)
    u = _round_to(acc_u, dtype, INTERPRETED).to(tl.float32)
    a = _round_to(_activation(g, GELU), dtype, INTERPRETED).to(tl.float32)
    return _round_to(a * u, dtype, INTERPRETED)


@triton.jit
def _rmsnorm_gate_up_decode_kernel(
    x_ptr, norm_w_ptr, w_ptr, y_ptr,
    M, I, K, rows_per_program,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    eps: tl.constexpr,
    GEMMA: tl.constexpr, GELU: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK_K: tl.constexpr,
    NORM_STAGES: tl.constexpr, L2_PREFETCH_BYTES: tl.constexpr,
):
    # rmsnorm_qkv's weight-streaming kernel with two accumulators: output column n takes row n of
    # Wg and row I + n of Wu, so one program holds both halves of its outputs' inputs.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)
    offs_n = pid * rows_per_program + rows
    n_mask = (rows < rows_per_program) & (offs_n < I)
    wg_ptrs = w_ptr + offs_n[:, None] * stride_wn
    wu_ptrs = wg_ptrs + I * stride_wn
    if BLOCK_M == 1:
        # One token streams on CUDA cores, its weight double-buffered by hand (see rmsnorm_qkv's
        # kernel): the first tiles go out before the wait.
        wg_next = _weight_tile(wg_ptrs, 0, n_mask, K, stride_wk, BLOCK_K)
        wu_next = _weight_tile(wu_ptrs, 0, n_mask, K, stride_wk, BLOCK_K)
    n_rows = tl.minimum(rows_per_program, I - pid * rows_per_program)
    _prefetch_rows(w_ptr, pid * rows_per_program, n_rows, K, L2_PREFETCH_BYTES // 2)
    _prefetch_rows(w_ptr, I + pid * rows_per_program, n_rows, K, L2_PREFETCH_BYTES // 2)
    _await_inputs(PDL)
    rstd = _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, NORM_BLOCK_K, NORM_STAGES)
    if BLOCK_M == 1:
        # Multiply-adds into (BLOCK_N, BLOCK_K) accumulators, reduced across K once at the end.
        acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            wg, wu = wg_next, wu_next
            wg_next = _weight_tile(wg_ptrs, k0 + BLOCK_K, n_mask, K, stride_wk, BLOCK_K)
            wu_next = _weight_tile(wu_ptrs, k0 + BLOCK_K, n_mask, K, stride_wk, BLOCK_K)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA, INTERPRETED)
            xn = xn.to(tl.float32)
            acc_g += wg.to(tl.float32) * xn
            acc_u += wu.to(tl.float32) * xn
        y = _gated(tl.sum(acc_g, axis=1)[:, None], tl.sum(acc_u, axis=1)[:, None], y_ptr.dtype.element_ty, GELU,
                   INTERPRETED)
    else:
        # A few tokens: tensor cores, the tokens as the tiles' rows (rmsnorm_qkv's DecodeConfig
        # says why), both weight tiles through the pipelined copies.
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA, INTERPRETED)
            wg = _weight_tile(wg_ptrs, k0, n_mask, K, stride_wk, BLOCK_K)
            wu = _weight_tile(wu_ptrs, k0, n_mask, K, stride_wk, BLOCK_K)
            acc_g = _dot(xn, tl.trans(wg), acc_g, INTERPRETED, False)
            acc_u = _dot(xn, tl.trans(wu), acc_u, INTERPRETED, False)
        y = tl.trans(_gated(acc_g, acc_u, y_ptr.dtype.element_ty, GELU, INTERPRETED))
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, y, mask=n_mask[:, None] & (offs_m[None, :] < M))


def decode_launch(
    x, norm_weight, gate_up_weight, y, eps: float, gemma: bool, activation: str, config: DecodeConfig | None = None,
    pdl: bool = False, l2_prefetch: int | None = None,
) -> tuple[tuple[int], tuple, dict]:
    """The weight-streaming kernel's grid, runtime arguments (the four tensors first) and
    meta-parameters: x (M, K) with M <= STREAM_MAX_M, gate_up_weight (2I, K), y (M, I); ``pdl`` launches it with
    programmatic dependent launch (see pdl_meta); ``l2_prefetch`` bytes of each program's rows,
    half of Wg's and half of Wu's, are prefetched (see l2_prefetch_bytes; None: the default)."""
    M, K = x.shape
    I = gate_up_weight.shape[0] // 2
    if config is None:
        # rmsnorm_qkv's heuristic for the same weight bytes: each output row here streams two
        # weight rows, so a program takes half as many.
        config = decode_config(M, 2 * I, K, x.device)
        rows = config.rows_per_program
        config = replace(config, rows_per_program=None if rows is None else max(1, rows // 2))
    rows_per_program, block_n, grid = _decode_split(I, config.rows_per_program, config.BLOCK_M, x.device)
    args = (
        x, norm_weight, gate_up_weight, y,
        M, I, K, rows_per_program,
        x.stride(0), x.stride(1), gate_up_weight.stride(0), gate_up_weight.stride(1), y.stride(0), y.stride(1),
    )
    # Halves that _prefetch_rows can take: multiples of 16 bytes.
    prefetch = l2_prefetch_bytes(gate_up_weight, l2_prefetch) // 32 * 32
    meta = dict(eps=eps, GELU=activation == "gelu_tanh", BLOCK_N=block_n, L2_PREFETCH_BYTES=prefetch,
                **_kernel_flags(gemma, config), **pdl_meta(pdl))
    return (grid,), args, meta


def launch_decode(
    x, norm_weight, gate_up_weight, y, eps: float, gemma: bool, activation: str, config: DecodeConfig | None = None
) -> None:
    """The weight-streaming kernel: x (M, K) with M <= STREAM_MAX_M, gate_up_weight (2I, K), y (M, I)."""
    grid, args, meta = decode_launch(x, norm_weight, gate_up_weight, y, eps, gemma, activation, config)
    wrap_triton(_rmsnorm_gate_up_decode_kernel)[grid](*args, **meta)


def rmsnorm_gate_up_2d(
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, eps: float, gemma: bool, activation: str,
    multi_token: str = DEFAULT_MULTI_TOKEN,
) -> Tensor:
    """Dispatch by token count: x (M, K) -> (M, I). ``multi_token`` picks the path for
    2 <= M <= STREAM_MAX_M in bf16 and fp16 (see MULTI_TOKEN_PATHS); fp32 splits, as rmsnorm_qkv's
    several tokens do (streams_weights)."""
    M, K = x.shape
    I = gate_up_weight.shape[0] // 2
    streams = M <= 1 or (multi_token == "stream" and M <= STREAM_MAX_M and x.dtype != torch.float32)
    if streams:
        y = x.new_empty((M, I))
        if M > 0:
            launch_decode(x, norm_weight, gate_up_weight, y, eps, gemma, activation)
        return y
    normed = x.new_empty((M, K))
    launch_norm(x, norm_weight, normed, eps, gemma)
    gate, up = F.linear(normed, gate_up_weight).chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


# Traced, autograd and other eager calls go through the registered op, as rmsnorm_qkv's do.
@triton_op("hf_fused::rmsnorm_gate_up", mutates_args=())
def _rmsnorm_gate_up_op(
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, eps: float, gemma: bool, activation: str
) -> Tensor:
    if not runs_triton(x):
        norm_style = "gemma" if gemma else "llama"
        return rmsnorm_gate_up_ref(x, norm_weight, gate_up_weight, eps=eps, norm_style=norm_style, activation=activation)
    K = x.shape[-1]
    y = rmsnorm_gate_up_2d(x.reshape(-1, K), norm_weight, gate_up_weight, eps, gemma, activation)
    return y.view(*x.shape[:-1], gate_up_weight.shape[0] // 2)


def _check_inputs(x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, norm_style: str, activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    check_inputs(x, norm_weight, norm_style, gate_up_weight=gate_up_weight)
    K = x.shape[-1]
    shape = tuple(gate_up_weight.shape)
    if gate_up_weight.dim() != 2 or shape[1] != K or shape[0] == 0 or shape[0] % 2:
        raise ValueError(f"gate_up_weight must have shape (2I, {K}): [W_gate; W_up] over x's hidden size, got {shape}")


_EAGER_LAUNCHES: dict[tuple, EagerLaunch] = {}


def _eager_decode(
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, eps: float, norm_style: str, activation: str
) -> Tensor:
    """The one-token kernel launched from eager code, its launch resolved once per signature."""
    key = (signature(x, norm_weight, gate_up_weight), eps, norm_style, activation)
    out_shape = (*x.shape[:-1], gate_up_weight.shape[0] // 2)
    y = x.new_empty(out_shape)

    def build() -> EagerLaunch:
        _check_inputs(x, norm_weight, gate_up_weight, norm_style, activation)
        grid, args, meta = decode_launch(x.view(-1, x.shape[-1]), norm_weight, gate_up_weight,
                                         y.view(-1, out_shape[-1]), eps, norm_style == "gemma", activation,
                                         pdl=pdl_supported(x.device))
        return EagerLaunch(_rmsnorm_gate_up_decode_kernel, grid, args, meta, n_tensors=4)

    launch = cached_launch(_EAGER_LAUNCHES, key, build)
    with on_device_of(x):
        launch(x, norm_weight, gate_up_weight, y)
    return y


@torch.library.custom_op("hf_fused::rmsnorm_gate_up_launch", mutates_args=())
def _rmsnorm_gate_up_launch_op(
    x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, eps: float, norm_style: str, activation: str
) -> Tensor:
    """One token in compiled code, launched as eager code launches it (see compiled_launchable)."""
    return _eager_decode(x, norm_weight, gate_up_weight, eps, norm_style, activation)


@_rmsnorm_gate_up_launch_op.register_fake
def _(x: Tensor, norm_weight: Tensor, gate_up_weight: Tensor, eps: float, norm_style: str, activation: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], gate_up_weight.shape[0] // 2))


def rmsnorm_gate_up(
    x: Tensor,
    norm_weight: Tensor,
    gate_up_weight: Tensor,
    *,
    eps: float,
    norm_style: str = "llama",
    activation: str = "silu",
) -> Tensor:
    """RMSNorm of ``x``, its gate and up projections, and ``act(gate) * up``: a gated MLP's down_proj input.

    Args:
        x: (..., K) activations; any leading dims and strides.
        norm_weight: (K,) RMSNorm weight.
        gate_up_weight: (2I, K) the gate projection's weight, then the up projection's, stacked along rows.
        eps: the norm's epsilon.
        norm_style: "llama" (weight times the rounded normalized value) or "gemma" ((1 + weight), one rounding).
        activation: "silu" (Llama, Qwen, Mistral) or "gelu_tanh" (Gemma's gelu_pytorch_tanh).

    Returns:
        (..., I) in x's dtype. CUDA tensors run the Triton kernels; CPU tensors run the same
        math in PyTorch, or the kernels in Triton's interpreter when TRITON_INTERPRET=1.
    """
    one_token = x.is_contiguous() and x.numel() == x.shape[-1]
    if one_token and eager_launchable(x, norm_weight, gate_up_weight):
        return _eager_decode(x, norm_weight, gate_up_weight, eps, norm_style, activation)
    _check_inputs(x, norm_weight, gate_up_weight, norm_style, activation)
    if one_token and compiled_launchable(x, norm_weight, gate_up_weight):
        return torch.ops.hf_fused.rmsnorm_gate_up_launch(x, norm_weight, gate_up_weight, eps, norm_style, activation)
    with on_device_of(x):
        return torch.ops.hf_fused.rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps, norm_style == "gemma", activation)

register_reference_backward("hf_fused::rmsnorm_gate_up", lambda x, norm_weight, gate_up_weight, eps, gemma, activation: (
    rmsnorm_gate_up_ref(x, norm_weight, gate_up_weight, eps=eps, norm_style="gemma" if gemma else "llama",
                        activation=activation)))
