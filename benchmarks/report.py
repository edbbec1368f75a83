"""What the op benchmarks share: the command line, the floor, the table, the plot and the JSON.

Each op's script (bench_rmsnorm_qkv.py, bench_rmsnorm_gate_up.py) writes its variants and its
`bench_point`, describes itself in an `OpBench` and hands that to `main`. The GPU timing itself
is in timing.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from timing import environment, measure_copy_bandwidth, measure_matmul_flops, time_graph, time_launches


@dataclass(frozen=True)
class OpBench:
    """One op's benchmark. Every row holds shape, M, K, N (the GEMM's output features), bytes,
    floor_us and, per variant, <variant>_graph_us and <variant>_launch_us."""

    stem: str  # the output files: <out>/<stem>.json and <out>/<stem>.png
    shapes: Sequence[str]  # the shapes bench_point knows, the default --shapes
    peers: dict[str, str]  # variant: its column; "vs best peer" is the fastest of these over "fused"
    extra: dict[str, str]  # row key: its column after "vs best peer"; "-" where a row lacks the key
    bench_point: Callable[[str, int, float, float], dict]  # (shape, M, copy B/s, matmul FLOP/s) -> row

    @property
    def variants(self) -> list[str]:
        return ["fused", *self.peers]


@functools.cache
def compiled(fn: Callable) -> Callable:
    """One torch.compile of fn for the whole run, so that each new shape or M recompiles it."""
    return torch.compile(fn)


def floor_us(moved_bytes: int, flop_count: int, bandwidth: float, flops: float) -> float:
    """The slower of moving the bytes at the copy bandwidth and doing the flops at the matmul rate."""
    return max(moved_bytes / bandwidth, flop_count / flops) * 1e6


def rel_err(y: Tensor, exact: Tensor) -> float:
    """Relative Frobenius error against an fp64 result."""
    return ((y.double() - exact).norm() / exact.norm()).item()


def time_variants(calls: dict[str, Sequence[Callable[[], object]]]) -> dict[str, float]:
    """Each variant's µs per call in a CUDA graph and in launch mode, keyed as rows hold them."""
    row = {}
    for variant, fns in calls.items():
        row[f"{variant}_graph_us"] = time_graph(fns)
        row[f"{variant}_launch_us"] = time_launches(fns)
    return row


def format_table(rows: Sequence[dict], op: OpBench) -> str:
    # An extra column shows where some row of the run has it: runs before a column existed print as they did.
    extra = {key: name for key, name in op.extra.items() if any(key in r for r in rows)}
    headers = ["shape", "M", "fused µs", "GB/s", "TFLOP/s", "% of floor", *op.peers.values(), "floor",
               "vs best peer", *extra.values()]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        us = r["fused_graph_us"]
        best_peer = min(r[f"{p}_graph_us"] for p in op.peers)
        cells = [
            r["shape"], str(r["M"]), f"{us:.1f}", f"{r['bytes'] / us / 1e3:.0f}",
            f"{2 * r['M'] * r['N'] * r['K'] / us / 1e6:.1f}", f"{100 * r['floor_us'] / us:.0f}%",
            *(f"{r[f'{p}_graph_us']:.1f}" for p in op.peers),
            f"{r['floor_us']:.1f}", f"{best_peer / us:.2f}x",
            *(f"{r[key]:.1f}" if key in r else "-" for key in extra),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_table(result: dict, op: OpBench) -> None:
    print(f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, {result['date']}; "
          f"copy {result['copy_Bps'] / 1e12:.2f} TB/s, matmul {result['matmul_flops'] / 1e12:.0f} TFLOP/s; "
          "bf16; µs per call, CUDA graph")
    print(format_table(result["rows"], op))


def plot(rows: Sequence[dict], op: OpBench, path: Path) -> None:
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
        for variant in op.variants:
            ax.plot(ms, [r["floor_us"] / r[f"{variant}_graph_us"] for r in sub], marker="o", label=variant)
        ax.set(xscale="log", title=shape, xlabel="M (tokens)", ylabel="fraction of floor", ylim=(0, 1.05))
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(op: OpBench, doc: str, argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ms", default="1,16,256,2048,16384")
    parser.add_argument("--shapes", default=",".join(op.shapes))
    parser.add_argument("--out", default="out")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        print_table(json.loads(Path(args.table).read_text()), op)
        return
    shapes = args.shapes.split(",")
    if unknown := [s for s in shapes if s not in op.shapes]:
        parser.error(f"unknown shapes {unknown}; known: {', '.join(op.shapes)}")
    torch.manual_seed(0)
    env = environment()
    bandwidth, flops = measure_copy_bandwidth(), measure_matmul_flops()
    print(f"{env}\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s, bf16 matmul {flops / 1e12:.0f} TFLOP/s")

    # Each new (K, N, M) is a recompile; keep them all compiled rather than falling back to eager.
    torch._dynamo.config.recompile_limit = 64
    rows = []
    for name in shapes:
        for M in map(int, args.ms.split(",")):
            # Inference, as generate runs it: no variant pays for autograd bookkeeping.
            with torch.no_grad():
                row = op.bench_point(name, M, bandwidth, flops)
            rows.append(row)
            print(f"{time.strftime('%X')} {name:14s} M={M:6d} fused {row['fused_graph_us']:8.1f} us, "
                  f"floor {row['floor_us']:8.1f} us, best peer {min(row[f'{p}_graph_us'] for p in op.peers):8.1f} us",
                  flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {**env, "copy_Bps": bandwidth, "matmul_flops": flops, "rows": rows}
    (out / f"{op.stem}.json").write_text(json.dumps(result, indent=1))
    plot(rows, op, out / f"{op.stem}.png")
    print()
    print_table(result, op)


def case_main(doc: str, stem: str, cases: Sequence[tuple], bench_point: Callable[..., dict],
              format_table: Callable[[dict], str], argv: Sequence[str] | None = None) -> None:
    """main for a benchmark of fixed cases rather than weight shapes (the decode attention, the
    rotary + cache write): ``bench_point(*case, copy B/s)`` gives each case's row, which holds
    fused_graph_us; ``format_table(result)`` prints the run, also for --table."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    if args.table:
        print(format_table(json.loads(Path(args.table).read_text())))
        return
    if not torch.cuda.is_available():
        raise SystemExit(f"{stem} times CUDA kernels: it needs a GPU")
    torch.manual_seed(0)
    env, bandwidth = environment(), measure_copy_bandwidth()
    print(f"{env}\ncopy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    with torch.no_grad():
        for case in cases:
            rows.append(row := bench_point(*case, bandwidth))
            timings = ", ".join(f"{k[: -len('_graph_us')]} {v:.1f}" for k, v in row.items() if k.endswith("_graph_us"))
            print(f"{time.strftime('%X')} {case}: {timings} us; floor {row['floor_us']:.2f}", flush=True)
    result = {**env, "copy_Bps": bandwidth, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    print()
    print(format_table(result))
