"""The fused RMSNorm+QKV op against the unfused PyTorch paths, torch.compile and cuBLAS.

    python benchmarks/bench_rmsnorm_qkv.py --out out/

For each shape (K -> N) and token count M, in bf16, it times:
  fused       hf_fused.ops.rmsnorm_qkv (for M > 64 its default prefill path: Triton norm, then cuBLAS)
  fused_gemm  for M > 64, the single fused tl.dot GEMM kernel instead
  eager3      LlamaRMSNorm, then three nn.Linear (what transformers runs)
  compiled3   torch.compile of eager3
  compiled1   torch.compile of the norm and one linear on the concatenated weight (strongest peer)
  gemm_only   cuBLAS F.linear on the concatenated weight, no norm at all
Each as µs per call in a CUDA graph that replays one call per weight copy over >= 400 MB of
copies (so weights stream from HBM, not L2), and in launch mode (back-to-back eager calls).
The floor is max(bytes / copy bandwidth, flops / matmul rate), both measured in this run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import (  # noqa: E402
    copies_for,
    environment,
    measure_copy_bandwidth,
    measure_matmul_flops,
    time_graph,
    time_launches,
)

from hf_fused.ops import rmsnorm_qkv, rmsnorm_qkv_ref  # noqa: E402
from hf_fused.ops.rmsnorm_qkv import DECODE_MAX_M, rmsnorm_qkv_2d  # noqa: E402

SHAPES = {  # name: (K hidden, N = q + k + v rows)
    "smollm2-135m": (576, 960),
    "llama3.2-1b": (2048, 3072),
    "llama3-8b": (4096, 6144),
    "llama3-70b": (8192, 10240),
}
HEAD_SPLIT = {  # q rows, kv rows
    "smollm2-135m": (576, 192),
    "llama3.2-1b": (2048, 512),
    "llama3-8b": (4096, 1024),
    "llama3-70b": (8192, 1024),
}
VARIANTS = ["fused", "eager3", "compiled3", "compiled1", "gemm_only"]
PEERS = VARIANTS[1:]
EPS = 1e-5


class UnfusedQKV(torch.nn.Module):
    """The transformers path: a LlamaRMSNorm module, then three separate projections."""

    def __init__(self, norm_weight, qkv_weight, q_rows, kv_rows):
        super().__init__()
        K = norm_weight.shape[0]
        self.norm = LlamaRMSNorm(K, eps=EPS).to(norm_weight)
        self.norm.weight.data = norm_weight
        wq, wk, wv = qkv_weight.split([q_rows, kv_rows, kv_rows])
        self.q, self.k, self.v = (torch.nn.Linear(K, w.shape[0], bias=False) for w in (wq, wk, wv))
        for linear, w in zip((self.q, self.k, self.v), (wq, wk, wv)):
            linear.weight.data = w

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h), self.v(h)


def norm_then_linear(x, norm_weight, qkv_weight):
    return rmsnorm_qkv_ref(x, norm_weight, qkv_weight, eps=EPS)


def norm_then_three_linears(x, norm_weight, wq, wk, wv):
    """UnfusedQKV as a function of its weights, so one compiled graph serves every weight copy."""
    h = norm_weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return F.linear(h, wq), F.linear(h, wk), F.linear(h, wv)


def bench_point(name, M, bandwidth, flops, compiled3, compiled1):
    K, N = SHAPES[name]
    q_rows, kv_rows = HEAD_SPLIT[name]
    dtype = torch.bfloat16
    copies = copies_for(N * K * 2)
    weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies)]
    norm_weights = [torch.rand(K, device="cuda", dtype=dtype) + 0.5 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    unfused = [UnfusedQKV(nw, w, q_rows, kv_rows) for nw, w in zip(norm_weights, weights)]

    calls = {
        "fused": [lambda nw=nw, w=w: rmsnorm_qkv(x, nw, w, eps=EPS) for nw, w in zip(norm_weights, weights)],
        "eager3": [lambda m=m: m(x) for m in unfused],
        "compiled3": [
            lambda m=m: compiled3(x, m.norm.weight, m.q.weight, m.k.weight, m.v.weight) for m in unfused
        ],
        "compiled1": [lambda nw=nw, w=w: compiled1(x, nw, w) for nw, w in zip(norm_weights, weights)],
        "gemm_only": [lambda w=w: F.linear(x, w) for w in weights],
    }
    if M > DECODE_MAX_M:
        calls["fused_gemm"] = [
            lambda nw=nw, w=w: rmsnorm_qkv_2d(x, nw, w, None, EPS, False, prefill="fused")
            for nw, w in zip(norm_weights, weights)
        ]
    exact = rmsnorm_qkv_ref(x, norm_weights[0], weights[0], eps=EPS, upcast=True)
    fused_err = (rmsnorm_qkv(x, norm_weights[0], weights[0], eps=EPS).double() - exact).norm() / exact.norm()
    torch_err = (norm_then_linear(x, norm_weights[0], weights[0]).double() - exact).norm() / exact.norm()

    weight_bytes = N * K * 2
    moved = weight_bytes + (M * K + M * N + K) * 2
    floor_us = max(moved / bandwidth, 2 * M * N * K / flops) * 1e6
    row = {"shape": name, "M": M, "K": K, "N": N, "copies": copies, "floor_us": floor_us, "bytes": moved,
           "fused_rel_err": fused_err.item(), "torch_rel_err": torch_err.item()}
    for variant, fns in calls.items():
        row[f"{variant}_graph_us"] = time_graph(fns)
        row[f"{variant}_launch_us"] = time_launches(fns)
    del weights, norm_weights, unfused, calls
    torch.cuda.empty_cache()
    return row


def format_table(rows) -> str:
    lines = [
        "| shape | M | fused µs | GB/s | TFLOP/s | % of floor | eager3 | compiled3 | compiled1 | cuBLAS no norm "
        "| floor | vs best peer | fused GEMM kernel | fused launch | eager3 launch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        us = r["fused_graph_us"]
        best_peer = min(r[f"{p}_graph_us"] for p in PEERS)
        lines.append(
            f"| {r['shape']} | {r['M']} | {us:.1f} | {r['bytes'] / us / 1e3:.0f} "
            f"| {2 * r['M'] * r['N'] * r['K'] / us / 1e6:.1f} | {100 * r['floor_us'] / us:.0f}% | "
            + " | ".join(f"{r[f'{p}_graph_us']:.1f}" for p in PEERS)
            + f" | {r['floor_us']:.1f} | {best_peer / us:.2f}x "
            + (f"| {r['fused_gemm_graph_us']:.1f} " if "fused_gemm_graph_us" in r else "| - ")
            + f"| {r['fused_launch_us']:.1f} "
            f"| {r['eager3_launch_us']:.1f} |"
        )
    return "\n".join(lines)


def plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    fig, axes = plt.subplots(1, len(shapes), figsize=(4.5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sub = [r for r in rows if r["shape"] == shape]
        ms = [r["M"] for r in sub]
        for variant in VARIANTS:
            ax.plot(ms, [r["floor_us"] / r[f"{variant}_graph_us"] for r in sub], marker="o", label=variant)
        ax.set(xscale="log", title=shape, xlabel="M (tokens)", ylabel="fraction of floor", ylim=(0, 1.05))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_table(result: dict) -> None:
    print(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, {result['date']}; "
          f"copy {result['copy_Bps'] / 1e12:.2f} TB/s, matmul {result['matmul_flops'] / 1e12:.0f} TFLOP/s; "
          "bf16; µs per call, CUDA graph")
    print(format_table(result["rows"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,16,256,2048,16384")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--out", default="out")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.table).read_text()))
        return
    torch.manual_seed(0)
    env = environment()
    bandwidth, flops = measure_copy_bandwidth(), measure_matmul_flops()
    print(f"{env}\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")

    # Each new (K, N, M) is a recompile; keep them all compiled rather than falling back to eager.
    torch._dynamo.config.recompile_limit = 64
    compiled3 = torch.compile(norm_then_three_linears)
    compiled1 = torch.compile(norm_then_linear)
    rows = []
    for name in args.shapes.split(","):
        for M in map(int, args.ms.split(",")):
            row = bench_point(name, M, bandwidth, flops, compiled3, compiled1)
            rows.append(row)
            print(f"{time.strftime('%X')} {name:14s} M={M:6d} fused {row['fused_graph_us']:8.1f} us, floor {row['floor_us']:8.1f} us, "
                  f"best peer {min(row[f'{p}_graph_us'] for p in PEERS):8.1f} us", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**env, "copy_Bps": bandwidth, "matmul_flops": flops, "rows": rows}
    (out / "bench_rmsnorm_qkv.json").write_text(json.dumps(result, indent=1))
    plot(rows, out / "bench_rmsnorm_qkv.png")
    print()
    print_table(result)


if __name__ == "__main__":
    main()
