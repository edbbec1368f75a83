"""Tokens per second, unpatched vs patched, on one model in one process.

    python examples/compare_tps.py                          # embedded SmolLM2-135M-Instruct
    python examples/compare_tps.py --shape llama3-8b        # random weights at the real 8B config
    python examples/compare_tps.py --model Qwen/Qwen2.5-1.5B --batch-sizes 1,8
    python examples/compare_tps.py --shape llama3-8b --device-map auto           # layers over the GPUs
    torchrun --nproc-per-node 2 examples/compare_tps.py --shape llama3-8b --tp-plan auto

Modes, each run on the stock model and then on the same model object patched:
    eager      transformers' generate with its default dynamic cache
    hf-static  generate with cache_implementation="static"; on CUDA transformers compiles the
               decode step (CompileConfig mode="reduce-overhead": CUDA graphs, fullgraph=False)
    fast-loop  hf_fused.generation.generate: StaticCache and a decode step compiled with
               mode="reduce-overhead", fullgraph=True (compiled on CUDA only)

Method: greedy decoding of --new-tokens tokens after a --prompt-len random prompt, EOS disabled
so every run decodes the same count. The logits check (hf_fused.verify_patch) runs before any
timing and aborts the run if it fails. Per cell, one untimed run warms up (compile, CUDA-graph
capture); then --repeats runs of the full generation and --repeats runs of a 1-token generation
(prefill only) are timed, synchronizing before each clock read. Decode time is
median(full) - median(prefill-only), over new_tokens - 1 decode steps:
    ms/token   decode time per step (one token for every sequence of the batch)
    tok/s      batch * steps/s, tokens from all sequences
    GB/s       weight bytes * steps/s: each step reads every weight once, whatever the batch
    % copy BW  that over a device-to-device copy measured in this run (read + write bytes)
Compile time is excluded. Each variant starts from a fresh torch._dynamo state.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from transformers import CompileConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_fused  # noqa: E402
from example_utils import (  # noqa: E402
    add_model_args,
    environment,
    kernel_path,
    load_from_args,
    patched_layers,
    resolve_device_dtype,
)
from hf_fused import generation  # noqa: E402
from hf_fused.models import weight_bytes  # noqa: E402
from hf_fused.patches import DEFAULT_FUSE  # noqa: E402

MODES = ("eager", "hf-static", "fast-loop")
VARIANTS = ("unpatched", "patched")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--batch-sizes", default=None, help="comma list; default 1,4,16 on CUDA, 1 on CPU")
    parser.add_argument("--prompt-len", type=int, default=None, help="default 128 on CUDA, 32 on CPU")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 256 on CUDA, 16 on CPU")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell; the median is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fuse", default=",".join(DEFAULT_FUSE),
                        help="comma list of the fusions patch_model applies: qkv, mlp, gemv (default: all)")
    parser.add_argument("--out", default="out/compare_tps", help="folder for the JSON and PNG")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.fuse = tuple(f.strip() for f in args.fuse.split(",") if f.strip())
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    return args


def sync(device: torch.device) -> None:
    # Every GPU: under a device_map the last layers run on another GPU than the input ids.
    if device.type == "cuda":
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30, iters: int = 20) -> float | None:
    """Device-to-device copy bandwidth, counting read + write bytes: the practical memory ceiling."""
    if device.type != "cuda":
        return None
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device=device)  # never time on zeros
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e9


def run_generation(model, mode: str, input_ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    if mode == "fast-loop":
        return generation.generate(model, input_ids, new_tokens)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,  # as a keyword, None disables EOS stopping: every run decodes new_tokens
        pad_token_id=0,
    )
    if mode == "hf-static":
        kwargs["cache_implementation"] = "static"
        if input_ids.device.type == "cuda":
            # dynamic=False: each batch size gets its own static graph, as in the fast loop.
            kwargs["compile_config"] = CompileConfig(mode="reduce-overhead", dynamic=False)
    return model.generate(input_ids, **kwargs)


def timed(model, mode: str, input_ids: torch.Tensor, new_tokens: int) -> float:
    device = input_ids.device
    sync(device)
    start = time.perf_counter()
    out = run_generation(model, mode, input_ids, new_tokens)
    sync(device)
    seconds = time.perf_counter() - start
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"{mode} generated {out.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
    return seconds


def measure_cell(model, mode: str, batch: int, args, device: torch.device, wbytes: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(model.config.vocab_size, (batch, args.prompt_len), generator=generator).to(device)
    # Warm-up: compile and CUDA-graph capture of the decode step, and of the prefill-only run.
    timed(model, mode, ids, args.new_tokens)
    timed(model, mode, ids, 1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full = [timed(model, mode, ids, args.new_tokens) for _ in range(args.repeats)]
    prefill = [timed(model, mode, ids, 1) for _ in range(args.repeats)]
    steps = args.new_tokens - 1
    decode_s = statistics.median(full) - statistics.median(prefill)
    if decode_s <= 0 or steps == 0:  # too few tokens to separate decode from prefill (noise)
        steps, decode_s = args.new_tokens, statistics.median(full)
    steps_per_s = steps / decode_s
    return {
        "tok_s": batch * steps_per_s,
        "ms_per_token": 1e3 / steps_per_s,
        "gb_s": wbytes * steps_per_s / 1e9,
        "e2e_tok_s": batch * args.new_tokens / statistics.median(full),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "times_full_s": full,
        "times_prefill_s": prefill,
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["environment"]
    lines = [
        f"{meta['model']}, {meta['dtype']}, {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}; {env['date']}",
        f"prompt {meta['prompt_len']} + {meta['new_tokens']} new tokens, greedy; median of {meta['repeats']}; "
        f"kernel: {meta['kernel_path']}, fuse={'+'.join(meta['fuse'])}; "
        f"copy bandwidth {fmt(meta['copy_bandwidth_gbs'], '.0f')} GB/s",
        "",
        "tok/s = batch x decode steps/s, prefill excluded; GB/s = weight bytes x decode steps/s "
        f"({meta['weight_bytes'] / 1e9:.3f} GB read once per step, whatever the batch); "
        "% of copy BW = GB/s over the measured device-to-device copy",
        "",
        "| mode | batch | unpatched tok/s | patched tok/s | speedup | patched ms/token | patched GB/s "
        "| % of copy BW | peak mem GiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cells = {(r["mode"], r["batch"], r["variant"]): r for r in results}
    for mode in meta["modes"]:
        for batch in meta["batch_sizes"]:
            base, pat = cells.get((mode, batch, "unpatched"), {}), cells.get((mode, batch, "patched"), {})
            lines.append(
                f"| {mode} | {batch} | {fmt(base.get('tok_s'), '.1f')} | {fmt(pat.get('tok_s'), '.1f')} "
                f"| {fmt(pat.get('speedup'), '.2f')}x | {fmt(pat.get('ms_per_token'), '.2f')} "
                f"| {fmt(pat.get('gb_s'), '.1f')} | {fmt(pat.get('pct_copy_bw'), '.0f')} "
                f"| {fmt(pat.get('peak_mem_gib'), '.1f')} |"
            )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    labels = [f"{m}\nbatch {b}" for m in meta["modes"] for b in meta["batch_sizes"]]
    cells = {(r["mode"], r["batch"], r["variant"]): r.get("tok_s") or 0.0 for r in results}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels)), 4.5))
    width = 0.4
    for i, variant in enumerate(VARIANTS):
        values = [cells.get((m, b, variant), 0.0) for m in meta["modes"] for b in meta["batch_sizes"]]
        ax.bar([x + (i - 0.5) * width for x in range(len(labels))], values, width, label=variant)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("decode tok/s (all sequences)")
    env = meta["environment"]
    ax.set_title(f"{meta['model']}, {meta['dtype']}\n{env['device']}, torch {env['torch']}, "
                 f"transformers {env['transformers']}, {env['date'][:10]}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart: {path}"


def progress(total: int, shown: bool = True):
    if not shown:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="cells", unit="cell")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        run = json.loads(Path(args.table).read_text())
        print(markdown_table(run["results"], run["meta"]))
        return 0
    device, dtype = resolve_device_dtype(args)
    on_cuda = device.type == "cuda"
    batch_sizes = args.batch_sizes or ("1,4,16" if on_cuda else "1")
    args.batch_sizes = [int(b) for b in batch_sizes.split(",")]
    args.prompt_len = args.prompt_len or (128 if on_cuda else 32)
    args.new_tokens = args.new_tokens or (256 if on_cuda else 16)
    torch.manual_seed(args.seed)

    if args.tp_plan and not torch.distributed.is_initialized():
        # One process per GPU under torchrun: join them before loading, as transformers would.
        if on_cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if on_cuda else "gloo")
    main_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    if not main_rank:
        sys.stdout = open(os.devnull, "w")  # every rank runs and times the same; rank 0 reports
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"transformers {env['transformers']} | {env['date']}")
    if not on_cuda:
        print(f"No CUDA GPU: the patched model runs the fused op's {kernel_path(device)}. These numbers "
              "only check that everything runs: the Triton kernel needs a GPU for speed. "
              "Nothing is compiled on CPU.")
    copy_bw = copy_bandwidth_gbs(device)  # before the model, while memory is free

    model, _, label = load_from_args(args, device, dtype)
    wbytes = weight_bytes(model)
    meta: dict[str, Any] = {
        "environment": env,
        "model": label,
        "model_type": model.config.model_type,
        "dtype": str(dtype).removeprefix("torch."),
        "device": str(device),
        "device_map": args.device_map,
        "tp_plan": args.tp_plan,
        "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
        "kernel_path": kernel_path(device),
        "fuse": list(args.fuse),
        "modes": args.modes,
        "batch_sizes": args.batch_sizes,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "weight_bytes": wbytes,
        "copy_bandwidth_gbs": copy_bw,
        "definitions": {
            "tok_s": "batch * decode steps/s; decode time = median(full run) - median(prefill-only run)",
            "ms_per_token": "decode time per step, ms",
            "gb_s": "weight bytes * decode steps/s (each step reads every weight once)",
            "pct_copy_bw": "gb_s / measured device-to-device copy bandwidth (read + write bytes)",
            "speedup": "patched tok/s / unpatched tok/s, same mode and batch",
            "peak_mem_gib": "torch.cuda.max_memory_allocated over the timed runs of the cell, weights included",
        },
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Named by model, device and time, so that runs split over several commands don't overwrite.
    name = re.sub(r"[^A-Za-z0-9.]+", "-", (args.shape or args.model).split("/")[-1]).strip("-")
    slug = f"{name}-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}"
    json_path, png_path = out_dir / f"{slug}.json", out_dir / f"{slug}.png"

    # The logits check comes first: a fast wrong kernel must not produce a speed table.
    # From a seeded generator: under --tp-plan every rank must feed the same ids.
    generator = torch.Generator().manual_seed(args.seed)
    check_ids = torch.randint(model.config.vocab_size, (1, min(args.prompt_len, 64)), generator=generator).to(device)
    hf_fused.patch_model(model, fuse=args.fuse)
    report = hf_fused.verify_patch(model, check_ids)
    meta["patched_layers"] = patched_layers(model)
    meta["verify"] = {"max_abs_diff": report.max_abs_diff, "rel_err": report.rel_err,
                      "top1_agreement": report.top1_agreement, "rtol": report.rtol, "ok": report.ok}
    print(f"model: {label}, {model.config.model_type}, {meta['dtype']}, "
          f"{wbytes / 1e9:.3f} GB of weights read per step; "
          f"patched {meta['patched_layers']} layers; kernel: {meta['kernel_path']}")
    print(f"logits check: max |diff| {report.max_abs_diff:.3g}, relative error {report.rel_err:.3g} "
          f"(limit {report.rtol:g}), top-1 agreement {report.top1_agreement:.1%}")
    if not report.ok:
        json_path.write_text(json.dumps({"meta": meta, "results": []}, indent=2))
        print("logits check FAILED: no timings taken", file=sys.stderr)
        return 1
    hf_fused.unpatch_model(model)

    results: list[dict[str, Any]] = []
    bar = progress(len(VARIANTS) * len(args.modes) * len(args.batch_sizes), shown=main_rank)
    for variant in VARIANTS:
        if variant == "patched":
            hf_fused.patch_model(model, fuse=args.fuse)
        # Compiled code and CUDA graphs of the other variant must not be reused or counted.
        torch._dynamo.reset()
        generation.reset(model)
        for mode in args.modes:
            for batch in args.batch_sizes:
                if bar is not None:
                    bar.set_postfix_str(f"{variant} {mode} batch {batch}")
                cell: dict[str, Any] = {"mode": mode, "batch": batch, "variant": variant,
                                        "compiled": on_cuda and mode != "eager"}
                try:
                    cell.update(measure_cell(model, mode, batch, args, device, wbytes))
                except Exception as exc:  # one failing cell must not lose a long GPU run
                    cell["error"] = f"{type(exc).__name__}: {exc}"
                    print(f"\n{variant} {mode} batch {batch} failed:\n{traceback.format_exc()}", file=sys.stderr)
                results.append(cell)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    hf_fused.unpatch_model(model)

    base = {(r["mode"], r["batch"]): r.get("tok_s") for r in results if r["variant"] == "unpatched"}
    for r in results:
        if r.get("tok_s"):
            r["speedup"] = r["tok_s"] / base[(r["mode"], r["batch"])] if base.get((r["mode"], r["batch"])) else None
            r["pct_copy_bw"] = 100 * r["gb_s"] / copy_bw if copy_bw else None

    if main_rank:
        json_path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        print(f"results: {json_path}")
        print(plot(results, meta, png_path))
    print()
    print(markdown_table(results, meta))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
