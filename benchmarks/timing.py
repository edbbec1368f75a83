"""GPU timing shared by the op benchmark and the tuning sweep.

Every measurement rotates over several copies of the weights, together larger than L2, so
that each call streams its weight from HBM as it would inside a model.
"""

from __future__ import annotations

import datetime
import statistics
from collections.abc import Callable, Sequence

import torch
import triton

ROTATION_BYTES = 400e6


def copies_for(weight_bytes: int) -> int:
    """How many weight copies keep the rotation at ROTATION_BYTES or more (at least 2)."""
    return max(2, -(-int(ROTATION_BYTES) // weight_bytes))


def time_graph(calls: Sequence[Callable[[], object]], replays: int = 20) -> float:
    """Median µs per call of one CUDA graph that runs every call once, in order."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:  # warm-up on a side stream, as graph capture requires
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def time_launches(calls: Sequence[Callable[[], object]], rounds: int = 20) -> float:
    """Median µs per call when the calls are launched back to back from Python, as eager code is."""
    for call in calls:
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for call in calls:
            call()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    return statistics.median(times)


def measure_copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def measure_matmul_flops(n: int = 8192) -> float:
    """bf16 matrix-product rate in FLOP/s on random data."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / (ms * 1e-3)


def environment() -> dict:
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
    }
