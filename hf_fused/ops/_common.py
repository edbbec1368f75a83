"""What the RMSNorm-fused ops share: the norm, in PyTorch and in Triton, input checks, and when
the Triton kernels run at all.

Every op normalizes exactly as transformers does (see rmsnorm_ref), so each fused kernel calls the
same Triton helpers below in the same order. The helpers keep their leading underscore: they are
internal to hf_fused.ops, imported by its op files only.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton import knobs
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

NORM_STYLES = ("llama", "gemma")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def rmsnorm_ref(x: Tensor, norm_weight: Tensor, *, eps: float, norm_style: str) -> Tensor:
    """The RMSNorm as transformers writes it; fp64 inputs stay fp64 (the accuracy reference)."""
    dtype = x.dtype
    x32 = x if dtype == torch.float64 else x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if norm_style == "gemma":
        return (normed * (1.0 + norm_weight.to(normed.dtype))).to(dtype)
    return norm_weight * normed.to(dtype)


def check_operands(x: Tensor, **tensors: Tensor | None) -> None:
    """What every op checks of its operands: x's hidden size and dtype, then one dtype and one
    device for all. Each op checks its own weights' shapes after this."""
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last (hidden) dimension K, got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x must be floating point, got {x.dtype} (the kernels take float16, bfloat16 or float32)")
    for name, t in tensors.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all inputs must share one dtype")
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all inputs must be on one device")


def check_inputs(x: Tensor, norm_weight: Tensor, norm_style: str, **weights: Tensor | None) -> None:
    """check_operands, and the norm's own checks: its style and its weight's shape."""
    if norm_style not in NORM_STYLES:
        raise ValueError(f"norm_style must be one of {NORM_STYLES}, got {norm_style!r}")
    check_operands(x, norm_weight=norm_weight, **weights)
    K = x.shape[-1]
    if norm_weight.shape != (K,):
        raise ValueError(f"norm_weight must have shape ({K},) to match x's hidden size, got {tuple(norm_weight.shape)}")


@functools.cache
def triton_interpreter_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (decided when triton.jit ran)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def on_device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """Make x's GPU the current device while the op launches its kernels.

    Triton launches on the current device's stream; a layer that accelerate placed on another
    GPU than the current one would otherwise run there, unordered with its inputs' writes.
    Compiled code sets its own device guard, so this is for eager calls only.
    """
    if x.is_cuda and not torch.compiler.is_compiling() and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


_INTERPRETED = triton_interpreter_enabled()  # a constant for Dynamo, which traces kernel_runs


def kernel_runs(x: Tensor) -> bool:
    """Whether an op runs its kernels on x's device and dtype, traced or not: what a patched
    module asks before it takes an op's path rather than the stock one."""
    return x.dtype in KERNEL_DTYPES and (x.is_cuda or (x.device.type == "cpu" and _INTERPRETED))


def runs_triton(x: Tensor) -> bool:
    """Whether the op runs the Triton kernels on ``x``, or else the PyTorch reference."""
    # Other floating dtypes (a model cast to float64 to check numerics) compute as the stock model does.
    if x.dtype not in KERNEL_DTYPES:
        return False
    if x.device.type == "cuda":
        return True
    # wrap_triton doesn't know the interpreter's kernels: tracing CPU code (fake tensors under
    # torch.compile or opcheck) must see the reference, and only real CPU tensors run interpreted.
    return x.device.type == "cpu" and triton_interpreter_enabled() and not is_fake(x)


# Config fields that shape a launch but are not meta-parameters of every kernel that takes the config.
_LAUNCH_FIELDS = ("rows_per_program", "tokens_as_rows")


def _kernel_flags(gemma: bool, config) -> dict:
    return dict(
        GEMMA=gemma,
        INTERPRETED=triton_interpreter_enabled(),
        **{name: value for name, value in vars(config).items() if name not in _LAUNCH_FIELDS},
    )


@functools.cache
def _sm_count(device: torch.device) -> int:
    # The interpreter runs programs one after another; a few suffice to exercise the row split.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


@functools.cache
def device_name(device: torch.device) -> str:
    """The GPU's name; "" off CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else ""


# Peak DRAM bytes a second per SM from which the weight-streaming kernels take the configurations
# measured on an H200 (36 GB/s an SM: 4.8 TB/s over 132 SMs) rather than on an H100 SXM (25 GB/s).
# Between the two, a bit below their geometric mean (30); nothing in between was measured (an
# H100 NVL, 29.5, takes the H200's).
FAST_STREAM_PER_SM = 28e9


@functools.cache
def peak_bandwidth_per_sm(device: torch.device) -> float | None:
    """The GPU's peak DRAM bandwidth (double data rate over the memory bus) over its SM count, in
    bytes a second; None off CUDA, or where torch does not report the memory's clock and width."""
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / props.multi_processor_count


def streams_fast_per_sm(device: torch.device | None) -> bool:
    """Whether the weight-streaming kernels take the configurations of a GPU that streams many bytes
    per SM, tuned on an H200 (benchmarks/tune_rmsnorm_qkv.py; docs/h200/README.md).

    An H200 streams 1.4x an H100's bytes through the same 132 SMs, and there half the rows per
    program (twice the programs in flight) measured fastest. What sets that is the bandwidth each
    SM has to keep busy, so the class follows peak_bandwidth_per_sm, and the name only where torch
    reports no memory clock.
    """
    if device is None:
        return False
    per_sm = peak_bandwidth_per_sm(device)
    if per_sm is None:
        return device_name(device).startswith("NVIDIA H200")
    return per_sm >= FAST_STREAM_PER_SM


def _decode_split(rows: int, rows_per_program: int | None, block_m: int, device: torch.device) -> tuple[int, int, int]:
    """How a weight-streaming kernel splits ``rows`` weight rows: (rows per program, BLOCK_N, grid).

    ``rows_per_program=None`` gives each SM an equal share. So does the interpreter always: it
    runs programs one after another in Python, where a few large ones run far faster.
    """
    if rows_per_program is None or triton_interpreter_enabled():
        rows_per_program = triton.cdiv(rows, min(rows, _sm_count(device)))
    block_n = max(triton.next_power_of_2(rows_per_program), 16 if block_m >= 16 else 1)  # tl.dot needs 16
    return rows_per_program, block_n, triton.cdiv(rows, rows_per_program)


@triton.jit
def _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
              STAGES: tl.constexpr = 1):
    """1/rms of each of the BLOCK_M rows, reduced in fp32 over all of K.

    STAGES > 1 pipelines the loads of x's K-blocks (STAGES - 1 in flight through shared memory):
    Triton pipelines a loop without a dot only when asked, and otherwise each block waits for its
    load, one after another, before the weight stream starts.

    The kernels take eps as a constexpr, so it is added in fp32 as PyTorch adds it. As a runtime
    argument, torch.compile passes the Python float as fp64, which carried the whole
    normalization into fp64: the one-token QKV kernel ran 35% slower on an H100.
    """
    sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask, other=0.0)
        x = x.to(tl.float32)
        sum_sq += tl.sum(x * x, axis=1)
    return tl.math.rsqrt(sum_sq / K + eps)


@triton.jit
def _await_inputs(PDL: tl.constexpr):
    """Under programmatic dependent launch (PDL), let the next kernel's programs launch, then wait
    until every earlier kernel has finished and its writes are visible.

    A kernel launched with PDL starts while the kernel before it drains. Before this call it may
    only touch what no kernel of a decode step writes: the weight-streaming kernels issue their
    first weight tile, the rotary and attention kernels nothing. Everything that reads
    activations or the cache, or writes at all, comes after. The next kernel waits in turn, so
    starting it early orders nothing wrongly.
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


@functools.cache
def pdl_supported(device: torch.device) -> bool:
    """Whether the decode kernels (weight streaming, rotary and cache write, attention) launch on
    ``device`` with programmatic dependent launch: compute capability 9.0 (Hopper) or later,
    compiled (the interpreter has no grid dependencies), and not switched off with HF_FUSED_PDL=0."""
    if os.environ.get("HF_FUSED_PDL", "1") == "0" or device.type != "cuda" or triton_interpreter_enabled():
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def pdl_meta(pdl: bool) -> dict:
    """A decode kernel's meta-parameters for PDL: the PDL constexpr, which places _await_inputs,
    and Triton's launch_pdl, which sets the launch attribute."""
    return dict(PDL=True, launch_pdl=True) if pdl else dict(PDL=False)


# An estimate of how many programs of a weight-streaming kernel an SM holds at once (the one-token
# kernels' registers allow 2 to 4, the tensor-core one's shared memory 1 to 3):
# l2_prefetch_default shares half of L2 among that many per SM.
RESIDENT_PROGRAMS_PER_SM = 4
# One bulk prefetch counts 16-byte units in 16 bits on sm_90 (ptxas shifts the size right by 4
# and keeps the low half), so it takes at most this many bytes.
MAX_BULK_PREFETCH = 65535 * 16


@functools.cache
def l2_prefetch_default(device: torch.device) -> int:
    """Bytes of its weight rows that each program of a weight-streaming kernel asks L2 for
    before it waits for its inputs (_prefetch_rows); 0 where the GPU has no bulk prefetch
    (before Hopper) or kernels run interpreted.

    Each program holds only a tile or two of its weight in registers, so the loads in flight
    per SM are few (the 8B QKV kernel: 3 programs an SM, 59% of stalls on global loads,
    docs/h200/session2/). A bulk prefetch puts the program's next bytes in flight without
    registers, and, issued before the PDL wait, while the kernels before it still run. The
    first wave of programs prefetches together, so their share is bounded: half of L2 over
    RESIDENT_PROGRAMS_PER_SM programs on every SM, which leaves the L2 room for what the
    programs load and the kernels around them use.
    """
    if device.type != "cuda" or triton_interpreter_enabled() or torch.cuda.get_device_capability(device)[0] < 9:
        return 0
    props = torch.cuda.get_device_properties(device)
    return props.L2_cache_size // 2 // (props.multi_processor_count * RESIDENT_PROGRAMS_PER_SM) // 256 * 256


def l2_prefetch_bytes(weight: Tensor, max_bytes: int | None = None) -> int:
    """The L2_PREFETCH_BYTES meta-parameter of a weight-streaming kernel over ``weight``.

    ``max_bytes=None`` takes the device's l2_prefetch_default where HF_FUSED_L2_PREFETCH=1 and
    nothing otherwise: the prefetch is off by default. On an H100 it slowed every weight kernel
    (docs/h100/2026-12-08/); an H200 has not measured it yet (benchmarks/bench_pdl.py compares
    both). 0 also where the weight's rows are not contiguous with 16-byte aligned starts, which
    the bulk prefetch needs. Storage offsets stand in for the pointers, which traced (fake)
    tensors lack: allocations themselves are aligned far beyond.
    """
    if max_bytes is None:
        max_bytes = l2_prefetch_default(weight.device) if os.environ.get("HF_FUSED_L2_PREFETCH", "0") == "1" else 0
    row_bytes = weight.shape[-1] * weight.element_size()
    aligned = weight.is_contiguous() and row_bytes % 16 == 0 and weight.storage_offset() * weight.element_size() % 16 == 0
    return min(max_bytes, MAX_BULK_PREFETCH) // 16 * 16 if aligned and weight.dim() == 2 else 0


@triton.jit
def _prefetch_rows(w_ptr, first_row, n_rows, K, MAX_BYTES: tl.constexpr):
    """Ask L2 for the first MAX_BYTES (a multiple of 16, at most MAX_BULK_PREFETCH) of weight
    rows first_row .. first_row + n_rows, rows of K contiguous elements whose starts are 16-byte
    aligned (see l2_prefetch_bytes). Nothing when MAX_BYTES is 0.

    Only a hint: it reads nothing into registers and writes nothing, so it may run before the
    PDL wait. One thread issues it, as one bulk prefetch that the SM's copy engine splits up: a
    prefetch per thread would be serialized by ptxas into a loop over the warp's lanes.
    """
    if MAX_BYTES > 0:
        ELEMENT_BYTES: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        size = tl.minimum(n_rows.to(tl.int64) * K * ELEMENT_BYTES, MAX_BYTES).to(tl.int32)
        start = (w_ptr + first_row.to(tl.int64) * K).to(tl.pointer_type(tl.int8))
        tl.inline_asm_elementwise(
            """{
            .reg .pred first_thread, any_bytes;
            .reg .b32 tid;
            mov.u32 tid, %tid.x;
            setp.eq.u32 first_thread, tid, 0;
            setp.gt.and.s32 any_bytes, $2, 0, first_thread;
            @any_bytes cp.async.bulk.prefetch.L2.global [$1], $2;
            mov.u32 $0, 0;
            }""",
            "=r,l,r", [start, size], dtype=tl.int32, is_pure=False, pack=1,
        )


@triton.jit
def _weight_tile(w_ptrs, k0, n_mask, K, stride_wk, BLOCK_K: tl.constexpr):
    """Columns k0 .. k0 + BLOCK_K of a program's weight rows; zero past K (so a prefetch past
    the last tile reads nothing)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    return tl.load(w_ptrs + offs_k[None, :] * stride_wk, mask=n_mask[:, None] & (offs_k[None, :] < K), other=0.0)


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
def _rmsnorm_kernel(
    x_ptr, norm_w_ptr, y_ptr, M, K, stride_xm, stride_xk, stride_ym, eps: tl.constexpr,
    GEMMA: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The norm alone, for the split prefill paths whose GEMM is cuBLAS's."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rstd = _row_rstd(x_ptr, offs_m, M, K, stride_xm, stride_xk, eps, BLOCK_M, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xn = _normalized_tile(x_ptr, norm_w_ptr, offs_m, offs_k, rstd, M, K, stride_xm, stride_xk, GEMMA, INTERPRETED)
        mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_k[None, :], xn, mask=mask)


def launch_norm(x, norm_weight, y, eps: float, gemma: bool) -> None:
    """The norm alone: x (M, K) into y (M, K), contiguous."""
    M, K = x.shape
    block_m, block_k = 4, min(triton.next_power_of_2(K), 2048)
    wrap_triton(_rmsnorm_kernel)[(triton.cdiv(M, block_m),)](
        x, norm_weight, y, M, K, x.stride(0), x.stride(1), y.stride(0), eps,
        GEMMA=gemma, INTERPRETED=triton_interpreter_enabled(), BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4,
    )


# Eager launches. An eager call of a registered op pays torch's custom-op dispatch, then
# Triton's launcher binds and specializes every argument again: 110 to 130 µs of host time per
# call on the H200 (docs/h200/README.md), against some 15 µs of GPU time for a decode step's
# projection. Eager decode
# is bound by that host time. So eager decode calls (no autograd, not traced) skip the dispatcher
# and replay a kernel that Triton compiled on the first call of the same signature.


def _records_no_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd has nothing to record for a call on these tensors."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def eager_launchable(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a call may take an EagerLaunch: eager CUDA code in a kernel dtype, with no autograd
    graph to record."""
    # Traced code takes a launch op or the registered op (compiled_launchable); under the
    # interpreter, real CPU tensors take this path too, so that CI runs it.
    if torch.compiler.is_compiling() or not (x.is_cuda or (x.device.type == "cpu" and triton_interpreter_enabled())):
        return False
    return x.dtype in KERNEL_DTYPES and _records_no_grad(x, *tensors)


def compiled_launchable(x: Tensor, *tensors: Tensor | None) -> bool:
    """Whether a call that torch.compile traces takes an op's launch op (``hf_fused::*_launch``),
    where the eager call would take an EagerLaunch.

    Inductor launches a registered triton_op's kernel itself, and cannot launch it with PDL
    (pdl_meta). A launch op is opaque to Inductor: its body is the eager call, which launches
    the kernel as eager code does, PDL included. Under CUDA graphs (transformers' static-cache
    compile and hf_fused.generate both use them) that body runs once, at capture.
    """
    return torch.compiler.is_compiling() and kernel_runs(x) and _records_no_grad(x, *tensors)


def signature(*tensors: Tensor | None) -> tuple:
    """What a compiled kernel is specialized on, per tensor: shape, strides, dtype, device and
    16-byte alignment (Triton vectorizes aligned pointers); None for an absent one."""
    return tuple(
        None if t is None else (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16 == 0) for t in tensors
    )


class EagerLaunch:
    """One kernel launch, resolved once and replayed with new tensors from eager code.

    Built from a launch's grid, runtime arguments (the tensors first) and meta-parameters. The
    first call goes through Triton's launcher, which compiles or finds the kernel; later calls
    hand the compiled kernel's launcher its arguments directly. A call with other shapes,
    strides, dtypes or alignments needs another EagerLaunch (see ``signature``). Under the
    interpreter there is no compiled kernel, and every call goes through Triton's launcher.
    """

    def __init__(self, kernel, grid: tuple[int, ...], args: tuple, meta: dict, n_tensors: int) -> None:
        self.kernel, self.grid, self.meta = kernel, grid, meta
        self.fixed = args[n_tensors:]
        names = kernel.arg_names[len(args) :]
        # The compiled launcher takes every parameter, constexprs too, positionally.
        self.tail = (*self.fixed, *(meta[name] for name in names))
        self.compiled = None

    def __call__(self, *tensors: Tensor) -> None:
        if self.compiled is None:
            compiled = self.kernel[self.grid](*tensors, *self.fixed, **self.meta)
            # Triton's compiled-kernel runner indexes all three grid dimensions.
            self.grid = (*self.grid, 1, 1)[:3]
            self.compiled = None if triton_interpreter_enabled() else compiled
            return
        stream = triton.runtime.driver.active.get_current_stream(tensors[0].device.index)
        if _launch_hooks_set():
            self.compiled[self.grid](*tensors, *self.tail, stream=stream)
            return
        # With no launch hooks (a profiler such as proton sets them), the launcher needs no
        # launch metadata: skipping CompiledKernel's runner saves a closure, a metadata dict and
        # two calls of empty hook chains per launch, a few µs of an eager decode step's host time.
        compiled = self.compiled
        compiled.run(*self.grid, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *tensors, *self.tail)


def _launch_hooks_set() -> bool:
    """Whether anything listens to Triton's kernel launches (launch_enter_hook, launch_exit_hook).

    The supported Tritons (3.6 to 3.9) hold each as a chain of hooks, empty unless a tool adds
    one; a hook in another form counts as set unless it is None."""
    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    return bool(getattr(enter, "calls", enter is not None) or getattr(leave, "calls", leave is not None))


MAX_CACHED_LAUNCHES = 256  # per op: signatures that vary without bound must not grow the cache so


def cached_launch(cache: dict, key: tuple, build) -> EagerLaunch:
    """``cache[key]``, built by ``build()`` on the first call with that key.

    A key holds shapes: over transformers' dynamic cache the decode attention meets a new key
    length every step, so past MAX_CACHED_LAUNCHES keys the oldest goes (the dict keeps
    insertion order)."""
    launch = cache.get(key)
    if launch is None:
        if len(cache) >= MAX_CACHED_LAUNCHES:
            del cache[next(iter(cache))]
        launch = cache[key] = build()
    return launch
