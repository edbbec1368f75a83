"""Attention of a few query tokens over a static KV cache: flash-decoding, GQA-aware.

For q (B, Hq, M, D), the whole static cache buffers k and v (B, Hkv, S, D), G = Hq / Hkv query
heads per key/value head (query head h reads kv head h // G, as transformers' repeat_kv), and a
boolean mask broadcastable to (B, Hq, M, S), True where a query attends a key:

    s[b, h, m, n] = scaling * q[b, h, m] . k[b, h // G, n]              fp32
    p = softmax_n(s, masked to -inf)                                     fp32; a row with no key: p = 0
    out[b, m, h] = dtype(sum_n p[b, h, m, n] v[b, h // G, n])           fp32 accumulation, one rounding

This is the function transformers' sdpa attention computes for a static-cache step: there
query length <= 16 and the mask is what its sdpa mask interface (masking_utils.sdpa_mask) hands
the attention function, (B, 1, M, S) booleans with causality, padding and the unwritten tail of
the cache in them. mask=None attends every key, as sdpa does for one query with no mask. The
output is in the layout transformers' attention functions return: (B, M, Hq, D), contiguous.

Two kernels:
1. grid (B * Hkv, splits): each program takes one split of the keys and loads each K/V tile of
   it once for all G * M query rows of its group (tl.dot on G * M rows). It keeps an online
   softmax (max, sum, acc) in fp32 and writes it as a partial. Tiles whose mask is all False
   (the cache beyond the current length) are skipped before K and V are loaded, so the bytes
   read are the valid keys' bytes, however large the cache.
2. grid (B * Hq * M,): merges each row's partials and writes the output.
When one split takes every key (a cache of one tile, or DecodeConfig(num_splits=1)), the first
kernel writes the output itself and the merge is not launched.
The split count comes from the SM count and the cache length, so that one sequence over a short
cache and a batch over a long one both fill the GPU. Lengths are runtime arguments: a longer
cache is a new grid, not a recompile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hf_fused.ops._autograd import register_reference_backward
from hf_fused.ops._common import (
    EagerLaunch,
    _await_inputs,
    _dot,
    _round_to,
    _sm_count,
    cached_launch,
    compiled_launchable,
    eager_launchable,
    on_device_of,
    pdl_meta,
    pdl_supported,
    runs_triton,
    signature,
    triton_interpreter_enabled,
)

MAX_QUERY = 16  # query tokens a call takes (decode, or a few speculative tokens)
MAX_ROWS = 128  # G * M query rows that one program keeps in registers
MAX_HEAD_DIM = 256


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, upcast: bool = False) -> Tensor:
    """The math above in fp32 (fp64 with ``upcast``, the accuracy reference); (B, M, Hq, D)."""
    acc = torch.float64 if upcast or q.dtype == torch.float64 else torch.float32
    G = q.shape[1] // k.shape[1]
    k, v = (t.to(acc).repeat_interleave(G, dim=1) for t in (k, v))
    s = (q.to(acc) @ k.transpose(-1, -2)) * scaling
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    # A row with no key to attend gives 0, as torch's sdpa does (softmax alone would give NaN).
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    return (p @ v).to(q.dtype).transpose(1, 2).contiguous()


@dataclass(frozen=True)
class DecodeConfig:
    """Keys per tile, warps, and the split count (None: from the SM count and cache length)."""

    BLOCK_N: int = 64
    num_warps: int = 4
    num_splits: int | None = None


WAVES = 4  # programs per SM that the splits aim for; more keep more loads in flight


def split_keys(batch_heads: int, S: int, block_n: int, device: torch.device, num_splits: int | None = None) -> tuple[int, int]:
    """(splits, keys per split, a multiple of block_n) for S keys over batch_heads programs' rows."""
    tiles = triton.cdiv(S, block_n)
    if num_splits is None:
        num_splits = triton.cdiv(WAVES * _sm_count(device), batch_heads)
    split_len = triton.cdiv(tiles, max(1, min(num_splits, tiles))) * block_n
    return triton.cdiv(S, split_len), split_len


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
    Hkv, G, M, S, split_len, num_splits, scale_log2,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_mb, stride_mh, stride_mm, stride_mn, stride_ob, stride_om, stride_oh,
    HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
    INTERPRETED: tl.constexpr, PDL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    b, j = pid_bh // Hkv, pid_bh % Hkv
    # Row r of the program is query token r % M of query head j * G + r // M.
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < G * M
    head, tok = j * G + rows // M, rows % M
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    _await_inputs(PDL)  # every input of this kernel is written by the step's kernels before it
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + tok[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Under torch.compile a Python float arrives as fp64, which would carry the softmax into fp64.
    scale = tl.full((), scale_log2, tl.float32)
    k_ptr += b * stride_kb + j * stride_kh
    v_ptr += b * stride_vb + j * stride_vh
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    start = split * split_len
    end = tl.minimum(start + split_len, S)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keep = row_ok[:, None] & (offs_n < end)[None, :]
        if HAS_MASK:
            mask_ptrs = mask_ptr + b * stride_mb + head[:, None] * stride_mh + tok[:, None] * stride_mm
            keep = keep & (tl.load(mask_ptrs + offs_n[None, :] * stride_mn, mask=keep, other=0) != 0)
        # Past the cache's current length every key is masked: skip the tile unread.
        if tl.max(keep.to(tl.int32)) > 0:
            kv_mask = (offs_n < end)[:, None] & d_ok[None, :]
            k = tl.load(k_ptr + offs_n[:, None] * stride_kn + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _dot(q, tl.trans(k), tl.zeros((BLOCK_R, BLOCK_N), tl.float32), INTERPRETED, IEEE) * scale
            s = tl.where(keep, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            # A row with nothing attended yet keeps max -inf; subtract 0 there, not -inf - -inf.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v = tl.load(v_ptr + offs_n[:, None] * stride_vn + offs_d[None, :], mask=kv_mask, other=0.0)
            # 16-bit inputs multiply P in their own dtype on tensor cores, as flash attention does.
            p = _round_to(p, v_ptr.dtype.element_ty, INTERPRETED)
            acc = _dot(p, v, acc * alpha[:, None], INTERPRETED, IEEE)
            m_i = m_new
    if DIRECT:  # one split holds every key: the output, as the merge would compute it from one partial
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_ptrs = out_ptr + b * stride_ob + tok[:, None] * stride_om + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, _round_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = (pid_bh * G * M + rows) * num_splits + split
        tl.store(part_m_ptr + part, m_i, mask=row_ok)
        tl.store(part_l_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    part_m_ptr, part_l_ptr, part_acc_ptr, out_ptr,
    Hq, M, num_splits, stride_ob, stride_om, stride_oh,
    HEAD_DIM: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)  # (b * Hq + h) * M + m, the partials' row order
    tok, h, b = row % M, (row // M) % Hq, row // (M * Hq)
    offs_d = tl.arange(0, BLOCK_D)
    _await_inputs(PDL)
    m_max = tl.full((BLOCK_S,), float("-inf"), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m_max = tl.maximum(m_max, tl.load(part_m_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf")))
    m_all = tl.max(m_max, axis=0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_sum = tl.zeros((BLOCK_S,), tl.float32)
    acc = tl.zeros((BLOCK_S, BLOCK_D), tl.float32)
    for s0 in range(0, num_splits, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        m_s = tl.load(part_m_ptr + row * num_splits + offs_s, mask=offs_s < num_splits, other=float("-inf"))
        # Splits that attended nothing are not read (their max is -inf).
        live = m_s > float("-inf")
        w = tl.where(live, tl.math.exp2(m_s - m_all), 0.0)
        l_sum += w * tl.load(part_l_ptr + row * num_splits + offs_s, mask=live, other=0.0)
        part_acc = tl.load(part_acc_ptr + (row * num_splits + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                           mask=live[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
        acc += w[:, None] * part_acc
    total = tl.sum(l_sum, axis=0)
    out = tl.sum(acc, axis=0) / tl.where(total > 0, total, 1.0)
    out_ptrs = out_ptr + b * stride_ob + tok * stride_om + h * stride_oh + offs_d
    tl.store(out_ptrs, _round_to(out, out_ptr.dtype.element_ty, INTERPRETED), mask=offs_d < HEAD_DIM)


def _partials(rows: int, num_splits: int, D: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """What the split kernel writes for the merge: per query row and split, the running max, the
    running sum and the fp32 accumulator."""
    part_m = torch.empty((rows, num_splits), device=device, dtype=torch.float32)
    return part_m, torch.empty_like(part_m), torch.empty((rows, num_splits, D), device=device, dtype=torch.float32)


def decode_launches(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, out: Tensor,
                    config: DecodeConfig = DecodeConfig(), pdl: bool = False) -> list[tuple]:
    """The kernels' launches, each (kernel, grid, runtime arguments with the tensors first,
    meta-parameters, tensor count): the split kernel and the merge, or the split kernel alone
    when one split takes every key (it then writes out itself). q (B, Hq, M, D), k and v
    (B, Hkv, S, D) with unit stride in D, mask broadcastable to (B, Hq, M, S) bool or None, out
    (B, M, Hq, D) with unit stride in D. ``pdl``: both kernels launch with programmatic
    dependent launch (pdl_meta)."""
    B, Hq, M, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    num_splits, split_len = split_keys(B * Hkv, S, config.BLOCK_N, q.device, config.num_splits)
    direct = num_splits == 1
    # One split writes out directly: out stands in for the partials, which it never reads or writes.
    part_m, part_l, part_acc = (out, out, out) if direct else _partials(B * Hq * M, num_splits, D, q.device)
    # A broadcast dimension has stride 0. The bool mask goes in as it is: Triton loads a bool
    # pointer's bytes, and Inductor cannot lower a bool -> uint8 view in a compiled step.
    m = (mask if mask is not None else q.new_ones((), dtype=torch.bool)).expand(B, Hq, M, S)
    interpreted, block_d = triton_interpreter_enabled(), max(16, triton.next_power_of_2(D))
    partial = (
        _decode_partial_kernel, (B * Hkv, num_splits),
        (q, k, v, m, part_m, part_l, part_acc, out,
         Hkv, G, M, S, split_len, num_splits, scaling * math.log2(math.e),
         q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
         *m.stride(), out.stride(0), out.stride(1), out.stride(2)),
        dict(HEAD_DIM=D, HAS_MASK=mask is not None, DIRECT=direct, IEEE=q.dtype == torch.float32, INTERPRETED=interpreted,
             BLOCK_R=max(16, triton.next_power_of_2(G * M)), BLOCK_N=config.BLOCK_N, BLOCK_D=block_d,
             num_warps=config.num_warps, **pdl_meta(pdl)),
        8,
    )
    if direct:
        return [partial]
    reduce = (
        _decode_reduce_kernel, (B * Hq * M,),
        (part_m, part_l, part_acc, out, Hq, M, num_splits, out.stride(0), out.stride(1), out.stride(2)),
        dict(HEAD_DIM=D, INTERPRETED=interpreted, BLOCK_S=min(16, triton.next_power_of_2(num_splits)),
             BLOCK_D=block_d, num_warps=1 if D <= 64 else 2, **pdl_meta(pdl)),
        4,
    )
    return [partial, reduce]


def launch_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float, out: Tensor,
                  config: DecodeConfig = DecodeConfig()) -> None:
    """The kernels of decode_launches, shapes as there."""
    for kernel, grid, args, meta, _ in decode_launches(q, k, v, mask, scaling, out, config):
        wrap_triton(kernel)[grid](*args, **meta)


@triton_op("hf_fused::decode_attention", mutates_args=())
def _decode_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    if not runs_triton(q):
        return decode_attention_ref(q, k, v, mask, scaling)
    B, Hq, M, D = q.shape
    out = q.new_empty((B, M, Hq, D))
    launch_decode(q, k, v, mask, scaling, out)
    return out


def _check_inputs(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float) -> None:
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"q must be (B, Hq, M, D) and k, v one shape (B, Hkv, S, D); got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    (B, Hq, M, D), (_, Hkv, S, _) = q.shape, k.shape
    if k.shape[0] != B or k.shape[3] != D or S == 0 or Hkv == 0 or Hq % Hkv or not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"k and v must be (B={B}, Hkv, S >= 1, D={D}) with Hkv dividing Hq={Hq} and "
                         f"D <= {MAX_HEAD_DIM}, got {tuple(k.shape)}")
    if not 1 <= M <= MAX_QUERY or (Hq // Hkv) * M > MAX_ROWS:
        raise ValueError(f"q must have 1 to {MAX_QUERY} query tokens and (Hq / Hkv) * M <= {MAX_ROWS}, "
                         f"got M={M} with {Hq // Hkv} query heads per kv head")
    for name, t in (("k", k), ("v", v), ("mask", mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k and v must share one floating dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.stride(3) != 1 or k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("q, k and v must be contiguous in the head dimension (stride 1 in D)")
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[2:] != (M, S)
                             or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, Hq)):
        raise ValueError(f"mask must be a bool tensor of shape (B or 1, Hq or 1, M, S) = ({B}, {Hq}, {M}, {S}), "
                         f"got {mask.dtype} {tuple(mask.shape)}")
    if not isinstance(scaling, (float, int)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite float, got {scaling!r}")


_EAGER_LAUNCHES: dict[tuple, tuple[EagerLaunch, ...]] = {}


def _eager_decode(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling) -> Tensor:
    """The kernels launched from eager code, their launches resolved once per signature."""

    def build() -> tuple[EagerLaunch, ...]:
        _check_inputs(q, k, v, mask, scaling)
        B, Hq, M, D = q.shape
        kernels = decode_launches(q, k, v, mask, float(scaling), q.new_empty((B, M, Hq, D)), pdl=pdl_supported(q.device))
        return tuple(EagerLaunch(kernel, grid, args, meta, n) for kernel, grid, args, meta, n in kernels)

    launches = cached_launch(_EAGER_LAUNCHES, (signature(q, k, v, mask), scaling), build)
    # The signature fixes the partials' shapes and out's. A mask of None is never read
    # (HAS_MASK), nor are the partials of one split (DIRECT), so out stands in for them.
    B, Hq, M, D = q.shape
    out = q.new_empty((B, M, Hq, D))
    mask = out if mask is None else mask
    with on_device_of(q):
        if len(launches) == 1:
            launches[0](q, k, v, mask, out, out, out, out)
            return out
        partial, reduce = launches
        part_m, part_l, part_acc = _partials(B * Hq * M, partial.grid[1], D, q.device)
        partial(q, k, v, mask, part_m, part_l, part_acc, out)
        reduce(part_m, part_l, part_acc, out)
    return out


@torch.library.custom_op("hf_fused::decode_attention_launch", mutates_args=())
def _decode_attention_launch_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    """Decode attention in compiled code, launched as eager code launches it (see compiled_launchable)."""
    return _eager_decode(q, k, v, mask, scaling)


@_decode_attention_launch_op.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scaling: float) -> Tensor:
    B, Hq, M, D = q.shape
    return q.new_empty((B, M, Hq, D))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, *, scaling: float) -> Tensor:
    """Attention of M <= 16 query tokens over a KV cache, as transformers' sdpa attention computes it.

    Args:
        q: (B, Hq, M, D) queries; any strides with unit stride in D (transformers' transposed view).
        k, v: (B, Hkv, S, D) the whole static cache buffers, Hkv dividing Hq.
        mask: bool, (B or 1, Hq or 1, M, S), True where a query attends a key; None attends all.
        scaling: multiplies q . k (transformers' module.scaling, usually D ** -0.5).

    Returns:
        (B, M, Hq, D) in q's dtype, the layout transformers' attention functions return. CUDA
        tensors run the kernels; CPU tensors run the reference, or the kernels in Triton's
        interpreter when TRITON_INTERPRET=1; float64 runs the reference.
    """
    if eager_launchable(q, k, v, mask):
        return _eager_decode(q, k, v, mask, scaling)
    _check_inputs(q, k, v, mask, scaling)
    if compiled_launchable(q, k, v, mask):
        return torch.ops.hf_fused.decode_attention_launch(q, k, v, mask, float(scaling))
    with on_device_of(q):
        return torch.ops.hf_fused.decode_attention(q, k, v, mask, float(scaling))


register_reference_backward("hf_fused::decode_attention", decode_attention_ref)
