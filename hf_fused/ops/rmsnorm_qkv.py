"""RMSNorm fused into the QKV projection: one Triton kernel, one pass over the weight.

For x of shape (M, K), a norm weight w of shape (K,) and W = [Wq; Wk; Wv] of shape (N, K):

    rstd = rsqrt(mean(x32 ** 2) + eps)                    (per row, fp32)
    llama: xn = dtype(w * dtype(x32 * rstd))              two roundings, as LlamaRMSNorm
    gemma: xn = dtype(x32 * rstd * (1 + w32))             one rounding, as GemmaRMSNorm
    y = dtype(xn @ W.T + b)                               fp32 accumulation

The normalized activations never reach device memory: each program first reduces its rows
to rstd, then normalizes each K-chunk of x in registers right before it meets the weight.

Paths, chosen by M:
- decode (M <= DECODE_MAX_M; in fp32 one token only, see streams_weights): weight streaming.
  Cost is reading W once, so every SM gets an equal share of W's rows and keeps its loads in
  flight; the few token rows ride along in registers. One token multiplies on CUDA cores, more
  on tensor cores, in either orientation of the product (DecodeConfig.tokens_as_rows).
- prefill, "fused": a tiled tl.dot GEMM with grouped program order for L2 reuse.
- prefill, "tma" (bf16 on Hopper and later): a persistent tl.dot GEMM fed by TMA tensor
  descriptors, with the norm's reduction carried along its K loop (see _rmsnorm_qkv_tma_kernel).
- prefill, "split" (default, see DEFAULT_PREFILL): a Triton norm pass, then cuBLAS.
- 2 to DECODE_MAX_M tokens, multi_token="split": the same norm pass and cuBLAS instead of the
  weight-streaming kernel (the default, "stream"), for the benchmarks to time the two side by side.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton
from triton.tools.tensor_descriptor import TensorDescriptor

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
    _sm_count,
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
    streams_fast_per_sm,
    triton_interpreter_enabled,
)

DECODE_MAX_M = 64
PREFILL_PATHS = ("split", "fused", "tma")
# Measured on an H100 and an H200 (docs/bench_rmsnorm_qkv.md, docs/h200/session2/,
# docs/h100/2026-12-06-b/): both fused kernels trail cuBLAS at prefill sizes ("tma" at 0.73-0.82x
# on an H100, "fused" at under 0.4x), so by default prefill normalizes in one Triton pass and
# multiplies with cuBLAS, which measured 0.93-1.05x of cuBLAS alone at M >= 2048.
DEFAULT_PREFILL = "split"
MULTI_TOKEN_PATHS = ("stream", "split")
# On an H100 at 1B's shape (3072 x 2048) four tokens streamed in 19.9 µs, against 7.3 µs for
# cuBLAS with no norm (docs/h100/2026-12-08/), but the split path was not timed beside them, so
# the default stays until it is.
DEFAULT_MULTI_TOKEN = "stream"


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
    return F.linear(rmsnorm_ref(x, norm_weight, eps=eps, norm_style=norm_style), qkv_weight, bias)


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the weight-streaming kernel. Each program streams rows_per_program
    rows of W; None shares the rows equally among the SMs, so that no SM idles in a tail wave.

    tokens_as_rows (tensor cores, from two tokens on) multiplies y = xn @ W.T with the tokens as
    the tile's rows, instead of y.T = W @ xn.T. Transposed, the normalized tokens are the second
    operand of the dot, which Hopper's wgmma takes from shared memory only: each K step stores
    them there and waits for its dot before the next (sm_90 code: warp_group_dot_wait with no
    dot left pending). As the first operand they stay in registers, and up to 16 tokens make
    the dot an Ampere-style mma, whose weight tiles come through the same pipelined copies.

    NORM_STAGES pipelines the norm's reduction over x's NORM_BLOCK_K-wide blocks (_row_rstd),
    which runs before the weight stream starts.
    """

    BLOCK_M: int
    BLOCK_K: int
    NORM_BLOCK_K: int
    num_warps: int
    num_stages: int
    rows_per_program: int | None
    tokens_as_rows: bool = False
    NORM_STAGES: int = 1


@dataclass(frozen=True)
class GemmConfig:
    """Launch parameters of the tiled GEMM kernel."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int
    num_stages: int
    GROUP_M: int = 8


def streams_weights(M: int, dtype: torch.dtype) -> bool:
    """Whether M tokens take the weight-streaming decode kernel rather than the prefill path.

    fp32 takes it for one token only. From two tokens on, the kernel's fp32 tl.dot is one FMA
    chain over all of K (Triton folds separate per-tile sums back into it), and on an H100 that
    measured 6x cuBLAS's error at K=2304; the split path (Triton norm, cuBLAS) keeps fp32 exact.
    """
    return M == 1 or (1 < M <= DECODE_MAX_M and dtype != torch.float32)


def decode_config(M: int, N: int, K: int, device: torch.device | None = None) -> DecodeConfig:
    """Heuristic for the weight-streaming kernel, read off benchmarks/tune_rmsnorm_qkv.py on an
    H100, and for one token on an H200 (streams_fast_per_sm) off the same sweep there.

    One token streams on CUDA cores, its whole row normalized up front (those loads gate the
    weight stream). From two tokens on, rows pad to 16 or more and go through tl.dot, with
    K-tiles small enough that the pipelined weight and token tiles fit in shared memory.
    """
    large = N * K >= 4096 * 4096
    if M == 1:
        norm_block_k = min(triton.next_power_of_2(K), 4096)
        if streams_fast_per_sm(device):
            return DecodeConfig(1, 1024 if K <= 4096 else 512, norm_block_k, num_warps=4, num_stages=1, rows_per_program=8)
        return DecodeConfig(1, 512, norm_block_k, num_warps=4, num_stages=4, rows_per_program=16 if large else 8)
    block_m = max(16, triton.next_power_of_2(M))
    if block_m == 16:
        # On an H200 the 70B shape's weight (84M elements) streamed 14% faster with one equal
        # share per SM (docs/h200/session2/README.md); the 8B shape's measured the same either way.
        rows = None if streams_fast_per_sm(device) and N * K >= 8192 * 8192 else (64 if large else 32)
        return DecodeConfig(16, 128, 128, num_warps=8, num_stages=4, rows_per_program=rows)
    return DecodeConfig(block_m, 64, 128, num_warps=4, num_stages=3, rows_per_program=64)


def gemm_config(M: int, N: int, K: int) -> GemmConfig:
    """Heuristic for the fused GEMM kernel, read off benchmarks/tune_rmsnorm_qkv.py on an H100."""
    if M <= 1024:
        return GemmConfig(64, 128, 64, num_warps=4, num_stages=4)
    return GemmConfig(64, 256, 32, num_warps=8, num_stages=3)


def tma_config(M: int, N: int, K: int) -> GemmConfig:
    """Tiles of the TMA GEMM kernel: those of Triton's Hopper matmuls, smaller where M gives too
    few large tiles to fill the SMs. At M = 2048 on an H100 the large tiles were the best of
    ``benchmarks/tune_rmsnorm_qkv.py --prefill tma``'s 17 (docs/h100/2026-12-06-b/)."""
    if M <= 512:
        return GemmConfig(64, 128, 64, num_warps=4, num_stages=4)
    return GemmConfig(128, 256, 64, num_warps=8, num_stages=3)


def tma_applies(x: Tensor, qkv_weight: Tensor) -> bool:
    """Whether the TMA GEMM takes x (M, K) and qkv_weight (N, K).

    bf16 only: the kernel multiplies x by the norm weight before it knows 1/rms, and in fp16 that
    product of an unnormalized activation can overflow; fp32 would need IEEE dots, which the split
    path's cuBLAS does better. TMA needs rows whose starts (and y's) are 16-byte aligned, and
    compute capability 9.0 or later (the interpreter emulates it).
    """
    if x.dtype != torch.bfloat16 or x.stride(-1) != 1 or qkv_weight.stride(-1) != 1:
        return False
    if not (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] >= 9) and not (
        x.device.type == "cpu" and triton_interpreter_enabled()
    ):
        return False
    # Storage offsets stand in for the pointers, which traced (fake) tensors lack: allocations
    # themselves are aligned far beyond 16 bytes.
    strides = (x.stride(0), qkv_weight.stride(0), x.storage_offset(), qkv_weight.storage_offset(), qkv_weight.shape[0])
    return all(s % 8 == 0 for s in strides)  # in elements of 2 bytes


@triton.jit
def _rmsnorm_qkv_decode_kernel(
    x_ptr, norm_w_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K, rows_per_program,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    eps: tl.constexpr,
    HAS_BIAS: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NORM_BLOCK_K: tl.constexpr,
    NORM_STAGES: tl.constexpr, L2_PREFETCH_BYTES: tl.constexpr, TOKENS_AS_ROWS: tl.constexpr,
):
    # Transposed product: acc[n, m] = sum_k W[n, k] * xn[m, k]. N is the long side here, so it
    # takes the tile's first dimension and the few token rows the second (TOKENS_AS_ROWS computes
    # acc.T on tensor cores instead; see DecodeConfig). Each program owns rows_per_program rows
    # of W; BLOCK_N is that rounded up, and masked rows cost no traffic.
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    rows = tl.arange(0, BLOCK_N)
    offs_n = pid * rows_per_program + rows
    n_mask = (rows < rows_per_program) & (offs_n < N)
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn
    if BLOCK_M == 1:
        # One token: multiply-add on CUDA cores into a (BLOCK_N, BLOCK_K) accumulator and reduce
        # across K once at the end, keeping cross-thread reductions out of the streaming loop.
        # Triton pipelines only loads that feed tl.dot, so the stream is double-buffered by hand:
        # the next weight tile is in flight while this one is multiplied, and the first one is
        # issued before the norm's reduction, which would otherwise leave the program idle.
        w_next = _weight_tile(w_ptrs, 0, n_mask, K, stride_wk, BLOCK_K)
    # The L2 prefetch, if any, has the program's next weight bytes on their way during the wait
    # and the norm's reduction.
    _prefetch_rows(w_ptr, pid * rows_per_program, tl.minimum(rows_per_program, N - pid * rows_per_program), K,
                   L2_PREFETCH_BYTES)
    _await_inputs(PDL)
    rstd = _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, NORM_BLOCK_K, NORM_STAGES)
    if BLOCK_M == 1:
        acc_k = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            w = w_next
            w_next = _weight_tile(w_ptrs, k0 + BLOCK_K, n_mask, K, stride_wk, BLOCK_K)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA, INTERPRETED)
            acc_k += w.to(tl.float32) * xn.to(tl.float32)
        acc = tl.sum(acc_k, axis=1)[:, None]
    elif TOKENS_AS_ROWS:
        acc_t = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA,
                                  INTERPRETED)
            acc_t = _dot(xn, tl.trans(_weight_tile(w_ptrs, k0, n_mask, K, stride_wk, BLOCK_K)), acc_t, INTERPRETED,
                         IEEE)
        acc = tl.trans(acc_t)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA,
                                  INTERPRETED)
            acc = _dot(_weight_tile(w_ptrs, k0, n_mask, K, stride_wk, BLOCK_K), tl.trans(xn), acc, INTERPRETED,
                       IEEE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None] * stride_yn
    tl.store(y_ptrs, _round_to(acc, y_ptr.dtype.element_ty, INTERPRETED), mask=n_mask[:, None] & (offs_m[None, :] < M))


@triton.jit
def _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(row-block, column-block) of output tile number ``tile`` in grouped order: GROUP_M
    row-blocks sweep all column-blocks together, so a W tile is still in L2 when the next
    row-block needs it."""
    group_size = GROUP_M * num_pid_n
    first_pid_m = (tile // group_size) * GROUP_M
    group_m = min(num_pid_m - first_pid_m, GROUP_M)
    return first_pid_m + (tile % group_size) % group_m, (tile % group_size) // group_m


@triton.jit
def _rmsnorm_qkv_gemm_kernel(
    x_ptr, norm_w_ptr, w_ptr, b_ptr, y_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    eps: tl.constexpr,
    HAS_BIAS: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
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


@triton.jit
def _rmsnorm_qkv_tma_kernel(
    x_desc, norm_w_ptr, w_desc, b_ptr, y_desc,
    M, N, K, num_programs,
    eps: tl.constexpr,
    HAS_BIAS: tl.constexpr, GEMMA: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Persistent: num_programs programs (one per SM) walk the output tiles in grouped order, so
    # there is no tail wave of launches and W tiles stay in L2 for the next row-block. TMA brings
    # the x and W tiles into shared memory, zero past M, N and K.
    #
    # The norm needs 1/rms of a row before any of its normalized values, and a pre-pass over the
    # rows would read x twice. Instead the loop feeds tl.dot with bf16(x * w), w the norm weight,
    # sums the squares of the same x tiles, and scales the fp32 accumulator by 1/rms in the
    # epilogue: y = rstd * (bf16(x * w) @ W.T). The operand is rounded once where transformers
    # rounds twice (x * rstd, then w times that), so the error is no larger.
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    dtype: tl.constexpr = y_desc.dtype
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([off_m, k0]).to(tl.float32)
            sum_sq += tl.sum(x * x, axis=1)
            offs_k = k0 + tl.arange(0, BLOCK_K)
            w = tl.load(norm_w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            scale = 1.0 + w if GEMMA else w
            a = _round_to(x * scale[None, :], dtype, INTERPRETED)
            acc = _dot(a, tl.trans(w_desc.load([off_n, k0])), acc, INTERPRETED, False)
        acc = acc * tl.math.rsqrt(sum_sq / K + eps)[:, None]
        if HAS_BIAS:
            offs_n = off_n + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], _round_to(acc, dtype, INTERPRETED))


def decode_launch(
    x, norm_weight, qkv_weight, bias, y, eps: float, gemma: bool, config: DecodeConfig | None = None, pdl: bool = False,
    l2_prefetch: int | None = None,
) -> tuple[tuple[int], tuple, dict]:
    """The weight-streaming kernel's grid, runtime arguments (the five tensors first) and
    meta-parameters: x (M, K) with M <= DECODE_MAX_M, qkv_weight (N, K), y (M, N); ``pdl``
    launches it with programmatic dependent launch (see pdl_meta); ``l2_prefetch`` bytes of each
    program's rows are prefetched (see l2_prefetch_bytes; None: the default). A tensor-core
    program streams many more rows than a one-token one, but prefetches no more of them, so
    that the programs together stay within the share of L2 that l2_prefetch_default allows."""
    M, K = x.shape
    N = qkv_weight.shape[0]
    config = config or decode_config(M, N, K, x.device)
    rows_per_program, block_n, grid = _decode_split(N, config.rows_per_program, config.BLOCK_M, x.device)
    args = (
        x, norm_weight, qkv_weight, bias if bias is not None else y, y,
        M, N, K, rows_per_program,
        x.stride(0), x.stride(1), qkv_weight.stride(0), qkv_weight.stride(1), y.stride(0), y.stride(1),
    )
    meta = dict(eps=eps, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_N=block_n,
                L2_PREFETCH_BYTES=l2_prefetch_bytes(qkv_weight, l2_prefetch),
                TOKENS_AS_ROWS=config.tokens_as_rows and config.BLOCK_M > 1, **_kernel_flags(gemma, config),
                **pdl_meta(pdl))
    return (grid,), args, meta


def launch_decode(x, norm_weight, qkv_weight, bias, y, eps: float, gemma: bool, config: DecodeConfig | None = None):
    """The weight-streaming kernel: x (M, K) with M <= DECODE_MAX_M, qkv_weight (N, K), y (M, N)."""
    grid, args, meta = decode_launch(x, norm_weight, qkv_weight, bias, y, eps, gemma, config)
    wrap_triton(_rmsnorm_qkv_decode_kernel)[grid](*args, **meta)


def launch_gemm(x, norm_weight, qkv_weight, bias, y, eps: float, gemma: bool, config: GemmConfig | None = None):
    """The fused tiled GEMM: x (M, K), qkv_weight (N, K), y (M, N)."""
    M, K = x.shape
    N = qkv_weight.shape[0]
    config = config or gemm_config(M, N, K)
    grid = (triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N),)
    wrap_triton(_rmsnorm_qkv_gemm_kernel)[grid](
        x, norm_weight, qkv_weight, bias if bias is not None else y, y,
        M, N, K,
        x.stride(0), x.stride(1), qkv_weight.stride(0), qkv_weight.stride(1), y.stride(0), y.stride(1),
        eps,
        HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, **_kernel_flags(gemma, config),
    )


def launch_tma(x, norm_weight, qkv_weight, bias, y, eps: float, gemma: bool, config: GemmConfig | None = None):
    """The persistent TMA GEMM: x (M, K), qkv_weight (N, K), y (M, N) contiguous; tma_applies(x, qkv_weight)."""
    M, K = x.shape
    N = qkv_weight.shape[0]
    config = config or tma_config(M, N, K)
    programs = min(triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N), _sm_count(x.device))
    wrap_triton(_rmsnorm_qkv_tma_kernel)[(programs,)](
        TensorDescriptor.from_tensor(x, [config.BLOCK_M, config.BLOCK_K]), norm_weight,
        TensorDescriptor.from_tensor(qkv_weight, [config.BLOCK_N, config.BLOCK_K]), bias if bias is not None else y,
        TensorDescriptor.from_tensor(y, [config.BLOCK_M, config.BLOCK_N]),
        M, N, K, programs, eps,
        HAS_BIAS=bias is not None, **_kernel_flags(gemma, config),
    )


def rmsnorm_qkv_2d(
    x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, eps: float, gemma: bool,
    prefill: str = DEFAULT_PREFILL, multi_token: str = DEFAULT_MULTI_TOKEN,
) -> Tensor:
    """Dispatch by token count: x (M, K) -> (M, N). ``prefill`` picks the path for M > DECODE_MAX_M;
    "tma" where tma_applies, else "split". ``multi_token`` picks it for 2 <= M <= DECODE_MAX_M
    (see MULTI_TOKEN_PATHS); one token always streams."""
    M, K = x.shape
    N = qkv_weight.shape[0]
    streams = streams_weights(M, x.dtype) and (M == 1 or multi_token == "stream")
    prefill_kernel = None
    if M > DECODE_MAX_M and prefill == "fused":
        prefill_kernel = launch_gemm
    elif M > DECODE_MAX_M and prefill == "tma" and tma_applies(x, qkv_weight):
        prefill_kernel = launch_tma
    if M == 0 or streams or prefill_kernel is not None:
        y = x.new_empty((M, N))
        if M > 0:
            (launch_decode if streams else prefill_kernel)(x, norm_weight, qkv_weight, bias, y, eps, gemma)
        return y
    normed = x.new_empty((M, K))
    launch_norm(x, norm_weight, normed, eps, gemma)
    return F.linear(normed, qkv_weight, bias)


# torch.compile traces the registered op without a graph break, and autograd records it. Eager
# decode calls skip it (_eager_decode); other eager calls go through it rather than calling the
# body bare, whose wrap_triton launch would take torch's tracing path at 3x the host time.
@triton_op("hf_fused::rmsnorm_qkv", mutates_args=())
def _rmsnorm_qkv_op(
    x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, eps: float, gemma: bool
) -> Tensor:
    norm_style = "gemma" if gemma else "llama"
    if not runs_triton(x):
        return rmsnorm_qkv_ref(x, norm_weight, qkv_weight, bias, eps=eps, norm_style=norm_style)
    K = x.shape[-1]
    y = rmsnorm_qkv_2d(x.reshape(-1, K), norm_weight, qkv_weight, bias, eps, gemma)
    return y.view(*x.shape[:-1], qkv_weight.shape[0])


def _check_inputs(x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, norm_style: str) -> None:
    check_inputs(x, norm_weight, norm_style, qkv_weight=qkv_weight, bias=bias)
    K = x.shape[-1]
    if qkv_weight.dim() != 2 or qkv_weight.shape[1] != K:
        raise ValueError(f"qkv_weight must have shape (N, {K}) to match x's hidden size, got {tuple(qkv_weight.shape)}")
    if bias is not None and bias.shape != (qkv_weight.shape[0],):
        raise ValueError(f"bias must have shape ({qkv_weight.shape[0]},) to match qkv_weight, got {tuple(bias.shape)}")


_EAGER_LAUNCHES: dict[tuple, EagerLaunch] = {}


def _eager_decode(x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, eps: float, norm_style: str) -> Tensor:
    """The weight-streaming kernel launched from eager code, its launch resolved once per signature."""
    key = (signature(x, norm_weight, qkv_weight, bias), eps, norm_style)
    out_shape = (*x.shape[:-1], qkv_weight.shape[0])
    y = x.new_empty(out_shape)

    def build() -> EagerLaunch:
        _check_inputs(x, norm_weight, qkv_weight, bias, norm_style)
        grid, args, meta = decode_launch(x.view(-1, x.shape[-1]), norm_weight, qkv_weight, bias,
                                         y.view(-1, out_shape[-1]), eps, norm_style == "gemma",
                                         pdl=pdl_supported(x.device))
        return EagerLaunch(_rmsnorm_qkv_decode_kernel, grid, args, meta, n_tensors=5)

    launch = cached_launch(_EAGER_LAUNCHES, key, build)
    with on_device_of(x):
        launch(x, norm_weight, qkv_weight, bias if bias is not None else y, y)
    return y


@torch.library.custom_op("hf_fused::rmsnorm_qkv_launch", mutates_args=())
def _rmsnorm_qkv_launch_op(
    x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, eps: float, norm_style: str
) -> Tensor:
    """A decode call in compiled code, launched as eager code launches it (see compiled_launchable)."""
    return _eager_decode(x, norm_weight, qkv_weight, bias, eps, norm_style)


@_rmsnorm_qkv_launch_op.register_fake
def _(x: Tensor, norm_weight: Tensor, qkv_weight: Tensor, bias: Tensor | None, eps: float, norm_style: str) -> Tensor:
    return x.new_empty((*x.shape[:-1], qkv_weight.shape[0]))


def _decodes(x: Tensor) -> bool:
    """Whether a call takes the weight-streaming kernel through a launch of its own (eager, or
    the launch op when traced): x contiguous, decode-sized."""
    return x.is_contiguous() and streams_weights(x.numel() // max(x.shape[-1], 1), x.dtype)


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
    if eager_launchable(x, norm_weight, qkv_weight, bias) and _decodes(x):
        return _eager_decode(x, norm_weight, qkv_weight, bias, eps, norm_style)
    _check_inputs(x, norm_weight, qkv_weight, bias, norm_style)
    if compiled_launchable(x, norm_weight, qkv_weight, bias) and _decodes(x):
        return torch.ops.hf_fused.rmsnorm_qkv_launch(x, norm_weight, qkv_weight, bias, eps, norm_style)
    with on_device_of(x):
        return torch.ops.hf_fused.rmsnorm_qkv(x, norm_weight, qkv_weight, bias, eps, norm_style == "gemma")

register_reference_backward("hf_fused::rmsnorm_qkv", lambda x, norm_weight, qkv_weight, bias, eps, gemma: rmsnorm_qkv_ref(
    x, norm_weight, qkv_weight, bias, eps=eps, norm_style="gemma" if gemma else "llama"))
