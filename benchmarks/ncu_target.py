"""Run one fused op at one shape a few times, for Nsight Compute to profile.

    ncu --clock-control none -k regex:rmsnorm_qkv --launch-skip 3 --launch-count 1 \
        --set full python benchmarks/ncu_target.py --op rmsnorm_qkv --shape llama3-8b --m 1

The first calls compile the kernel; skip them with --launch-skip. Weights are random, never
zeros, and one copy (ncu flushes caches between profiled launches by default).
"""

from __future__ import annotations

import argparse

import torch

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_qkv, streaming_linear

SHAPES = {  # name: (hidden K, q+k+v rows, intermediate size)
    "smollm2-135m": (576, 960, 1536),
    "llama3.2-1b": (2048, 3072, 8192),
    "llama3-8b": (4096, 6144, 14336),
    "llama3-70b": (8192, 10240, 28672),
}


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=("rmsnorm_qkv", "rmsnorm_gate_up", "o_proj", "down_proj"), default="rmsnorm_qkv")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--m", type=int, default=1, help="tokens")
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    K, N_qkv, inter = SHAPES[args.shape]
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(args.m, K, device=device, dtype=dtype)
    norm_weight = torch.rand(K, device=device, dtype=dtype) + 0.5
    if args.op == "rmsnorm_qkv":
        w = torch.randn(N_qkv, K, device=device, dtype=dtype) / K**0.5
        call = lambda: rmsnorm_qkv(x, norm_weight, w, eps=1e-5)  # noqa: E731
    elif args.op == "rmsnorm_gate_up":
        w = torch.randn(2 * inter, K, device=device, dtype=dtype) / K**0.5
        call = lambda: rmsnorm_gate_up(x, norm_weight, w, eps=1e-5)  # noqa: E731
    else:
        k_in = K if args.op == "o_proj" else inter
        x = torch.randn(args.m, k_in, device=device, dtype=dtype)
        w = torch.randn(K, k_in, device=device, dtype=dtype) / k_in**0.5
        call = lambda: streaming_linear(x, w)  # noqa: E731
    for _ in range(args.calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
