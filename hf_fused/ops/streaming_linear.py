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
- 2 to STREAM_MAX_M tokens, multi_token="stream" (bf16 and fp16): the same kernel on tensor
  cores, the tokens as the tiles' rows (rmsnorm_qkv's DecodeConfig.tokens_as_rows), the
  residual in its epilogue.
- otherwise, and "cublas" (DEFAULT_MULTI_TOKEN): F.linear (cuBLAS), then the residual added as
  the stock layer adds it. At 16 tokens cuBLAS's tensor-core GEMV ran ahead of the streaming
  kernels measured before this one (docs/bench_rmsnorm_qkv.md), whose products were transposed;
  "stream" stays off by default until a GPU has measured it (benchmarks/bench_streaming_linear.py
  times both).
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
    _dot,
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


MULTI_TOKEN_PATHS = ("cublas", "stream")
DEFAULT_MULTI_TOKEN = "cublas"
STREAM_MAX_M = 16  # one 16-row tile of tokens


@dataclass(frozen=True)
class StreamConfig:
    """Launch parameters of the streaming kernel. Each program streams rows_per_program rows of
    W; None shares the rows equally among the SMs. num_stages is how many weight tiles the
    pipeliner keeps in flight on tensor cores (a few tokens); one token double-buffers by hand."""

    BLOCK_K: int
    num_warps: int
    rows_per_program: int | None
    num_stages: int = 1


def stream_config(N: int, K: int, device: torch.device | None = None, M: int = 1) -> StreamConfig:
    """Heuristic read off benchmarks/tune_rmsnorm_qkv.py --op linear on an H100, and on an H200
    (streams_fast_per_sm), where a long K (down_proj of a 70B) streams fastest in 1024-wide tiles
    on 8 warps. A few tokens take rmsnorm_qkv's tensor-core tiles at 16 tokens (decode_config),
    not yet swept for this kernel."""
    large = N * K >= 4096 * 4096
    if M > 1:
        return StreamConfig(BLOCK_K=128, num_warps=4, rows_per_program=64 if large else 32, num_stages=4)
    if streams_fast_per_sm(device):
        return StreamConfig(BLOCK_K=1024, num_warps=8, rows_per_program=8) if K >= 16384 else \
            StreamConfig(BLOCK_K=512, num_warps=4, rows_per_program=8)
    return StreamConfig(BLOCK_K=512, num_warps=4, rows_per_program=16 if large else 8)


@triton.jit
def _streaming_linear_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    M, N, K, rows_per_program,
    stride_xm, stride_xk, stride_wn, stride_wk,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, L2_PREFETCH_BYTES: tl.constexpr,
):
    # Each program owns rows_per_program rows of W (BLOCK_N is that rounded up; masked rows cost
    # no traffic). y and the residual are (M, N) contiguous.
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_N)
    offs_n = pid * rows_per_program + rows
    n_mask = (rows < rows_per_program) & (offs_n < N)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn
    n_rows = tl.minimum(rows_per_program, N - pid * rows_per_program)
    if BLOCK_M == 1:
        # One token: multiply into a (BLOCK_N, BLOCK_K) accumulator, reduced across K once at the
        # end. Triton pipelines only loads that feed tl.dot, so the weight stream is
        # double-buffered by hand: the next tile is in flight while this one is multiplied.
        w_next = _weight_tile(w_ptrs, 0, n_mask, K, stride_wk, BLOCK_K)
        _prefetch_rows(w_ptr, pid * rows_per_program, n_rows, K, L2_PREFETCH_BYTES)
        _await_inputs(PDL)
        acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            w_next = _weight_tile(w_ptrs, k0 + BLOCK_K, n_mask, K, stride_wk, BLOCK_K)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < K, other=0.0)
            acc_k += w.to(tl.float32) * x.to(tl.float32)[None, :]
        acc = tl.sum(acc_k, axis=1)[None, :]
    else:
        # A few tokens: tensor cores, the tokens as the tiles' rows (rmsnorm_qkv's DecodeConfig
        # says why), x and the weight tiles through the pipelined copies.
        _prefetch_rows(w_ptr, pid * rows_per_program, n_rows, K, L2_PREFETCH_BYTES)
        _await_inputs(PDL)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_mask = (tl.arange(0, BLOCK_M)[:, None] < M) & (offs_k[None, :] < K)
            x = tl.load(x_ptr + tl.arange(0, BLOCK_M)[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=x_mask,
                        other=0.0)
            acc = _dot(x, tl.trans(_weight_tile(w_ptrs, k0, n_mask, K, stride_wk, BLOCK_K)), acc, INTERPRETED, False)
    offs_m = tl.arange(0, BLOCK_M)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_offsets = offs_m[:, None] * N + offs_n[None, :]
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + out_offsets, _round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=out_mask)


def stream_launch(
    x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, config: StreamConfig | None = None,
    residual: Tensor | None = None, pdl: bool = False, l2_prefetch: int | None = None,
) -> tuple[tuple[int], tuple, dict]:
    """The streaming kernel's grid, runtime arguments (the five tensors first) and
    meta-parameters: x (..., K) with M = x.numel() / K <= STREAM_MAX_M rows (a single row any
    shape, more as (M, K)), weight (N, K), y and residual (M, N)
    contiguous; ``pdl`` launches it with programmatic dependent launch (see pdl_meta),
    ``l2_prefetch`` bytes of each program's rows are prefetched (see l2_prefetch_bytes; None:
    the default)."""
    N, K = weight.shape
    M = x.numel() // K
    config = config or stream_config(N, K, x.device, M)
    block_m = 1 if M == 1 else max(16, triton.next_power_of_2(M))
    rows_per_program, block_n, grid = _decode_split(N, config.rows_per_program, block_m, x.device)
    stride_xm = x.stride(-2) if x.dim() >= 2 and M > 1 else 0
    args = (x, weight, bias if bias is not None else y, residual if residual is not None else y, y,
            M, N, K, rows_per_program, stride_xm, x.stride(-1), weight.stride(0), weight.stride(1))
    meta = dict(HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, INTERPRETED=triton_interpreter_enabled(),
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config.BLOCK_K,
                L2_PREFETCH_BYTES=l2_prefetch_bytes(weight, l2_prefetch), num_warps=config.num_warps,
                num_stages=config.num_stages, **pdl_meta(pdl))
    return (grid,), args, meta


def launch_stream(
    x: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, config: StreamConfig | None = None,
    residual: Tensor | None = None,
) -> None:
    """The streaming kernel, shapes as stream_launch's."""
    grid, args, meta = stream_launch(x, weight, bias, y, config, residual)
    wrap_triton(_streaming_linear_kernel)[grid](*args, **meta)


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    """What the op computes, as the stock layer computes it: the projection, then the residual added."""
    y = F.linear(x, weight, bias)
    return y if residual is None else residual + y


def streams_weights(M: int, dtype: torch.dtype, multi_token: str = DEFAULT_MULTI_TOKEN) -> bool:
    """Whether M tokens take the streaming kernel rather than cuBLAS: one token always; 2 to
    STREAM_MAX_M in bf16 and fp16 with multi_token="stream" (fp32 would need IEEE dots)."""
    return M == 1 or (multi_token == "stream" and 1 < M <= STREAM_MAX_M and dtype != torch.float32)


def streaming_linear_2d(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None,
                        multi_token: str = DEFAULT_MULTI_TOKEN) -> Tensor:
    """Dispatch by token count: x (M, K) -> (M, N), residual (M, N) contiguous or None;
    ``multi_token`` picks the path for 2 <= M <= STREAM_MAX_M (see MULTI_TOKEN_PATHS)."""
    if not streams_weights(x.shape[0], x.dtype, multi_token):
        return linear_ref(x, weight, bias, residual)
    y = x.new_empty((x.shape[0], weight.shape[0]))
    launch_stream(x, weight, bias, y, residual=residual)
    return y


# Traced, autograd and other eager calls go through the registered op, as rmsnorm_qkv's do.
@triton_op("hf_fused::streaming_linear", mutates_args=())
def _streaming_linear_op(x: Tensor, weight: Tensor, bias: Tensor | None, residual: Tensor | None = None) -> Tensor:
    K = x.shape[-1]
    if not runs_triton(x):
        return linear_ref(x, weight, bias, residual)
    residual_2d = None if residual is None else residual.reshape(-1, weight.shape[0])
    y = streaming_linear_2d(x.reshape(-1, K), weight, bias, residual_2d)
    return y.view(*x.shape[:-1], weight.shape[0])


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
        if x.numel() == x.shape[-1]:
            return _eager_stream(x, weight, bias, residual)
        if not streams_weights(x.numel() // max(x.shape[-1], 1), x.dtype):
            # The op's cuBLAS path: called here, it skips the op's dispatch.
            if residual is not None:
                _check_inputs(x, weight, bias, residual)  # a wrong residual would broadcast
            return linear_ref(x, weight, bias, residual)
    _check_inputs(x, weight, bias, residual)
    if x.numel() == x.shape[-1] and compiled_launchable(x, weight, bias, residual):
        return torch.ops.hf_fused.streaming_linear_launch(x, weight, bias, residual)
    with on_device_of(x):
        return torch.ops.hf_fused.streaming_linear(x, weight, bias, residual)

register_reference_backward("hf_fused::streaming_linear", linear_ref, added=3)
