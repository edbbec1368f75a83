"""The rotary embedding of q and k, and with it the static-cache write of k and v, in one kernel.

For the fused q/k/v output qkv (B, M, (Hq + 2 Hkv) D), laid out [q heads | k heads | v heads] as
the fused QKV op writes it, transformers' cos and sin (B, M, D), a static cache's buffers keys and
values (B, Hkv, S, D) and its length L (a 0-dim int64 tensor, the tokens cached so far):

    rope(x) = x * cos + rotate_half(x) * sin          fp32, one rounding; rotate_half(x) = [-x2, x1]
    q_out[b, m, h]          = rope(q[b, m, h])        (B, M, Hq, D), contiguous
    keys[b, j, L + m]       = rope(k[b, m, j])
    values[b, j, L + m]     = v[b, m, j]

That is apply_rotary_pos_emb followed by StaticLayer.update's two index_copy_ calls, which
Inductor compiles to four kernels a layer (docs/profile_decode.md). L is read on the device, so a
compiled step or a CUDA graph writes each step's tokens where they belong; the op does not
advance L (StaticLayer.update does that with its own add_, and so does the caller here).
Positions at or past S are not written, where index_copy_ would fail with a device-side error.

rotary is the same kernel without the cache: it returns q_out and k_out (B, M, Hkv, D) for a
cache that writes otherwise (transformers' dynamic cache concatenates), in place of
apply_rotary_pos_emb's dozen eager calls.

One program takes one token's BLOCK_H heads, each head as its two halves, so rotate_half is a
swap of two registers' halves and no element is loaded twice.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from hf_fused.ops._common import (
    EagerLaunch,
    _await_inputs,
    _round_to,
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

BLOCK_H = 16  # heads per program: 3 programs for a Llama-3-8B token (32 + 8 + 8 heads)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _split_heads(qkv: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """q (B, M, Hq, D), k and v (B, M, Hkv, D): views of the fused output."""
    B, M, N = qkv.shape
    D = N // (num_heads + 2 * num_kv_heads)
    return qkv.view(B, M, -1, D).split((num_heads, num_kv_heads, num_kv_heads), dim=2)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor, upcast: bool = False) -> Tensor:
    """rope(x) in fp32 (fp64 with ``upcast``), rounded once to x's dtype; cos and sin broadcast to x."""
    acc = torch.float64 if upcast or x.dtype == torch.float64 else torch.float32
    x, cos, sin = x.to(acc), cos.to(acc), sin.to(acc)
    return x * cos + rotate_half(x) * sin


def rotary_ref(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """rope of the q and k heads: (B, M, Hq, D) and (B, M, Hkv, D), contiguous in qkv's dtype."""
    q, k, _ = _split_heads(qkv, num_heads, num_kv_heads)
    cos, sin = cos[:, :, None], sin[:, :, None]  # (B, M, 1, D), over the heads
    return tuple(rope_ref(x, cos, sin).to(qkv.dtype).contiguous() for x in (q, k))


def rope_cache_write_ref(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, length: Tensor,
                         num_heads: int, num_kv_heads: int) -> Tensor:
    """The math above in PyTorch: writes keys and values in place, returns q_out."""
    q, k = rotary_ref(qkv, cos, sin, num_heads, num_kv_heads)
    v = _split_heads(qkv, num_heads, num_kv_heads)[2]
    positions = length + torch.arange(qkv.shape[1], device=qkv.device)
    keys.index_copy_(2, positions, k.to(keys.dtype).transpose(1, 2))
    values.index_copy_(2, positions, v.transpose(1, 2).to(values.dtype))
    return q


@triton.jit
def _rope_cache_kernel(
    qkv_ptr, cos_ptr, sin_ptr, keys_ptr, values_ptr, length_ptr, q_out_ptr,
    M, Hq, Hkv, S,
    stride_xb, stride_xm, stride_cb, stride_cm, stride_sb, stride_sm,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    CACHE: tl.constexpr, HALF: tl.constexpr, INTERPRETED: tl.constexpr, PDL: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token, head_block = tl.program_id(0), tl.program_id(1)
    b, m = token // M, token % M
    heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    d_ok = offs < HALF
    is_q = heads < Hq
    is_k = (heads >= Hq) & (heads < Hq + Hkv)
    is_v = (heads >= Hq + Hkv) & (heads < Hq + 2 * Hkv)
    live = (is_q | is_k | is_v)[:, None] & d_ok[None, :]
    _await_inputs(PDL)  # qkv comes from the kernel before; the cache is read by the ones after
    # Head h's two halves: columns h * D + [0, HALF) and h * D + [HALF, D) of the token's row.
    x_ptrs = qkv_ptr + b * stride_xb + m * stride_xm + heads[:, None] * (2 * HALF) + offs[None, :]
    x1 = tl.load(x_ptrs, mask=live, other=0.0)
    x2 = tl.load(x_ptrs + HALF, mask=live, other=0.0)
    c_ptrs = cos_ptr + b * stride_cb + m * stride_cm + offs
    s_ptrs = sin_ptr + b * stride_sb + m * stride_sm + offs
    c1 = tl.load(c_ptrs, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(c_ptrs + HALF, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(s_ptrs, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(s_ptrs + HALF, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    # v heads go on unrotated; q and k heads rotate.
    rotated = (is_q | is_k)[:, None]
    y1 = _round_to(tl.where(rotated, f1 * c1 - f2 * s1, f1), qkv_ptr.dtype.element_ty, INTERPRETED)
    y2 = _round_to(tl.where(rotated, f2 * c2 + f1 * s2, f2), qkv_ptr.dtype.element_ty, INTERPRETED)

    q_ptrs = q_out_ptr + (token * Hq + heads[:, None]) * (2 * HALF) + offs[None, :]
    q_mask = is_q[:, None] & d_ok[None, :]
    tl.store(q_ptrs, y1, mask=q_mask)
    tl.store(q_ptrs + HALF, y2, mask=q_mask)

    # Without a cache (CACHE=False), keys_ptr is k_out, (B, M, Hkv, D): token m goes to "position" m.
    if CACHE:
        position = tl.load(length_ptr) + m
    else:
        position = m
    in_cache = (position + tl.zeros((BLOCK_H,), tl.int64)) < S  # per head: the interpreter masks with vectors only
    k_ptrs = keys_ptr + b * stride_kb + (heads - Hq)[:, None] * stride_kh + position * stride_kn + offs[None, :]
    k_mask = (is_k & in_cache)[:, None] & d_ok[None, :]
    tl.store(k_ptrs, y1, mask=k_mask)
    tl.store(k_ptrs + HALF, y2, mask=k_mask)
    if CACHE:
        v_ptrs = values_ptr + b * stride_vb + (heads - Hq - Hkv)[:, None] * stride_vh + position * stride_vn + offs[None, :]
        v_mask = (is_v & in_cache)[:, None] & d_ok[None, :]
        tl.store(v_ptrs, y1, mask=v_mask)
        tl.store(v_ptrs + HALF, y2, mask=v_mask)


def rope_launch(qkv: Tensor, cos: Tensor, sin: Tensor, q_out: Tensor, keys: Tensor, values: Tensor | None = None,
                length: Tensor | None = None, *, num_heads: int, num_kv_heads: int, pdl: bool = False) -> tuple:
    """The kernel's launch: (kernel, grid, runtime arguments with the tensors first, meta-parameters,
    tensor count). With values and length, k and v go into the cache buffers keys and values;
    without, keys is k_out (B, M, Hkv, D) and v is not touched. ``pdl``: launched with
    programmatic dependent launch (pdl_meta)."""
    B, M, _ = qkv.shape
    D = keys.shape[-1]
    cache = values is not None
    cos, sin = cos.expand(B, M, D), sin.expand(B, M, D)  # one row for every sequence: stride 0
    if cache:
        (stride_kb, stride_kh, stride_kn), slots = keys.stride()[:3], keys.shape[2]
    else:  # k_out[b, m, j] is "slot" m of head j
        (stride_kb, stride_kn, stride_kh), slots = keys.stride()[:3], M
    grid = (B * M, triton.cdiv(num_heads + 2 * num_kv_heads, BLOCK_H))
    # Without a cache, values and length are never read: any pointer stands in for them.
    args = (qkv, cos, sin, keys, values if cache else q_out, length if cache else q_out, q_out,
            M, num_heads, num_kv_heads, slots,
            qkv.stride(0), qkv.stride(1), cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1),
            stride_kb, stride_kh, stride_kn, *(values.stride()[:3] if cache else (0, 0, 0)))
    meta = dict(CACHE=cache, HALF=D // 2, INTERPRETED=triton_interpreter_enabled(), BLOCK_H=BLOCK_H,
                BLOCK_HALF=max(2, triton.next_power_of_2(D // 2)), num_warps=2, **pdl_meta(pdl))
    return _rope_cache_kernel, grid, args, meta, 7


@triton_op("hf_fused::rope_cache_write", mutates_args=("keys", "values"))
def _rope_cache_write_op(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, length: Tensor,
                         num_heads: int, num_kv_heads: int) -> Tensor:
    if not runs_triton(qkv):
        return rope_cache_write_ref(qkv, cos, sin, keys, values, length, num_heads, num_kv_heads)
    B, M, _ = qkv.shape
    q_out = qkv.new_empty((B, M, num_heads, keys.shape[-1]))
    kernel, grid, args, meta, _ = rope_launch(qkv, cos, sin, q_out, keys, values, length,
                                              num_heads=num_heads, num_kv_heads=num_kv_heads)
    wrap_triton(kernel)[grid](*args, **meta)
    return q_out


@triton_op("hf_fused::rotary", mutates_args=())
def _rotary_op(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    if not runs_triton(qkv):
        return rotary_ref(qkv, cos, sin, num_heads, num_kv_heads)
    B, M, N = qkv.shape
    D = N // (num_heads + 2 * num_kv_heads)
    q_out, k_out = qkv.new_empty((B, M, num_heads, D)), qkv.new_empty((B, M, num_kv_heads, D))
    kernel, grid, args, meta, _ = rope_launch(qkv, cos, sin, q_out, k_out, num_heads=num_heads, num_kv_heads=num_kv_heads)
    wrap_triton(kernel)[grid](*args, **meta)
    return q_out, k_out


def _check_rotary(qkv: Tensor, cos: Tensor, sin: Tensor, num_heads: int, num_kv_heads: int) -> int:
    """Check what both ops take; return the head size D."""
    if qkv.dim() != 3 or not qkv.dtype.is_floating_point:
        raise ValueError(f"qkv must be a floating (B, M, N) tensor, got {qkv.dtype} {tuple(qkv.shape)}")
    B, M, N = qkv.shape
    heads = num_heads + 2 * num_kv_heads
    if num_kv_heads < 1 or num_heads % num_kv_heads or N % heads or (N // heads) % 2:
        raise ValueError(f"qkv's last dimension must hold {num_heads} query heads and {num_kv_heads} key and value "
                         f"heads of one even size D, {heads} x D columns; got {N}")
    D = N // heads
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[1:] != (M, D) or t.shape[0] not in (1, B) or t.stride(-1) != 1:
            raise ValueError(f"{name} must be (B or 1, M, D) = ({B}, {M}, {D}) with unit stride in D, got "
                             f"{tuple(t.shape)}")
        if t.device != qkv.device or t.dtype != qkv.dtype:
            raise ValueError(f"{name} must be on qkv's device in its dtype ({qkv.device}, {qkv.dtype}), got {t.device}, {t.dtype}")
    if qkv.stride(2) != 1:
        raise ValueError("qkv must be contiguous in its last dimension")
    return D


def _check_cache(qkv: Tensor, keys: Tensor, values: Tensor, length: Tensor, num_kv_heads: int, D: int) -> None:
    expected = (qkv.shape[0], num_kv_heads, keys.shape[2] if keys.dim() == 4 else "S", D)
    if keys.dim() != 4 or keys.shape != values.shape or tuple(keys.shape) != expected or keys.shape[2] == 0:
        raise ValueError(f"keys and values must be one shape (B, Hkv, S >= 1, D) = {expected}, got "
                         f"{tuple(keys.shape)} and {tuple(values.shape)}")
    if length.dim() != 0 or length.dtype != torch.int64:
        raise ValueError(f"length must be a 0-dim int64 tensor (the cache's length), got {length.dtype} {tuple(length.shape)}")
    for name, t in (("keys", keys), ("values", values), ("length", length)):
        if t.device != qkv.device:
            raise ValueError(f"{name} is on {t.device} but qkv is on {qkv.device}; all inputs must be on one device")
    if keys.dtype != qkv.dtype or values.dtype != qkv.dtype:
        raise ValueError(f"keys and values must be in qkv's dtype {qkv.dtype}, got {keys.dtype}, {values.dtype}")
    if keys.stride(3) != 1 or values.stride(3) != 1:
        raise ValueError("keys and values must be contiguous in their last dimension")


_EAGER_LAUNCHES: dict[tuple, EagerLaunch] = {}


def _eager_cache_write(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, length: Tensor,
                       num_heads: int, num_kv_heads: int) -> Tensor:
    """The kernel launched from eager code, its launch resolved once per signature."""

    def build() -> EagerLaunch:
        D = _check_rotary(qkv, cos, sin, num_heads, num_kv_heads)
        _check_cache(qkv, keys, values, length, num_kv_heads, D)
        q_out = qkv.new_empty((*qkv.shape[:2], num_heads, D))
        return EagerLaunch(*rope_launch(qkv, cos, sin, q_out, keys, values, length, num_heads=num_heads,
                                        num_kv_heads=num_kv_heads, pdl=pdl_supported(qkv.device)))

    key = ("cache", signature(qkv, cos, sin, keys, values, length), num_heads, num_kv_heads)
    launch = cached_launch(_EAGER_LAUNCHES, key, build)
    q_out = qkv.new_empty((*qkv.shape[:2], num_heads, keys.shape[-1]))
    with on_device_of(qkv):
        launch(qkv, cos, sin, keys, values, length, q_out)
    return q_out


@torch.library.custom_op("hf_fused::rope_cache_write_launch", mutates_args=("keys", "values"))
def _rope_cache_write_launch_op(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, length: Tensor,
                                num_heads: int, num_kv_heads: int) -> Tensor:
    """The cache write in compiled code, launched as eager code launches it (see compiled_launchable)."""
    return _eager_cache_write(qkv, cos, sin, keys, values, length, num_heads, num_kv_heads)


@_rope_cache_write_launch_op.register_fake
def _(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, length: Tensor,
      num_heads: int, num_kv_heads: int) -> Tensor:
    return qkv.new_empty((*qkv.shape[:2], num_heads, keys.shape[-1]))


def rope_cache_write(qkv: Tensor, cos: Tensor, sin: Tensor, keys: Tensor, values: Tensor, length: Tensor, *,
                     num_heads: int, num_kv_heads: int) -> Tensor:
    """Rotate q and k of the fused q/k/v output and write k and v into a static cache at its length.

    Args:
        qkv: (B, M, (num_heads + 2 num_kv_heads) D), [q | k | v] heads, unit stride in the last dimension.
        cos, sin: (B or 1, M, D), transformers' rotary embedding for these tokens, in qkv's dtype.
        keys, values: (B, num_kv_heads, S, D), the cache layer's buffers; written in place.
        length: 0-dim int64, the tokens the cache holds: the new ones go to positions length + m.
            It is read, not advanced.

    Returns:
        The rotated queries, (B, M, num_heads, D) contiguous in qkv's dtype; ``.transpose(1, 2)``
        is the (B, Hq, M, D) view that transformers' attention functions take. CUDA tensors run
        the kernel; CPU tensors run the reference, or the kernel in Triton's interpreter when
        TRITON_INTERPRET=1; float64 runs the reference.
    """
    if eager_launchable(qkv, cos, sin):
        return _eager_cache_write(qkv, cos, sin, keys, values, length, num_heads, num_kv_heads)
    D = _check_rotary(qkv, cos, sin, num_heads, num_kv_heads)
    _check_cache(qkv, keys, values, length, num_kv_heads, D)
    if compiled_launchable(qkv, cos, sin):
        return torch.ops.hf_fused.rope_cache_write_launch(qkv, cos, sin, keys, values, length, num_heads, num_kv_heads)
    with on_device_of(qkv):
        return torch.ops.hf_fused.rope_cache_write(qkv, cos, sin, keys, values, length, num_heads, num_kv_heads)


def rotary(qkv: Tensor, cos: Tensor, sin: Tensor, *, num_heads: int, num_kv_heads: int) -> tuple[Tensor, Tensor]:
    """Rotate q and k of the fused q/k/v output, for a cache that is not static (or none).

    Takes qkv, cos and sin as rope_cache_write; returns the rotated q (B, M, num_heads, D) and
    k (B, M, num_kv_heads, D), contiguous in qkv's dtype (``.transpose(1, 2)`` gives the layout
    transformers' caches and attention functions take). Devices and dtypes as rope_cache_write.
    """
    if not eager_launchable(qkv, cos, sin):
        _check_rotary(qkv, cos, sin, num_heads, num_kv_heads)
        with on_device_of(qkv):
            return torch.ops.hf_fused.rotary(qkv, cos, sin, num_heads, num_kv_heads)

    def build() -> EagerLaunch:
        D = _check_rotary(qkv, cos, sin, num_heads, num_kv_heads)
        q_out, k_out = qkv.new_empty((*qkv.shape[:2], num_heads, D)), qkv.new_empty((*qkv.shape[:2], num_kv_heads, D))
        return EagerLaunch(*rope_launch(qkv, cos, sin, q_out, k_out, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                        pdl=pdl_supported(qkv.device)))

    launch = cached_launch(_EAGER_LAUNCHES, ("rotary", signature(qkv, cos, sin), num_heads, num_kv_heads), build)
    D = qkv.shape[-1] // (num_heads + 2 * num_kv_heads)
    q_out, k_out = qkv.new_empty((*qkv.shape[:2], num_heads, D)), qkv.new_empty((*qkv.shape[:2], num_kv_heads, D))
    # The launch's tensors: qkv, cos, sin, k_out, then q_out standing in for values and length.
    with on_device_of(qkv):
        launch(qkv, cos, sin, k_out, q_out, q_out, q_out)
    return q_out, k_out
