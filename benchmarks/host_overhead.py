"""Host time per call of the QKV op's layers, next to the unfused eager path it replaces.

    python benchmarks/host_overhead.py

Eager decoding at batch 1 is bound by the host: each call's Python, dispatch and launch time,
not its kernel. This times calls back to back on the CPU clock, at a shape small enough that the
GPU is never the bottleneck (SmolLM2-135M's 576 -> 960), so the numbers are host cost alone:

  public op       hf_fused.ops.rmsnorm_qkv as eager code calls it: checks, then the registered op
  torch.ops       the registered custom op alone; it runs the body with wrap_triton's tracing off
  body            the op's body called bare: outside the op, wrap_triton launches through
                  torch's tracing machinery (a higher-order op), which is why nothing calls it so
  kernel launch   the decode kernel's launcher, bare as well, with its config chosen beforehand
  eager unfused   LlamaRMSNorm and three nn.Linear, as transformers runs them
  one F.linear    one cuBLAS call, for scale
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment  # noqa: E402

from hf_fused.ops import rmsnorm_qkv  # noqa: E402

op_module = importlib.import_module("hf_fused.ops.rmsnorm_qkv")  # the package re-exports a function of that name
K, N, EPS = 576, 960, 1e-5


def host_us(call, calls: int = 2000, rounds: int = 5) -> float:
    """Median over rounds of host µs per call; the GPU queue absorbs the kernels meanwhile."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(1, K, device=device, dtype=dtype)
    norm_weight = torch.rand(K, device=device, dtype=dtype) + 0.5
    weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    y = torch.empty(1, N, device=device, dtype=dtype)
    config = op_module.decode_config(1, N, K)
    norm = LlamaRMSNorm(K, eps=EPS).to(device, dtype)
    q, k, v = (torch.nn.Linear(K, n, bias=False, device=device, dtype=dtype) for n in (576, 192, 192))
    rows = {
        "public op": lambda: rmsnorm_qkv(x, norm_weight, weight, eps=EPS),
        "torch.ops": lambda: torch.ops.hf_fused.rmsnorm_qkv(x, norm_weight, weight, None, EPS, False),
        "body": lambda: op_module.rmsnorm_qkv_2d(x, norm_weight, weight, None, EPS, False),
        "kernel launch": lambda: op_module.launch_decode(x, norm_weight, weight, None, y, EPS, False, config),
        "eager unfused": lambda: (lambda h: (q(h), k(h), v(h)))(norm(x)),
        "one F.linear": lambda: F.linear(x, weight),
    }
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; host µs per call, "
          f"K={K} -> N={N}, M=1, bf16\n")
    print("| call | host µs |\n| --- | --- |")
    for name, call in rows.items():
        print(f"| {name} | {host_us(call):.1f} |", flush=True)


if __name__ == "__main__":
    main()
