"""Where a decode step's time goes: each kernel of one fast-loop step against its bytes floor.

    python benchmarks/profile_decode.py --shape llama3-8b --fuse qkv,mlp --out out/
    python benchmarks/profile_decode.py --table out/profile_llama3-8b_qkv-mlp_b1.json    # reprint a run

It builds a random-weight model at a real shape, patches it (``--fuse none`` leaves it stock),
runs hf_fused.generate once so the decode step is compiled and captured as a CUDA graph, then
profiles the last decode steps of a second run with torch.profiler. The kernels of a step are
split into decoder layers at the first kernel that runs once per layer; each position of a layer
is averaged over layers.

Each projection's cuBLAS kernel is named from the layer's projection order (the fused and
streamed ones removed), as is each streaming_linear kernel from the streamed projections' order,
and each named kernel gets a floor: the bytes it must read (weights, or the whole
static K/V cache for attention) over the copy bandwidth measured in the same run. The table
ends with the step's total, its kernels' sum, and the gap between them (launch and idle time).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment, measure_copy_bandwidth  # noqa: E402

import hf_fused  # noqa: E402
from hf_fused import generation  # noqa: E402
from hf_fused.patches import DEFAULT_FUSE  # noqa: E402
from hf_fused.models import SHAPES, build_random_model, shape_config, weight_bytes  # noqa: E402

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FUSED_AWAY = {"qkv": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj"), "gemv": ("o_proj", "down_proj")}
STREAMING = "_streaming_linear_kernel"
CUBLAS = re.compile(r"gemm|gemv|nvjet|cutlass|xmma|sm90_", re.IGNORECASE)
CUBLAS_REDUCE = re.compile(r"splitkreduce|reduce_kernel", re.IGNORECASE)
ATTENTION = re.compile(r"flash|fmha|attention|sdpa", re.IGNORECASE)
FUSED_OPS = {
    "_rmsnorm_qkv_decode_kernel": "norm+qkv (hf_fused)",
    "_rmsnorm_gate_up_decode_kernel": "norm+gate/up (hf_fused)",
    "_decode_partial_kernel": "attention (hf_fused)",
    "_decode_reduce_kernel": "attention reduce (hf_fused)",
    "_rope_cache_kernel": "rotary + cache write (hf_fused)",
}


def profile_steps(model, ids, skip: int, steps: int) -> tuple[list[list[tuple[str, float]]], float]:
    """Kernels (name, µs) in launch order of ``steps`` decode steps of hf_fused.generate, after
    ``skip`` unprofiled ones, and the steps' mean wall time in µs.

    generate calls its callback once per token, between decode steps, so the callback starts and
    stops the profiler: the window holds whole steps, with the loop's own small kernels.
    """
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calls = 0

    def on_token(_token):
        nonlocal calls
        calls += 1
        if calls == skip + 1:
            torch.cuda.synchronize()
            profiler.start()
            start.record()
        elif calls == skip + 1 + steps:
            end.record()
            torch.cuda.synchronize()
            profiler.stop()

    generation.generate(model, ids, skip + steps + 1, callback=on_token)
    kernels = sorted(
        (e.time_range.start, e.name, e.time_range.elapsed_us())
        for e in profiler.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    )
    if not kernels or len(kernels) % steps:
        raise RuntimeError(f"the profiler saw {len(kernels)} kernels for {steps} steps; cannot split them into steps")
    per_step = len(kernels) // steps
    split = [[(name, us) for _, name, us in kernels[i * per_step : (i + 1) * per_step]] for i in range(steps)]
    return split, start.elapsed_time(end) * 1e3 / steps


def split_layers(kernels: list[str], n_layers: int) -> tuple[list[int], int]:
    """Start index of each typical layer, and its kernel count.

    Layers start at the first kernel name seen once per layer. A layer whose kernel count
    differs from the most common one (the compiler may fuse across the first or last layer's
    boundary) is left out of the per-position means.
    """
    counts = collections.Counter(kernels)
    anchor = next((name for name in kernels if counts[name] == n_layers), None)
    if anchor is None:
        raise RuntimeError(f"no kernel runs exactly once per layer ({n_layers} layers)")
    starts = [i for i, name in enumerate(kernels) if name == anchor]
    lengths = [b - a for a, b in zip(starts, starts[1:])]
    period = collections.Counter(lengths).most_common(1)[0][0]
    return [a for a, n in zip(starts, lengths) if n == period], period


def label_layer(names: list[str], fuse: tuple[str, ...]) -> list[str]:
    """A label per kernel of one layer: its projection, attention, a fused op, or other."""
    streams = [i for i, n in enumerate(names) if n == STREAMING]
    # streaming_linear runs its kernel for one token only, cuBLAS for more.
    streamed = list(FUSED_AWAY["gemv"]) if "gemv" in fuse and streams else []
    projections = [p for p in PROJECTIONS if p not in streamed and not any(p in FUSED_AWAY.get(f, ()) for f in fuse if f != "gemv")]
    # cuDNN's attention kernels can carry GEMM-like words in their names: attention is matched first.
    mains = [i for i, n in enumerate(names)
             if CUBLAS.search(n) and not CUBLAS_REDUCE.search(n) and not ATTENTION.search(n)]
    named = dict(zip(mains, projections)) if len(mains) == len(projections) else {}
    named.update(dict(zip(streams, streamed)) if len(streams) == len(streamed) else {})
    labels = []
    for i, name in enumerate(names):
        if i in named:
            labels.append(named[i])
        elif ATTENTION.search(name):
            # Inductor names its kernels after the ops they fuse: these feed the attention kernel.
            labels.append("attention inputs (inductor)" if name.startswith("triton_") else "attention")
        elif CUBLAS_REDUCE.search(name) and labels and labels[-1] in PROJECTIONS:
            labels.append(labels[-1] + " (split-K reduce)")
        elif name in FUSED_OPS:
            labels.append(FUSED_OPS[name])
        else:
            labels.append("other")
    return labels


def floor_bytes(model, label: str, cache_len: int, batch: int) -> int | None:
    """Bytes a kernel with this label must read at least, per layer."""
    layer = model.model.layers[0]
    attn, mlp = layer.self_attn, layer.mlp
    if label in PROJECTIONS:
        weight = getattr(attn if label in ("q_proj", "k_proj", "v_proj", "o_proj") else mlp, label).weight
        return weight.numel() * weight.element_size()
    if label == "norm+qkv (hf_fused)":
        return layer.self_attn.qkv_fused.weight.numel() * 2
    if label == "norm+gate/up (hf_fused)":
        return mlp.gate_up_fused.weight.numel() * 2
    if label in ("attention", "attention (hf_fused)"):
        config = model.config
        return 2 * batch * cache_len * config.num_key_value_heads * config.head_dim * 2
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--fuse", default=",".join(DEFAULT_FUSE),
                        help="comma list of qkv, mlp, gemv, attention (default: the first three); or none for the stock model")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=256, help="sets the static cache length, as compare_tps")
    parser.add_argument("--steps", type=int, default=20, help="profiled decode steps, the last ones of the run")
    parser.add_argument("--out", default="out")
    parser.add_argument("--table", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args()
    if args.table:
        print_report(json.loads(Path(args.table).read_text()))
        return
    fuse = () if args.fuse == "none" else tuple(args.fuse.split(","))

    bandwidth = measure_copy_bandwidth()
    model = build_random_model(args.shape, torch.bfloat16, "cuda")
    if fuse:
        hf_fused.patch_model(model, fuse=fuse)
    ids = torch.randint(model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    generation.generate(model, ids, args.new_tokens)  # compiles and captures the decode step
    # The profiled run has the same cache length as compare_tps (prompt + new tokens), so the
    # attention reads the same static cache.
    steps, step_us = profile_steps(model, ids, skip=args.new_tokens - 1 - args.steps, steps=args.steps)
    names = [name for name, _ in steps[0]]
    if any([n for n, _ in s] != names for s in steps):
        raise RuntimeError("the decode steps launched different kernels")
    us = [statistics.median(s[i][1] for s in steps) for i in range(len(names))]
    n_layers = model.config.num_hidden_layers
    starts, period = split_layers(names, n_layers)
    labels = label_layer(names[starts[0] : starts[0] + period], fuse)
    cache_len = args.prompt_len + args.new_tokens
    rows = []
    for pos in range(period):
        floor = floor_bytes(model, labels[pos], cache_len, args.batch)
        floor_us = None if floor is None else floor / bandwidth * 1e6
        mean_us = statistics.mean(us[s + pos] for s in starts)
        rows.append({"pos": pos, "kernel": names[starts[0] + pos], "label": labels[pos], "us": mean_us,
                     "floor_us": floor_us, "pct_of_floor": None if floor_us is None else 100 * floor_us / mean_us})
    # The kernels before the first typical layer and after the last: the embedding, the first
    # and last layers where the compiler fused across their boundary, the final norm, lm_head
    # and the token choice.
    end = starts[-1] + period
    outside = [{"pos": i, "kernel": names[i], "us": us[i]} for i in (*range(starts[0]), *range(end, len(names)))]
    kernels_us = sum(us)
    typical_us = sum(r["us"] for r in rows)

    result = {**environment(), "shape": args.shape, "fuse": list(fuse), "batch": args.batch, "cache_len": cache_len,
              "copy_bandwidth_gbs": bandwidth / 1e9, "step_us": step_us, "kernels_us": kernels_us,
              "n_layers": n_layers, "typical_layers": len(starts), "typical_layer_us": typical_us, "layer": rows, "outside_layers": outside,
              "step_kernels": list(zip(names, us)), "tok_s": args.batch * 1e6 / step_us,
              "weight_floor_us": weight_bytes(model) / bandwidth * 1e6}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{args.shape}_{'-'.join(fuse) or 'stock'}_b{args.batch}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))

    print_report(result)


def weight_floor_us(result: dict) -> float:
    """Every weight read once at the run's copy bandwidth; runs from before this was recorded
    get it from their shape, on a model with no storage."""
    if "weight_floor_us" in result:
        return result["weight_floor_us"]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(shape_config(result["shape"]), dtype=torch.bfloat16)
    return weight_bytes(model) / (result["copy_bandwidth_gbs"] * 1e9) * 1e6


def print_report(result: dict) -> None:
    """The run's tables, as printed at its end (also from its JSON: --table)."""
    n_layers = result.get("n_layers") or shape_config(result["shape"]).num_hidden_layers
    fuse, typical_us = result["fuse"], result["typical_layer_us"]
    print(f"\n{result['shape']}, fuse={','.join(fuse) or 'none'}, batch {result['batch']}, cache {result['cache_len']}; "
          f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, "
          f"transformers {result['transformers']}, {result['date']}; copy {result['copy_bandwidth_gbs']:.0f} GB/s\n")
    print("| # | kernel | what | µs per layer | floor µs | % of floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in result["layer"]:
        floor = "-" if r["floor_us"] is None else f"{r['floor_us']:.1f}"
        pct = "-" if r["pct_of_floor"] is None else f"{r['pct_of_floor']:.0f}%"
        print(f"| {r['pos']} | `{r['kernel'][:60]}` | {r['label']} | {r['us']:.1f} | {floor} | {pct} |")
    if "outside_layers" in result:
        print("\nOutside the typical layers:\n\n| # in step | kernel | µs |\n| --- | --- | --- |")
        for r in result["outside_layers"]:
            print(f"| {r['pos']} | `{r['kernel'][:60]}` | {r['us']:.1f} |")
    print("\n| per step | µs |\n| --- | --- |")
    print(f"| one typical layer ({result['typical_layers']} of {n_layers} alike) | {typical_us:.1f} |")
    print(f"| {n_layers} x a typical layer | {n_layers * typical_us:.0f} |")
    print(f"| all kernels | {result['kernels_us']:.0f} |")
    print(f"| step (graph replay, wall) | {result['step_us']:.0f} ({result['tok_s']:.1f} tok/s) |")
    print(f"| gaps between kernels | {result['step_us'] - result['kernels_us']:.0f} |")
    print(f"| floor: every weight once at copy bandwidth | {weight_floor_us(result):.0f} |")


if __name__ == "__main__":
    main()
