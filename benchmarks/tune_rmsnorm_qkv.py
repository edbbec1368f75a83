"""Sweep kernel configs of the fused ops on the GPU; the heuristics in hf_fused/ops/rmsnorm_qkv.py
(decode_config, gemm_config) are read off its output.

    python benchmarks/tune_rmsnorm_qkv.py --out out/tune.json
    python benchmarks/tune_rmsnorm_qkv.py --op gate_up --ms 1,16 --out out/tune_gate_up.json
    python benchmarks/tune_rmsnorm_qkv.py --op linear --ms 1 --out out/tune_linear.json
    python benchmarks/tune_rmsnorm_qkv.py --prefill tma --ms 2048,16384 --out out/tune_tma.json

Past 64 tokens the QKV op's sweep times the prefill kernel that --prefill names: the fused
tl.dot GEMM (gemm_config) or the persistent TMA one (tma_config), over the same tile grid.

The gate_up and streaming linear ops sweep their kernels up to 16 tokens (their multi_token="stream"
paths from two tokens on; more tokens take cuBLAS). The gate_up op's rows per program count output
columns, each streaming one row of W_gate and one of W_up.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_rmsnorm_gate_up  # noqa: E402
import bench_rmsnorm_qkv  # noqa: E402
import bench_streaming_linear  # noqa: E402
from timing import copies_for, environment, time_graph  # noqa: E402

from hf_fused.ops.rmsnorm_gate_up import STREAM_MAX_M  # noqa: E402
from hf_fused.ops.rmsnorm_qkv import (  # noqa: E402
    DECODE_MAX_M,
    DecodeConfig,
    GemmConfig,
    decode_config,
    gemm_config,
    launch_decode,
    launch_gemm,
    launch_tma,
    rmsnorm_qkv_2d,
    tma_config,
)


# A one-token program holds a (BLOCK_N, BLOCK_K) fp32 accumulator and two weight tiles in
# registers (gate_up: two of each); past this many accumulator elements ptxas spills and can
# take minutes per config.
MAX_TILE = 16384
# (rows per program, BLOCK_K, num_warps) of the one-token CUDA-core kernels: from 16 to 64 KB of
# weights in flight per program, on 4 or 8 warps.
ONE_TOKEN_GRID = ((8, 512, 4), (8, 1024, 4), (8, 1024, 8), (16, 512, 4), (16, 512, 8), (16, 1024, 8),
                  (32, 256, 4), (32, 512, 8))


# The TMA kernel's x and W tiles wait in shared memory, num_stages of them, and so does its output
# tile on the way out (Hopper has 227 KB an SM; the rest is scratch for layout changes). Its fp32
# accumulator sits in registers: at most 128 of them a thread.
TMA_SHARED_BYTES = 212 * 1024


def candidate_configs(M: int, N: int, K: int, accumulators: int = 1, prefill: str = "fused",
                      orientations: tuple[bool, ...] = (False, True)) -> list:
    if M <= DECODE_MAX_M:
        wide_norm = max(128, min(1 << (K - 1).bit_length(), 4096))
        if M == 1:  # CUDA cores, hand double-buffered: num_stages has no pipelined loop to act on
            return [DecodeConfig(1, bk, wide_norm, w, 1, r // accumulators) for r, bk, w in ONE_TOKEN_GRID
                    if r * bk <= MAX_TILE]
        # Tensor cores: num_stages is how many weight tiles the pipeliner keeps in flight. Rows
        # per program None gives every SM one equal share (no partial last wave); the norm's
        # block and stages set how its row reduction loads x before the stream starts;
        # tokens_as_rows picks the product's orientation (DecodeConfig). 16 and 32 rows a program
        # never led the H200's sweep at the 8B and 70B shapes (docs/h200/session2/tune_qkv_m16.json);
        # a smaller weight (1B's 3072 x 2048: 96 programs of 32 rows on an H100's 132 SMs) tries them.
        block_m = max(16, 1 << (M - 1).bit_length())
        if N * K >= 4096 * 4096:
            grid = itertools.product(orientations, [128, 256], [4, 8], [4], [64, None],
                                     [(128, 1), (512, 1), (128, 3)])  # (NORM_BLOCK_K, NORM_STAGES)
        else:
            grid = itertools.product(orientations, [128], [4, 8], [4], [16, 32, 64, None], [(128, 1), (512, 1)])
        return [DecodeConfig(block_m, bk, nbk, w, s, r, tokens_as_rows, ns)
                for tokens_as_rows, bk, w, s, r, (nbk, ns) in grid if block_m * nbk <= MAX_TILE]
    if prefill == "tma":
        grid = itertools.product([64, 128], [128, 256], [64, 128], [4, 8], [3, 4])
        return [GemmConfig(bm, bn, bk, w, s) for bm, bn, bk, w, s in grid
                if (s * (bm + bn) * bk + bm * bn) * 2 <= TMA_SHARED_BYTES and bm * bn <= 128 * 32 * w]
    grid = itertools.product([64, 128], [64, 128, 256], [32, 64, 128], [4, 8], [3, 4])
    return [GemmConfig(bm, bn, bk, w, s) for bm, bn, bk, w, s in grid if bm * bk + bn * bk <= 256 * 64]


def gate_up_launchers(M: int, N: int, K: int):
    """The gate_up op's default decode config and launcher, in the QKV launchers' call shape.
    The heuristic is the one launch_decode applies when it is given no config."""
    op = importlib.import_module("hf_fused.ops.rmsnorm_gate_up")  # the package re-exports a function of that name
    default = decode_config(M, N, K, torch.device("cuda"))
    default = replace(default, rows_per_program=None if default.rows_per_program is None else max(1, default.rows_per_program // 2))

    def launch(x, norm_weight, weight, bias, y, eps, gemma, config):
        op.launch_decode(x, norm_weight, weight, y, eps, gemma, "silu", config)

    return default, launch


def linear_launchers(M: int, N: int, K: int):
    """The streaming linear op's heuristic, its candidates and launcher, in the QKV launchers' call
    shape. A few tokens sweep the tensor-core path's tiles and pipeline depth."""
    op = importlib.import_module("hf_fused.ops.streaming_linear")
    if M == 1:
        candidates = [op.StreamConfig(bk, w, r) for r, bk, w in ONE_TOKEN_GRID]
    else:
        grid = itertools.product([64, 128, 256], [4, 8], [32, 64, None], [3, 4, 6])
        candidates = [op.StreamConfig(bk, w, r, s) for bk, w, r, s in grid if bk * s <= 1024]

    def launch(x, norm_weight, weight, bias, y, eps, gemma, config):
        op.launch_stream(x, weight, bias, y, config)

    return op.stream_config(N, K, torch.device("cuda"), M), candidates, launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--op", choices=["qkv", "gate_up", "linear"], default="qkv")
    parser.add_argument("--ms", default="1,16,256,2048,16384")
    parser.add_argument("--prefill", choices=["fused", "tma"], default="fused",
                        help="the QKV prefill kernel swept past 64 tokens")
    parser.add_argument("--shapes", default=None, help="comma list; default every shape of the op's benchmark")
    parser.add_argument("--out", default="out/tune_rmsnorm_qkv.json")
    args = parser.parse_args()
    shapes = {"qkv": bench_rmsnorm_qkv.SHAPES, "gate_up": bench_rmsnorm_gate_up.SHAPES,
              "linear": bench_streaming_linear.SHAPES}[args.op]
    dtype = torch.bfloat16
    results = []
    for name in (args.shapes or ",".join(shapes)).split(","):
        K, N = shapes[name]
        if args.op == "gate_up":
            N *= 2  # the benchmark names the intermediate size I; the weight is [Wg; Wu], (2I, K)
        copies = copies_for(N * K * 2)
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies)]
        norm_weight = torch.rand(K, device="cuda", dtype=dtype) + 0.5
        for M in map(int, args.ms.split(",")):
            decode = M <= DECODE_MAX_M
            if args.op in ("linear", "gate_up") and M > STREAM_MAX_M:
                continue  # more tokens take cuBLAS
            if args.op == "linear":
                default, candidates, launch = linear_launchers(M, N, K)
            elif args.op == "gate_up":
                default, launch = gate_up_launchers(M, N, K)
            else:
                prefill_config, prefill_launch = {"fused": (gemm_config, launch_gemm), "tma": (tma_config, launch_tma)}[args.prefill]
                default = decode_config(M, N, K, torch.device("cuda")) if decode else prefill_config(M, N, K)
                launch = launch_decode if decode else prefill_launch
            if args.op != "linear":
                # Each gate_up output row streams two weight rows, into two accumulators; its
                # tensor-core path takes the tokens as rows only.
                candidates = candidate_configs(M, N, K, 1 if args.op == "qkv" else 2, args.prefill,
                                               (False, True) if args.op == "qkv" else (True,))
            x = torch.randn(M, K, device="cuda", dtype=dtype)
            y = torch.empty(M, N // 2 if args.op == "gate_up" else N, device="cuda", dtype=dtype)
            timings = []
            for config in [default] + candidates:
                calls = [(lambda w=w, c=config, x=x, y=y: launch(x, norm_weight, w, None, y, 1e-5, False, c)) for w in weights]
                try:
                    us = time_graph(calls, replays=5)
                except Exception as error:  # configs past the shared-memory limit fail to compile
                    print(f"  skip {config}: {type(error).__name__}", file=sys.stderr)
                    continue
                timings.append((us, config))
                print(f"    {us:9.2f} us  {config}", flush=True)
            # The QKV targets past one token are cuBLAS on the same weight with no norm, timed the
            # same way; a few tokens also time the split path (Triton norm, then cuBLAS).
            cublas_us = split_us = None
            if args.op == "qkv" and M > 1:
                cublas_us = time_graph([(lambda w=w, x=x: F.linear(x, w)) for w in weights], replays=5)
            if args.op == "qkv" and 1 < M <= DECODE_MAX_M:
                split_us = time_graph([(lambda w=w, x=x: rmsnorm_qkv_2d(x, norm_weight, w, None, 1e-5, False,
                                                                        multi_token="split")) for w in weights],
                                      replays=5)
            timings.sort(key=lambda t: t[0])
            default_us = next((us for us, c in timings if c == default), float("nan"))  # nan: failed to compile
            best_us, best = timings[0]
            versus = "" if cublas_us is None else f"  cuBLAS, no norm {cublas_us:8.2f} us"
            versus += "" if split_us is None else f"  split {split_us:8.2f} us"
            print(f"{args.op} {name:14s} M={M:6d} heuristic {default_us:8.2f} us  best {best_us:8.2f} us  {best}{versus}",
                  flush=True)
            results.append({"op": args.op, "prefill": None if decode else args.prefill, "shape": name,
                            "M": M, "K": K, "N": N, "heuristic_us": default_us, "cublas_us": cublas_us, "split_us": split_us,
                            "top": [{"us": us, **vars(c)} for us, c in timings[:8]]})
            del x, y
        del weights
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({**environment(), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
