"""Where the TMA prefill kernel's time goes: the same persistent TMA GEMM with the norm's two
pieces of work in its K loop switched on one at a time, beside cuBLAS on the same weights.

    python benchmarks/ablate_tma_prefill.py --out out

Variants (every one reads x and W through TMA descriptors, persistent, grouped tile order):
- plain:  y = x @ W.T, x straight into tl.dot. Triton's own GEMM ceiling at these tiles.
- scale:  y = bf16(x * w) @ W.T, the norm weight applied to the x tile in registers.
- sum_sq: y = rstd * (x @ W.T), the squares of each x tile summed beside the dot.
- both:   the two together, which is what hf_fused's kernel (_rmsnorm_qkv_tma_kernel) does;
          that kernel itself is timed too, through launch_tma.
- both_lanes: both, with the squares added up per lane in a (BLOCK_M, BLOCK_K) accumulator and
          reduced across lanes once after the K loop, instead of every K step.
The gaps between the rows say what the fused norm costs on top of Triton's GEMM, and the gap
between plain and cuBLAS what Triton's GEMM costs on top of cuBLAS's. Registers and spills per
thread come from the compiled kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rmsnorm_qkv import SHAPES  # noqa: E402
from timing import copies_for, environment, time_graph  # noqa: E402

from hf_fused.ops._common import _sm_count  # noqa: E402
from hf_fused.ops.rmsnorm_qkv import GemmConfig, _grouped_tile, launch_tma, tma_config  # noqa: E402

# variant: (scale by the norm weight, sum the squares, sum them per lane)
VARIANTS = {"plain": (False, False, False), "scale": (True, False, False), "sum_sq": (False, True, False),
            "both": (True, True, False), "both_lanes": (True, True, True)}
# Timed beside the heuristic's tiles: a shallower K step with a deeper pipeline (half the x tile
# in registers per step, for a kernel that may be short of registers), and a narrower N tile.
EXTRA_CONFIGS = (GemmConfig(128, 256, 32, num_warps=8, num_stages=5), GemmConfig(128, 128, 64, num_warps=8, num_stages=4))


@triton.jit
def _ablation_kernel(
    x_desc, norm_w_ptr, w_desc, y_desc, M, N, K, num_programs,
    eps: tl.constexpr, SCALE: tl.constexpr, SUM_SQ: tl.constexpr, LANE_SUMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), num_pid_m * num_pid_n, num_programs):
        pid_m, pid_n = _grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        sum_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        lane_sq = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = x_desc.load([pid_m * BLOCK_M, k0])
            if SUM_SQ:
                xf = a.to(tl.float32)
                if LANE_SUMS:
                    lane_sq += xf * xf
                else:
                    sum_sq += tl.sum(xf * xf, axis=1)
            if SCALE:
                offs_k = k0 + tl.arange(0, BLOCK_K)
                w = tl.load(norm_w_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                a = (a.to(tl.float32) * w[None, :]).to(a.dtype)
            acc = tl.dot(a, tl.trans(w_desc.load([pid_n * BLOCK_N, k0])), acc)
        if SUM_SQ:
            if LANE_SUMS:
                sum_sq = tl.sum(lane_sq, axis=1)
            acc = acc * tl.math.rsqrt(sum_sq / K + eps)[:, None]
        y_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(y_desc.dtype))


def launch_variant(x, norm_weight, weight, y, config: GemmConfig, scale: bool, sum_sq: bool, lane_sums: bool):
    M, K = x.shape
    N = weight.shape[0]
    programs = min(triton.cdiv(M, config.BLOCK_M) * triton.cdiv(N, config.BLOCK_N), _sm_count(x.device))
    return _ablation_kernel[(programs,)](
        TensorDescriptor.from_tensor(x, [config.BLOCK_M, config.BLOCK_K]), norm_weight,
        TensorDescriptor.from_tensor(weight, [config.BLOCK_N, config.BLOCK_K]),
        TensorDescriptor.from_tensor(y, [config.BLOCK_M, config.BLOCK_N]),
        M, N, K, programs, 1e-5, SCALE=scale, SUM_SQ=sum_sq, LANE_SUMS=lane_sums,
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N, BLOCK_K=config.BLOCK_K, GROUP_M=config.GROUP_M,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def tiles(config: GemmConfig) -> str:
    return f"{config.BLOCK_M}x{config.BLOCK_N}x{config.BLOCK_K} w{config.num_warps} s{config.num_stages}"


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3-8b,llama3-70b")
    parser.add_argument("--ms", default="2048,16384")
    parser.add_argument("--out", default="out")
    args = parser.parse_args()
    dtype = torch.bfloat16
    env = environment()
    rows = []
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; bf16; µs per call, CUDA graph")
    for name in args.shapes.split(","):
        K, N = SHAPES[name]
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies_for(N * K * 2))]
        norm_weight = torch.rand(K, device="cuda", dtype=dtype) + 0.5
        for M in map(int, args.ms.split(",")):
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = torch.empty(M, N, device="cuda", dtype=dtype)
            cublas_us = time_graph([(lambda w=w: F.linear(x, w)) for w in weights], replays=5)
            library_us = time_graph([(lambda w=w: launch_tma(x, norm_weight, w, None, y, 1e-5, False)) for w in weights],
                                    replays=5)
            print(f"{name} M={M}: cuBLAS, no norm {cublas_us:.1f}; hf_fused TMA kernel {library_us:.1f} "
                  f"({tiles(tma_config(M, N, K))})", flush=True)
            row = {"shape": name, "M": M, "K": K, "N": N, "cublas_us": cublas_us, "library_tma_us": library_us,
                   "variants": []}
            for config in (tma_config(M, N, K), *EXTRA_CONFIGS):
                for variant, flags in VARIANTS.items():
                    try:
                        compiled = launch_variant(x, norm_weight, weights[0], y, config, *flags)
                        us = time_graph([(lambda w=w: launch_variant(x, norm_weight, w, y, config, *flags))
                                         for w in weights], replays=5)
                    except Exception as error:  # a config past the shared-memory limit fails to compile
                        print(f"  {tiles(config)} {variant}: {type(error).__name__}: {error}", flush=True)
                        continue
                    regs, spills = getattr(compiled, "n_regs", None), getattr(compiled, "n_spills", None)
                    print(f"  {tiles(config):20s} {variant:10s} {us:8.1f} us  {cublas_us / us:5.2f}x cuBLAS  "
                          f"regs {regs} spills {spills}", flush=True)
                    row["variants"].append({"config": vars(config), "variant": variant, "us": us,
                                            "n_regs": regs, "n_spills": spills})
            rows.append(row)
            del x, y
        del weights
        torch.cuda.empty_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablate_tma_prefill.json").write_text(json.dumps({**env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
