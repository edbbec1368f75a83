"""A linear layer for one token at a time: y = x @ W.T + b (+ residual) as one weight-streaming
Triton kernel.

This is for the projections that no norm feeds (o_proj, down_proj). At one token a linear layer
is a matrix-vector product whose whole cost is reading W once; cuBLAS runs it as split-K plus a
separate reduce kernel. Here every program streams its own rows of W over all of K, the next
weight tile in flight while it multiplies the current one (as rmsnorm_qkv's one-token kernel),
so one kernel writes y directly.

A residual, when given, is added in the same epilogue: a decoder layer's `residual + o_proj(x)`
and `residual + down_proj(x)` (fuse="residual") then cost no kernel of their own. The sum is
rounded once, from fp32; the stock layer rounds the projection, then the sum.

Paths, chosen by M (tokens):
- M == 1: the streaming kernel, fp32 accumulation on CUDA cores, one rounding at the end.
- otherwise: F.linear (cuBLAS), then the residual added as the stock layer adds it. From a
  few tokens on, cuBLAS's tensor-core GEMV matches the streaming kernels measured so far
  (docs/bench_rmsnorm_qkv.md, M=16), and with no norm to fuse there is nothing else to gain.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    _prefetch_rows,
    _round_to,
    _weight_tile,
    cached_launch,
    check_operands,
    compiled_launchable,
    eager_launchable,
    l2_prefetch_bytes,
    on_device_of,
    pdl_meta,
    pdl_supported,
    runs_triton,
    signature,
    streams_fast_per_sm,
    triton_interpreter_enabled,
)


@dataclass(frozen=True)
class StreamConfig:
    """Launch parameters of the streaming kernel. Each program streams rows_per_program rows of
    W; None shares the rows equally among the SMs."""

    BLOCK_K: int
    num_warps: int
    rows_per_program: int | None


def stream_config(N: int, K: int, device: torch.device | None = None) -> StreamConfig:
    """Heuristic read off benchmarks/tune_rmsnorm_qkv.py --op linear on an H100, and on an H200
    (streams_fast_per_sm), where a long K (down_proj of a 70B) streams fastest in 1024-wide tiles on 8 warps."""
    if streams_fast_per_sm(device):
        return StreamConfig(BLOCK_K=1024, num_warps=8, rows_per_program=8) if K >= 16384 else \
            StreamConfig(BLOCK_K=512, num_warps=4, rows_per_program=8)
    return StreamConfig(BLOCK_K=512, num_warps=4, rows_per_program=16 if N * K >= 4096 * 4096 else 8)


@triton.jit
def _streaming_linear_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    N, K, rows_per_program,
    stride_xk, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, L2_PREFETCH_BYTES: tl.constexpr,
):
    # Each program owns rows_per_program rows of W (BLOCK_N is that rounded up; masked rows cost
    # no traffic) and multiplies into a (BLOCK_N, BLOCK_K) accumulator, reduced across K once at
    # the end. Triton pipelines only loads that feed tl.dot, so the weight stream is
    # double-buffered by hand: the next tile is in flight while this one is multiplied.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)
    offs_n = pid * rows_per_program + rows
    n_mask = (rows < rows_per_program) & (offs_n < N)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn
    w_next = _weight_tile(w_ptrs, 0, n_mask, K, stride_wk, BLOCK_K)
    _prefetch_rows(w_ptr, pid * rows_per_program, tl.minimum(rows_per_program, N - pid * rows_per_program), K,
                   L2_PREFETCH_BYTES)
    _await_inputs(PDL)
    acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = w_next
        w_next = _weight_tile(w_ptrs, k0 + BLOCK_K, n_mask, K, stride_wk, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0)
        acc_k += w.to(tl.float32) * x.to(tl.float32)[None, :]
    acc = tl.sum(acc_k, axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, _round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=n_mask)


def stream_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, config: StreamConfig | None = None,
    residual: Tensor | None = None, pdl: bool = False, l2_prefetch: int | None = None,
) -> tuple[tuple[int], tuple, dict]:
    """The streaming kernel's grid, runtime arguments (the five tensors first) and
    meta-parameters: x (K,) or (1, K), weight (N, K), y and residual (N,) contiguous; ``pdl``
    launches it with programmatic dependent launch (see pdl_meta), ``l2_prefetch`` bytes of each
    program's rows are prefetched (see l2_prefetch_bytes; None: the default)."""
    N, K = weight.shape
    config = config or stream_config(N, K, x.device)
    rows_per_program, block_n, grid = _decode_split(N, config.rows_per_program, 1, x.device)
    args = (x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
            N, K, rows_per_program, x.stride(-1), weight.stride(0), weight.stride(1))
    meta = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, INTERPRETED=triton_interpreter_enabled(),
                BLOCK_N=block_n, BLOCK_K=config.BLOCK_K, L2_PREFETCH_BYTES=l2_prefetch_bytes(weight, l2_prefetch),
                num_warps=config.num_warps, **pdl_meta(pdl))
    return (grid,), args, meta


def launch_stream(
    x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, config: StreamConfig | None = None,
    residual: Tensor | None = None,
) -> None:
    """The streaming kernel: x (K,) or (1, K), weight (N, K), y and residual (N,) contiguous."""
    grid, args, meta = stream_launch(x, weight, bias, y, config, residual)
    wrap_triton(_streaming_linear_kernel)[grid](*args, **meta)


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """What the op computes, as the stock layer computes it: the projection, then the residual added."""
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def streams_weights(M: int) -> bool:
    """Whether M tokens take the streaming kernel rather than cuBLAS."""
    return M == 1


# Traced, autograd and other eager calls go through the registered op, as rmsnorm_qkv's do.
@triton_op("hf_fused::streaming_linear", mutates_args=())
def _streaming_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    K = x.shape[-1]
    M = x.numel() // K
    if not runs_triton(x) or not streams_weights(M):
        return linear_ref(x, weight, bias, residual)
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))
    launch_stream(x.reshape(K), weight, bias, y, residual=None if residual is None else residual.reshape(-1))
    return y


def _check_inputs(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> None:
    check_operands(x, weight=weight, bias=bias, residual=residual)
    K = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != K:
        raise ValueError(f"weight must have shape (N, {K}) to match x's last dimension, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},) to match weight, got {tuple(bias.shape)}")
    out_shape = (*x.shape[:-1], weight.shape[0])
    if residual is not None and tuple(residual.shape) != out_shape:
        raise ValueError(f"residual must have the output's shape {out_shape}, got {tuple(residual.shape)}")
    if residual is not None and not residual.is_contiguous():
        raise ValueError("residual must be contiguous (the kernel adds it row by row)")


_EAGER_LAUNCHES: dict[tuple, EagerLaunch] = {}


def _eager_stream(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    """The streaming kernel launched from eager code, its launch resolved once per signature."""
    y = x.new_empty((*x.shape[:-1], weight.shape[0]))

    def build() -> EagerLaunch:
        _check_inputs(x, weight, bias, residual)
        grid, args, meta = stream_launch(x, weight, bias, y, residual=residual, pdl=pdl_supported(x.device))
        return EagerLaunch(_streaming_linear_kernel, grid, args, meta, n_tensors=5)

    launch = cached_launch(_EAGER_LAUNCHES, signature(x, weight, bias, residual), build)
    with on_device_of(x):
        launch(x, weight, bias if bias is not None else y, residual if residual is not None else y, y)
    return y


@torch.library.custom_op("hf_fused::streaming_linear_launch", mutates_args=())
def _streaming_linear_launch_op(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    """One token in compiled code, launched as eager code launches it (see compiled_launchable)."""
    return _eager_stream(x, weight, bias, residual)


@_streaming_linear_launch_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def streaming_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, residual: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, plus ``residual`` if given, with one token streamed through
    a Triton kernel.

    Args:
        x: (..., K) activations; any leading dims and strides.
        weight: (N, K), as nn.Linear's.
        bias: (N,) or None.
        residual: (..., N) contiguous, added to the output (in the kernel's epilogue at one token), or None.

    Returns:
        (..., N) in x's dtype. One token on CUDA runs the streaming kernel, more tokens cuBLAS;
        CPU tensors run F.linear, or the kernel in Triton's interpreter when TRITON_INTERPRET=1.
    """
    if eager_launchable(x, weight, bias, residual):
        # More tokens are the op's cuBLAS path: called here, it skips the op's dispatch.
        if x.numel() == x.shape[-1]:
            return _eager_stream(x, weight, bias, residual)
        if residual is not None:
            _check_inputs(x, weight, bias, residual)  # a wrong residual would broadcast
        return linear_ref(x, weight, bias, residual)
    _check_inputs(x, weight, bias, residual)
    if x.numel() == x.shape[-1] and compiled_launchable(x, weight, bias, residual):
        return torch.ops.hf_fused.streaming_linear_launch(x, weight, bias, residual)
    with on_device_of(x):
        return torch.ops.hf_fused.streaming_linear(x, weight, bias, residual)

register_reference_backward("hf_fused::streaming_linear", linear_ref, added=3)
