"""RMSNorm fused into the QKV projection: one Triton kernel, one pass over the weight.

For x of shape (M, K), a norm weight w of shape (K,) and W = [Wq; Wk; Wv] of shape (N, K):

    rstd = rsqrt(mean(x32 ** 2) + eps)                    (per row, fp32)
    llama: xn = dtype(w * dtype(x32 * rstd))              two roundings, as LlamaRMSNorm
    gemma: xn = dtype(x32 * rstd * (1 + w32))             one rounding, as GemmaRMSNorm
    y = dtype(xn @ W.T + b)                               fp32 accumulation

The normalized activations never reach device memory: each program first reduces its rows
to rstd, then normalizes each K-chunk of x in registers right before it meets the weight.

Two kernels, chosen by M:
- decode (M <= DECODE_MAX_M): weight streaming. Cost is reading W once, so programs split N
  finely and pipeline their weight loads; the few token rows ride along in registers.
- prefill: a tiled tl.dot GEMM with grouped program order for L2 reuse.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op, wrap_triton

NORM_STYLES = ("llama", "gemma")
DECODE_MAX_M = 64


def rmsnorm_qkv_ref(
    x: Tensor,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    bias: Tensor | None = None,
    *,
    eps: float,
    norm_style: str = "llama",
    upcast: bool = False,
) -> Tensor:
    """The unfused computation, written exactly as transformers writes it.

    With ``upcast=True`` every input is taken to fp64 first: the accuracy reference.
    """
    if upcast:
        x, norm_weight, qkv_weight = x.double(), norm_weight.double(), qkv_weight.double()
        bias = None if bias is None else bias.double()
    dtype = x.dtype
    x32 = x.float() if not upcast else x
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if norm_style == "gemma":
        normed = (normed * (1.0 + norm_weight.to(normed.dtype))).to(dtype)
    else:
        normed = norm_weight * normed.to(dtype)
    return F.linear(normed, qkv_weight, bias)


@dataclass(frozen=True)
class KernelConfig:
    """Block sizes and launch parameters of one kernel launch."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8


def decode_config(M: int, N: int, K: int) -> KernelConfig:
    """Heuristic for the weight-streaming kernel, tuned on H100 (benchmarks/tune_rmsnorm_qkv.py).

    Token rows are padded to a power of two; from 16 rows on, the tile goes through tl.dot.
    BLOCK_N is kept small so that N / BLOCK_N programs cover the SMs more than once.
    """
    block_m = max(1, triton.next_power_of_2(M))
    block_n = 16 if N * K <= 4096 * 4096 else 32
    block_k = 256 if block_m <= 4 else 128
    return KernelConfig(block_m, block_n, block_k, num_warps=4, num_stages=4)


def prefill_config(M: int, N: int, K: int) -> KernelConfig:
    """Heuristic for the tiled GEMM kernel, tuned on H100 (benchmarks/tune_rmsnorm_qkv.py)."""
    if M <= 256:
        return KernelConfig(64, 64, 64, num_warps=4, num_stages=4)
    return KernelConfig(128, 128, 64, num_warps=8, num_stages=3)


@triton.jit
def _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """1/rms of each of the BLOCK_M rows, reduced in fp32 over all of K."""
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    return tl.math.rsqrt(sum_sq / K + eps)


@triton.jit
def _round_to(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 -> dtype with round-to-nearest-even, as the GPU and PyTorch do."""
    if INTERPRETED and dtype == tl.bfloat16:
        # Triton's CPU interpreter truncates fp32 -> bf16 (3.9). Round the bits ourselves; the
        # result is then exact in bf16 and the interpreter's truncation no longer matters.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _normalized_tile(
    x_ptr, w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr
):
    """x[offs_m, offs_k] normalized with the same roundings as transformers; zero outside."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
    w = tl.load(w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    normed = x.to(tl.float32) * rstd[:, None]
    if GEMMA:
        return _round_to(normed * (1.0 + w[None, :]), dtype, INTERPRETED)
    # Llama rounds the normalized value before the weight multiply, then rounds the product.
    normed = _round_to(normed, dtype, INTERPRETED).to(tl.float32)
    return _round_to(w[None, :] * normed, dtype, INTERPRETED)


@triton.jit
def _dot(a, b, acc, INTERPRETED: tl.constexpr, IEEE: tl.constexpr):
    # The interpreter also gets tl.dot on bf16 operands wrong (3.9); products of 16-bit
    # floats are exact in fp32, so upcasting there gives the tensor-core result.
    if INTERPRETED:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    # fp32 models must not silently drop to tf32: F.linear in fp32 doesn't.
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _rmsnorm_qkv_decode_kernel(
    x_ptr, norm_w_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    eps,
    HAS_BIAS: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Transposed product: acc[n, m] = sum_k W[n, k] * xn[m, k]. N is the long side here, so it
    # takes the tile's first dimension and the few token rows the second.
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rstd = _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA, INTERPRETED)
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk, mask=w_mask, other=0.0)
        if BLOCK_M >= 16:
            acc = _dot(w, tl.trans(xn), acc, INTERPRETED, IEEE)
        else:
            # tl.dot needs 16 rows; below that, a broadcast multiply-reduce on CUDA cores.
            acc += tl.sum(w.to(tl.float32)[:, None, :] * xn.to(tl.float32)[None, :, :], axis=2)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[:, None]
    y_mask = (offs_n[:, None] < N) & (offs_m[None, :] < M)
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, _round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=y_mask)


@triton.jit
def _rmsnorm_qkv_prefill_kernel(
    x_ptr, norm_w_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    eps,
    HAS_BIAS: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row-blocks sweep all column-blocks together, so a W tile is
    # still in L2 when the next row-block needs it.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_pid_n
    first_pid_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rstd = _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA, INTERPRETED)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        w = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn, mask=w_mask, other=0.0)
        acc = _dot(xn, w, acc, INTERPRETED, IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, _round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=y_mask)


@functools.cache
def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (decided when triton.jit ran)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def runs_triton(x: Tensor) -> bool:
    """Whether the op runs the Triton kernels on ``x``, or else the PyTorch reference."""
    if x.device.type == "cuda":
        return True
    # wrap_triton doesn't know the interpreter's kernels: tracing CPU code (fake tensors under
    # torch.compile or opcheck) must see the reference, and only real CPU tensors run interpreted.
    return x.device.type == "cpu" and triton_interpreter_enabled() and not is_fake(x)


def launch_rmsnorm_qkv(
    x: Tensor,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    bias: Tensor | None,
    y: Tensor,
    eps: float,
    gemma: bool,
    config: KernelConfig | None = None,
) -> None:
    """Launch the fused kernel for x (M, K), norm_weight (K,), qkv_weight (N, K), bias (N,) or None,
    writing y (M, N). ``config`` overrides the heuristics (used by the tuning script)."""
    M, K = x.shape
    N = qkv_weight.shape[0]
    decode = M <= DECODE_MAX_M
    if config is None:
        config = decode_config(M, N, K) if decode else prefill_config(M, N, K)
    args = (
        x, norm_weight, qkv_weight, bias if bias is not None else y, y,
        M, N, K,
        x.stride(0), x.stride(1), qkv_weight.stride(0), qkv_weight.stride(1), y.stride(0), y.stride(1),
        eps,
    )
    flags = dict(
        HAS_BIAS=bias is not None,
        GEMMA=gemma,
        INTERPRETED=triton_interpreter_enabled(),
        IEEE=x.dtype == torch.float32,
        BLOCK_M=config.BLOCK_M,
        BLOCK_N=config.BLOCK_N,
        BLOCK_K=config.BLOCK_K,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if decode:
        grid = (triton.cdiv(N, config.BLOCK_N),)
        wrap_triton(_rmsnorm_qkv_decode_kernel)[grid](*args, **flags)
    else:
        grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)
        wrap_triton(_rmsnorm_qkv_prefill_kernel)[grid](*args, **flags, GROUP_M=config.GROUP_M)


@triton_op("hf_fused::rmsnorm_qkv", mutates_args=())
def _rmsnorm_qkv_op(
    x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, eps: float, gemma: bool
) -> Tensor:
    norm_style = "gemma" if gemma else "llama"
    if not runs_triton(x):
        return rmsnorm_qkv_ref(x, norm_weight, qkv_weight, bias, eps=eps, norm_style=norm_style)
    K = x.shape[-1]
    N = qkv_weight.shape[0]
    x2 = x.reshape(-1, K)
    y = x2.new_empty((x2.shape[0], N))
    if x2.shape[0] > 0:
        launch_rmsnorm_qkv(x2, norm_weight, qkv_weight, bias, y, eps, gemma)
    return y.view(*x.shape[:-1], N)


def _check_inputs(x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, norm_style: str) -> None:
    if norm_style not in NORM_STYLES:
        raise ValueError(f"norm_style must be one of {NORM_STYLES}, got {norm_style!r}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension K, got shape {tuple(x.shape)}")
    K = x.shape[-1]
    if norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must have shape ({K},) to match x's hidden size, got {tuple(norm_weight.shape)}")
    if qkv_weight.dim() != 2 or qkv_weight.shape[1] != K:
        raise ValueError(f"qkv_weight must have shape (N, {K}) to match x's hidden size, got {tuple(qkv_weight.shape)}")
    if bias is not None and bias.shape != (qkv_weight.shape[0],):
        raise ValueError(f"bias must have shape ({qkv_weight.shape[0]},) to match qkv_weight, got {tuple(bias.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    named = {"norm_weight": norm_weight, "qkv_weight": qkv_weight, "bias": bias}
    for name, t in named.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must be on one device")


def rmsnorm_qkv(
    x: Tensor,
    norm_weight: Tensor,
    qkv_weight: Tensor,
    bias: Tensor | None = None,
    *,
    eps: float,
    norm_style: str = "llama",
) -> Tensor:
    """RMSNorm of ``x`` followed by its projection onto the stacked q/k/v rows of ``qkv_weight``.

    Args:
        x: (..., K) activations; any leading dims and strides.
        norm_weight: (K,) RMSNorm weight.
        qkv_weight: (N, K) the q, k and v projection weights stacked along N.
        bias: (N,) or None.
        eps: the norm's epsilon.
        norm_style: "llama" (weight times the rounded normalized value) or "gemma" ((1 + weight), one rounding).

    Returns:
        (..., N) in x's dtype. CUDA tensors run the Triton kernels; CPU tensors run the same
        math in PyTorch, or the kernels in Triton's interpreter when TRITON_INTERPRET=1.
    """
    _check_inputs(x, norm_weight, qkv_weight, bias, norm_style)
    return torch.ops.hf_fused.rmsnorm_qkv(x, norm_weight, qkv_weight, bias, eps, norm_style == "gemma")
