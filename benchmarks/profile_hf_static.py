"""Where a step of transformers' own static-cache ``generate`` goes, unpatched and patched.

    python benchmarks/profile_hf_static.py --shape llama3-8b --out out/

``model.generate(..., cache_implementation="static")`` compiles the decode step itself
(``mode="reduce-overhead"``, ``fullgraph=False``), and prefill runs uncompiled. For each
variant (the stock model, then the same object patched) this reports:

  graph breaks, graphs   torch._dynamo's counters over the warm-up runs: a break or a second
                         graph in the decode step would split its CUDA graph
  CUDA-graph skips       graphs that Inductor compiled but would not capture as CUDA graphs, so
                         each kernel is launched from the host every step (--perf-hints prints why)
  step µs                wall time per decode step: (time(N new) - time(1 new)) / (N - 1)
  GPU busy µs            time per decode step with at least one CUDA kernel running, from
                         torch.profiler over one run: the union of the kernels' intervals, since
                         with programmatic dependent launch a kernel starts before the one ahead of
                         it ends, and a sum of durations would count that overlap twice
  host-only µs           step minus GPU busy: what the GPU waits on per step (generate's Python,
                         logits processors, stopping criteria, graph launch, the cache's guards)
  graph records/run      CUDA graphs recorded during one profiled generate call, after warm-up:
                         a record in every call is a cost that each call's decode steps pay
  graph / kernel launches  host calls per decode step that replay a CUDA graph or launch one
                         kernel: one graph replay and no kernel launch is a whole-step graph;
                         more graphs mean Inductor partitioned the step around ops it would not
                         capture, and each piece then costs its own host time
  host events            the host events that take most time per decode step, each variant's own
                         (--host-events N rows): where the host-only time goes
  GPU kernels            the kernels that take most time per decode step (the same N rows)

--before eager runs one eager generate of each variant before its static-cache runs, as
examples/compare_tps.py does when its modes start with eager. --cache reused passes one
StaticCache to every call (reset before each) instead of the one generate builds per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.autograd import DeviceType
from transformers import CompileConfig, StaticCache

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment  # noqa: E402

import hf_fused  # noqa: E402
from hf_fused.models import SHAPES, build_random_model  # noqa: E402


def static_generate(model, ids: torch.Tensor, new_tokens: int, cache: StaticCache | None = None) -> torch.Tensor:
    """generate with a static cache: the one it builds per call, or `cache`, reset first (--cache
    reused). A new cache's tensors are CUDA-graph inputs at new addresses, which makes the
    compiled step record its graph again in that call."""
    passed = {}
    if cache is not None:
        cache.reset()
        passed = {"past_key_values": cache}
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
        eos_token_id=None, pad_token_id=0, cache_implementation=None if passed else "static",
        compile_config=CompileConfig(mode="reduce-overhead", dynamic=False), **passed,
    )


Generate = Callable[[torch.Tensor, int], torch.Tensor]  # (ids, new tokens) -> sequences


def wall_s(generate: Generate, ids: torch.Tensor, new_tokens: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        generate(ids, new_tokens)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


GRAPH_LAUNCHES = ("cudaGraphLaunch",)
GRAPH_RECORDS = ("CUDAGraphNode.record",)
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def busy_us(intervals: list[tuple[float, float]]) -> float:
    """The time covered by at least one of the (start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def profiled_run(generate: Generate, ids: torch.Tensor, new_tokens: int) -> tuple[dict, dict, dict]:
    """GPU busy µs, graph replays, graph records and kernel launches of one run, and each host
    event's and each kernel's total µs, from torch.profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        generate(ids, new_tokens)
        torch.cuda.synchronize()
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    counts = {
        "gpu_us": busy_us([(e.time_range.start, e.time_range.end) for e in kernels]),
        "graph_launches": sum(e.name in GRAPH_LAUNCHES for e in events),
        "graph_records": sum(e.name in GRAPH_RECORDS for e in events),
        "kernel_launches": sum(e.name in KERNEL_LAUNCHES for e in events),
    }
    host_us = {e.key: e.cpu_time_total for e in prof.key_averages() if e.device_type == DeviceType.CPU}
    kernel_us: dict[str, float] = {}
    for e in kernels:
        kernel_us[e.name] = kernel_us.get(e.name, 0.0) + e.time_range.elapsed_us()
    return counts, host_us, kernel_us


def per_decode_step(generate: Generate, ids: torch.Tensor, new_tokens: int) -> tuple[dict, dict, dict, int]:
    """profiled_run's counts, host events and kernels per decode step (a whole run's minus its
    prefill-only run's), and the graphs recorded in the whole run."""
    (full, full_host, full_kernels), (prefill, prefill_host, prefill_kernels) = (
        profiled_run(generate, ids, new_tokens), profiled_run(generate, ids, 1))
    steps = new_tokens - 1

    def per_step(whole: dict, short: dict) -> dict:
        return {name: (value - short.get(name, 0.0)) / steps for name, value in whole.items()}

    return (per_step(full, prefill), per_step(full_host, prefill_host), per_step(full_kernels, prefill_kernels),
            full["graph_records"])


def measure(model, ids: torch.Tensor, new_tokens: int, repeats: int, before: str, cache: str) -> dict:
    torch._dynamo.reset()
    reused = StaticCache(config=model.config, max_cache_len=ids.shape[1] + new_tokens) if cache == "reused" else None

    def generate(prompt: torch.Tensor, tokens: int) -> torch.Tensor:
        return static_generate(model, prompt, tokens, reused)

    counters = torch._dynamo.utils.counters
    counters.clear()
    if before == "eager":
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                       eos_token_id=None, pad_token_id=0)
    for n in (new_tokens, 1, new_tokens):  # compile, capture, and settle
        generate(ids, n)
    breaks = dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    cudagraph_skips = counters["inductor"]["cudagraph_skips"]
    full, prefill = wall_s(generate, ids, new_tokens, repeats), wall_s(generate, ids, 1, repeats)
    step_us = (full - prefill) / (new_tokens - 1) * 1e6
    step, host_us, kernel_us, records = per_decode_step(generate, ids, new_tokens)
    return {"graph_breaks": sum(breaks.values()), "graph_break_reasons": breaks, "unique_graphs": graphs,
            "cudagraph_skips": cudagraph_skips,
            "step_us": step_us, "tok_s": ids.shape[0] * 1e6 / step_us, "gpu_busy_us": step["gpu_us"],
            "host_only_us": step_us - step["gpu_us"], "graph_launches": step["graph_launches"],
            "kernel_launches": step["kernel_launches"], "graph_records_per_run": records,
            "host_events_us": dict(sorted(host_us.items(), key=lambda item: -item[1])),
            "kernels_us": dict(sorted(kernel_us.items(), key=lambda item: -item[1]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="out")
    parser.add_argument("--host-events", type=int, default=25, help="host events to print per variant")
    parser.add_argument("--before", choices=("none", "eager"), default="none",
                        help="what each variant runs before its static-cache runs")
    parser.add_argument("--cache", choices=("fresh", "reused"), default="fresh",
                        help="fresh: the StaticCache generate builds per call; reused: one, passed in and reset")
    parser.add_argument("--perf-hints", action="store_true", help="log Inductor's reasons for skipping CUDA graphs")
    args = parser.parse_args()
    if args.perf_hints:
        torch._logging.set_logs(perf_hints=True)

    model = build_random_model(args.shape, torch.bfloat16, "cuda")
    model.generation_config.eos_token_id = None
    ids = torch.randint(model.config.vocab_size, (args.batch, args.prompt_len), device="cuda")
    rows = {"unpatched": measure(model, ids, args.new_tokens, args.repeats, args.before, args.cache)}
    hf_fused.patch_model(model)
    rows["patched"] = measure(model, ids, args.new_tokens, args.repeats, args.before, args.cache)

    result = {**environment(), "shape": args.shape, "batch": args.batch, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "before": args.before, "cache": args.cache,
              "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_hf_static_{args.shape}_b{args.batch}_{args.before}_{args.cache}.json").write_text(json.dumps(result, indent=1))
    print(f"\n{args.shape}, batch {args.batch}, prompt {args.prompt_len} + {args.new_tokens} new; generate("
          f"cache_implementation='static'); {result['gpu']}, torch {result['torch']}, "
          f"transformers {result['transformers']}, {result['date']}; before: {args.before}; cache: {args.cache}\n")
    print("| variant | graph breaks | graphs | CUDA-graph skips | step µs | tok/s | GPU busy µs/step | host-only µs/step "
          "| graph replays/step | kernel launches/step | graph records/run |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['graph_breaks']} | {r['unique_graphs']} | {r['cudagraph_skips']} | {r['step_us']:.0f} | {r['tok_s']:.1f} "
              f"| {r['gpu_busy_us']:.0f} | {r['host_only_us']:.0f} | {r['graph_launches']:.1f} | {r['kernel_launches']:.1f} "
              f"| {r['graph_records_per_run']} |")
    for name, r in rows.items():
        print(f"\n{name}: host events, µs per decode step (inclusive; nested events overlap)\n")
        print("| event | µs |\n| --- | --- |")
        for event, us in list(r["host_events_us"].items())[: args.host_events]:
            print(f"| {event[:80]} | {us:.1f} |")
    for name, r in rows.items():
        print(f"\n{name}: GPU kernels, µs per decode step\n")
        print("| kernel | µs |\n| --- | --- |")
        for kernel, us in list(r["kernels_us"].items())[: args.host_events]:
            print(f"| {kernel[:100]} | {us:.1f} |")
    for name, r in rows.items():
        for reason, count in r["graph_break_reasons"].items():
            print(f"{name}: graph break x{count}: {reason[:300]}")


if __name__ == "__main__":
    main()
