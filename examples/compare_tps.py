"""Tokens per second, unpatched vs patched vs a peer system, on one model in one process.

    python examples/compare_tps.py                          # embedded SmolLM2-135M-Instruct
    python examples/compare_tps.py --shape llama3-8b        # random weights at the real 8B config
    python examples/compare_tps.py --model Qwen/Qwen2.5-1.5B --batch-sizes 1,8
    python examples/compare_tps.py --shape llama3-8b --device-map auto           # layers over the GPUs
    torchrun --nproc-per-node 2 examples/compare_tps.py --shape llama3-8b --tp-plan auto
    python examples/compare_tps.py --do-sample --temperature 0.7 --top-p 0.9    # sampling, not greedy
    python examples/compare_tps.py --table out/compare_tps/RUN.json              # reprint a run's table
    python examples/compare_tps.py --also-fuse qkv,mlp,gemv                    # a second fusion set too

Modes, each run on the stock model, then on the same model object patched, then patched with
each --also-fuse set of fusions, then (with --peers liger, the default when liger-kernel is
installed: pip install 'hf_fused[bench]') on it again unpatched with Liger-Kernel's rope,
rms_norm and swiglu kernels applied:
    eager      transformers' generate with its default dynamic cache
    hf-static  generate with cache_implementation="static"; on CUDA transformers compiles the
               decode step (CompileConfig mode="reduce-overhead": CUDA graphs, fullgraph=False)
    fast-loop  hf_fused.generation.generate: StaticCache and a decode step compiled with
               mode="reduce-overhead", fullgraph=True (compiled on CUDA only)
A cell that fails (Liger's kernels can't be traced by a fullgraph compile) records its error and
the run goes on; the table says "fails: <reason>" for a peer's failed cell.

Method: greedy decoding (or, with --do-sample, sampling) of --new-tokens tokens after a
--prompt-len random prompt, EOS disabled so every run decodes the same count. The logits check
(hf_fused.verify_patch) runs before any timing and aborts the run if it fails; the peer's logits
are compared with the stock model's too, and reported. Per cell, one untimed run warms up
(compile, CUDA-graph capture); then --repeats runs of the full generation and --repeats runs of
a 1-token generation (prefill only) are timed, synchronizing before each clock read. Decode time
is median(full) - median(prefill-only), over new_tokens - 1 decode steps:
    ms/token   decode time per step (one token for every sequence of the batch)
    tok/s      batch * steps/s, tokens from all sequences
    GB/s       weight bytes * steps/s: each step reads every weight once, whatever the batch
    % copy BW  that over a device-to-device copy measured in this run (read + write bytes)
Compile time is excluded. Each variant starts from a fresh torch._dynamo state.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import inspect
import json
import os
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
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
SAMPLING_DEFAULTS = {"temperature": 1.0, "top_k": 50, "top_p": 1.0}
LIGER_MISSING = "liger-kernel not installed: pip install 'hf_fused[bench]'"
# Liger's kernels that run in a decode step. Its cross-entropy kernels only compute a training
# loss (and the fused one replaces the forward that returns logits): off.
LIGER_OPTIONS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False,
                 "fused_linear_cross_entropy": False}


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
                        help="comma list of the fusions patch_model applies, from qkv, mlp, gemv, attention, "
                             "residual, rope (the default: all of them)")
    parser.add_argument("--also-fuse", action="append", default=[], metavar="FUSE",
                        help="another comma list of fusions, measured as a variant of its own after patched "
                             "(e.g. qkv,mlp,gemv); repeatable")
    parser.add_argument("--peers", choices=("liger", "none"),
                        help="peer system measured in the same run, after unpatched and patched: liger "
                             "(Liger-Kernel 0.8.5) or none; default: liger if liger-kernel is installed")
    sampling = parser.add_argument_group("sampling", "every mode decodes greedily unless --do-sample")
    sampling.add_argument("--do-sample", action="store_true", help="sample the tokens in every mode")
    sampling.add_argument("--temperature", type=float, help="with --do-sample; default 1.0")
    sampling.add_argument("--top-k", type=int, help="with --do-sample; default 50, 0 keeps all tokens")
    sampling.add_argument("--top-p", type=float, help="with --do-sample; default 1.0")
    parser.add_argument("--out", default="out/compare_tps", help="folder for the JSON and PNG")
    parser.add_argument("--table", metavar="JSON", help="print the table of an earlier run's JSON and exit")
    args = parser.parse_args(argv)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.fuse = fuse_list(args.fuse)
    args.also_fuse = [fuse_list(f) for f in args.also_fuse]
    unknown = set(args.modes) - set(MODES)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {', '.join(MODES)}")
    args.sampling = sampling_options(parser, args)

    liger_installed = importlib.util.find_spec("liger_kernel") is not None
    if args.peers == "liger" and not liger_installed:
        parser.error(LIGER_MISSING)
    # Not asked for and not there: main says so once, and the run goes on without it.
    args.liger_missing = args.peers is None and not liger_installed
    args.peers = ["liger"] if liger_installed and args.peers != "none" else []
    return args


def fuse_list(text: str) -> tuple[str, ...]:
    return tuple(f.strip() for f in text.split(",") if f.strip())


def fuse_variant(fuse) -> str:
    """The variant name of an --also-fuse set: fuse=qkv+mlp+gemv+attention."""
    return "fuse=" + "+".join(fuse)


def sampling_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any] | None:
    """temperature, top_k and top_p under --do-sample, defaults filled in; None for greedy decoding."""
    given = {name: getattr(args, name) for name in SAMPLING_DEFAULTS if getattr(args, name) is not None}
    if not args.do_sample:
        if given:  # silently decoding greedily would time something else than was asked for
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            parser.error(f"sampling options without --do-sample: {flags}")
        return None
    options = SAMPLING_DEFAULTS | given
    if options["temperature"] <= 0:
        parser.error(f"--temperature must be > 0, got {options['temperature']} (greedy: leave out --do-sample)")
    if options["top_k"] < 0:
        parser.error(f"--top-k must be >= 0 (0: no top-k), got {options['top_k']}")
    if not 0 < options["top_p"] <= 1:
        parser.error(f"--top-p must be in (0, 1], got {options['top_p']}")
    return options


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


def run_generation(model, mode: str, input_ids: torch.Tensor, new_tokens: int,
                   sampling: dict[str, Any] | None, seed: int) -> torch.Tensor:
    if mode == "fast-loop":
        if sampling is None:
            return generation.generate(model, input_ids, new_tokens)
        return generation.generate(model, input_ids, new_tokens, do_sample=True, **sampling, seed=seed)
    kwargs: dict[str, Any] = dict(
        attention_mask=torch.ones_like(input_ids),
        max_new_tokens=new_tokens,
        do_sample=sampling is not None,
        **(sampling or {}),
        eos_token_id=None,  # as a keyword, None disables EOS stopping: every run decodes new_tokens
        pad_token_id=0,
    )
    if mode == "hf-static":
        kwargs["cache_implementation"] = "static"
        if input_ids.device.type == "cuda":
            # dynamic=False: each batch size gets its own static graph, as in the fast loop.
            kwargs["compile_config"] = CompileConfig(mode="reduce-overhead", dynamic=False)
    return model.generate(input_ids, **kwargs)


def timed(model, mode: str, input_ids: torch.Tensor, new_tokens: int,
          sampling: dict[str, Any] | None, seed: int) -> float:
    device = input_ids.device
    if sampling is not None:
        # transformers' generate samples from the global generator: every run draws the same tokens.
        torch.manual_seed(seed)
    sync(device)
    start = time.perf_counter()
    out = run_generation(model, mode, input_ids, new_tokens, sampling, seed)
    sync(device)
    seconds = time.perf_counter() - start
    if out.shape[1] != input_ids.shape[1] + new_tokens:
        raise RuntimeError(f"{mode} generated {out.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
    return seconds


def measure_cell(model, mode: str, batch: int, args, device: torch.device, wbytes: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(model.config.vocab_size, (batch, args.prompt_len), generator=generator).to(device)

    def run(new_tokens: int) -> float:
        return timed(model, mode, ids, new_tokens, args.sampling, args.seed)

    # Warm-up: compile and CUDA-graph capture of the decode step, and of the prefill-only run.
    run(args.new_tokens)
    run(1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    full = [run(args.new_tokens) for _ in range(args.repeats)]
    prefill = [run(1) for _ in range(args.repeats)]
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


def add_speedups(results: list[dict[str, Any]], copy_bw: float | None) -> None:
    """Each timed cell's speedup over the unpatched cell of its mode and batch, and its share of
    the copy bandwidth."""
    base = {(r["mode"], r["batch"]): r.get("tok_s") for r in results if r["variant"] == "unpatched"}
    for r in results:
        if r.get("tok_s"):
            r["speedup"] = r["tok_s"] / base[(r["mode"], r["batch"])] if base.get((r["mode"], r["batch"])) else None
            r["pct_copy_bw"] = 100 * r["gb_s"] / copy_bw if copy_bw else None


def save(path: Path, meta: dict[str, Any], results: list[dict[str, Any]], copy_bw: float | None) -> None:
    add_speedups(results, copy_bw)
    path.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


def refuse_to_time(json_path: Path, meta: dict[str, Any]) -> int:
    """A failed logits check: the run's metadata is written, and nothing is timed."""
    json_path.write_text(json.dumps({"meta": meta, "results": []}, indent=2))
    print("logits check FAILED: no timings taken", file=sys.stderr)
    return 1


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def short_reason(error: str, width: int = 72) -> str:
    """An error's first line, cut to fit a table cell; the JSON keeps it whole."""
    line = error.strip().splitlines()[0].replace("|", "/")
    return line if len(line) <= width else line[: width - 1] + "…"


def decoding(meta: dict[str, Any]) -> str:
    sampling = meta.get("sampling")  # runs from before --do-sample have none: they decoded greedily
    if not sampling:
        return "greedy"
    return f"sampled (T={sampling['temperature']:g}, top_k={sampling['top_k']}, top_p={sampling['top_p']:g})"


def markdown_table(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    env = meta["environment"]
    peers = meta.get("peers", [])  # runs from before --peers have none
    liger = f", liger-kernel {meta['liger']['version']}" if "liger" in peers else ""
    fuse = f", fuse={'+'.join(meta['fuse'])}" if "fuse" in meta else ""  # runs from before --fuse have none
    extras = [fuse_variant(f) for f in meta.get("also_fuse", [])]  # runs from before --also-fuse have none
    columns = ["mode", "batch", "unpatched tok/s", "patched tok/s", "speedup"]
    columns += [column for extra in extras for column in (f"{extra} tok/s", f"{extra} speedup")]
    if "liger" in peers:
        columns += ["liger tok/s", "liger speedup"]
    columns += ["patched ms/token", "patched GB/s", "% of copy BW", "peak mem GiB"]
    lines = [
        f"{meta['model']}, {meta['dtype']}, {env['device']}; torch {env['torch']}, triton {env['triton']}, "
        f"transformers {env['transformers']}{liger}; {env['date']}",
        f"prompt {meta['prompt_len']} + {meta['new_tokens']} new tokens, {decoding(meta)}; "
        f"median of {meta['repeats']}; kernel: {meta['kernel_path']}{fuse}; "
        f"copy bandwidth {fmt(meta['copy_bandwidth_gbs'], '.0f')} GB/s",
        "",
        "tok/s = batch x decode steps/s, prefill excluded; GB/s = weight bytes x decode steps/s "
        f"({meta['weight_bytes'] / 1e9:.3f} GB read once per step, whatever the batch); "
        "% of copy BW = GB/s over the measured device-to-device copy",
        "",
        "| " + " | ".join(columns) + " |",
        "| " + " | ".join(["---"] * len(columns)) + " |",
    ]
    cells = {(r["mode"], r["batch"], r["variant"]): r for r in results}
    for mode in meta["modes"]:
        for batch in meta["batch_sizes"]:
            base, pat = cells.get((mode, batch, "unpatched"), {}), cells.get((mode, batch, "patched"), {})
            row = [mode, str(batch), fmt(base.get("tok_s"), ".1f"), fmt(pat.get("tok_s"), ".1f"),
                   f"{fmt(pat.get('speedup'), '.2f')}x"]
            for extra in extras:
                cell = cells.get((mode, batch, extra), {})
                row += ([f"fails: {short_reason(cell['error'])}", "-"] if "error" in cell
                        else [fmt(cell.get("tok_s"), ".1f"), f"{fmt(cell.get('speedup'), '.2f')}x"])
            if "liger" in peers:
                peer = cells.get((mode, batch, "liger"), {})
                if "error" in peer:
                    row += [f"fails: {short_reason(peer['error'])}", "-"]
                else:
                    row += [fmt(peer.get("tok_s"), ".1f"), f"{fmt(peer.get('speedup'), '.2f')}x"]
            row += [fmt(pat.get("ms_per_token"), ".2f"), fmt(pat.get("gb_s"), ".1f"),
                    fmt(pat.get("pct_copy_bw"), ".0f"), fmt(pat.get("peak_mem_gib"), ".1f")]
            lines.append("| " + " | ".join(row) + " |")
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
    variants = [*VARIANTS, *(fuse_variant(f) for f in meta.get("also_fuse", [])), *meta["peers"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(variants) * len(labels)), 4.5))
    width = 0.8 / len(variants)
    for i, variant in enumerate(variants):
        values = [cells.get((m, b, variant), 0.0) for m in meta["modes"] for b in meta["batch_sizes"]]
        ax.bar([x + (i - (len(variants) - 1) / 2) * width for x in range(len(labels))], values, width, label=variant)
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


def liger_patcher(model_type: str) -> tuple[Callable[..., None] | None, dict[str, bool]]:
    """Liger's apply function for ``model_type`` (llama: apply_liger_kernel_to_llama), and the
    LIGER_OPTIONS it takes; None when Liger has no kernels for the family."""
    # Liger's own table by model type, the one its AutoLigerKernelForCausalLM dispatches through.
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if apply is None:
        return None, {}
    # The families' functions take different options: Gemma's have geglu, not swiglu.
    accepted = inspect.signature(apply).parameters
    return apply, {name: on for name, on in LIGER_OPTIONS.items() if name in accepted}


@torch.no_grad()
def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids).logits.float()


def logits_agreement(peer: torch.Tensor, stock: torch.Tensor) -> dict[str, float]:
    """A peer's logits against the stock model's, as verify_patch measures the patched ones."""
    return {"rel_err": (torch.linalg.vector_norm(peer - stock) / torch.linalg.vector_norm(stock)).item(),
            "top1_agreement": (peer.argmax(-1) == stock.argmax(-1)).float().mean().item()}


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
    if args.liger_missing:
        print(LIGER_MISSING)
    if not on_cuda:
        print(f"No CUDA GPU: the patched model runs the fused op's {kernel_path(device)}. These numbers "
              "only check that everything runs: the Triton kernel needs a GPU for speed. "
              "Nothing is compiled on CPU.")
    copy_bw = copy_bandwidth_gbs(device)  # before the model, while memory is free

    model, _, label = load_from_args(args, device, dtype)
    wbytes = weight_bytes(model)
    liger_apply, liger_options = liger_patcher(model.config.model_type) if "liger" in args.peers else (None, {})
    if "liger" in args.peers and liger_apply is None:
        print(f"liger-kernel {importlib.metadata.version('liger-kernel')} has no kernels for model type "
              f"{model.config.model_type}: liger skipped")
        args.peers = []
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
        "also_fuse": [list(f) for f in args.also_fuse],
        "modes": args.modes,
        "batch_sizes": args.batch_sizes,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "sampling": args.sampling,
        "seed": args.seed,
        "peers": args.peers,
        "weight_bytes": wbytes,
        "copy_bandwidth_gbs": copy_bw,
        "definitions": {
            "tok_s": "batch * decode steps/s; decode time = median(full run) - median(prefill-only run)",
            "ms_per_token": "decode time per step, ms",
            "gb_s": "weight bytes * decode steps/s (each step reads every weight once)",
            "pct_copy_bw": "gb_s / measured device-to-device copy bandwidth (read + write bytes)",
            "speedup": "tok/s of the variant (patched, an --also-fuse set, or a peer) / unpatched tok/s, "
                       "same mode and batch",
            "peak_mem_gib": "torch.cuda.max_memory_allocated over the timed runs of the cell, weights included",
        },
    }
    if liger_apply is not None:
        meta["liger"] = {"version": importlib.metadata.version("liger-kernel"), "apply": liger_apply.__name__,
                         "options": liger_options}
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
    stock_logits = logits(model, check_ids) if liger_apply is not None else None  # the peer's reference
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
        return refuse_to_time(json_path, meta)
    hf_fused.unpatch_model(model)
    for fuse in args.also_fuse:
        extra = hf_fused.verify_patch(hf_fused.patch_model(model, fuse=fuse), check_ids)
        hf_fused.unpatch_model(model)
        meta.setdefault("verify_also_fuse", {})[fuse_variant(fuse)] = {"rel_err": extra.rel_err, "ok": extra.ok}
        print(f"logits check, {fuse_variant(fuse)}: relative error {extra.rel_err:.3g}, "
              f"top-1 agreement {extra.top1_agreement:.1%}")
        if not extra.ok:
            return refuse_to_time(json_path, meta)

    results: list[dict[str, Any]] = []
    extras = {fuse_variant(f): f for f in args.also_fuse}
    variants = [*VARIANTS, *extras, *args.peers]
    bar = progress(len(variants) * len(args.modes) * len(args.batch_sizes), shown=main_rank)
    for variant in variants:
        setup_error = None
        if variant == "patched":
            hf_fused.patch_model(model, fuse=args.fuse)
        elif variant in extras:
            hf_fused.unpatch_model(model)
            hf_fused.patch_model(model, fuse=extras[variant])
        elif variant == "liger":
            # Last, on this same model, with hf_fused's modules taken out first. Liger rebinds the
            # forwards of this model's norms and MLPs, and replaces the rotary function and the
            # norm and MLP classes in transformers' modeling file for the whole process, with no
            # undo: nothing is measured after it. A fresh copy would not be cleaner (those
            # module-level names are shared by every model of the family), would hold the weights
            # twice, and can't be deep-copied under --tp-plan or --device-map.
            hf_fused.unpatch_model(model)
            try:
                liger_apply(model=model, **liger_options)
                agreement = meta["liger"]["logits"] = logits_agreement(logits(model, check_ids), stock_logits)
                print(f"liger logits vs unpatched: relative error {agreement['rel_err']:.3g}, "
                      f"top-1 agreement {agreement['top1_agreement']:.1%}")
            except Exception as exc:  # a peer that can't run here is a result, not a reason to stop
                setup_error = meta["liger"]["error"] = f"{type(exc).__name__}: {exc}"
                print(f"\nliger could not be applied or run a forward; its cells are not timed:\n"
                      f"{traceback.format_exc()}", file=sys.stderr)
        # Compiled code and CUDA graphs of the other variant must not be reused or counted.
        torch._dynamo.reset()
        generation.reset(model)
        for mode in args.modes:
            for batch in args.batch_sizes:
                if bar is not None:
                    bar.set_postfix_str(f"{variant} {mode} batch {batch}")
                cell: dict[str, Any] = {"mode": mode, "batch": batch, "variant": variant,
                                        "compiled": on_cuda and mode != "eager"}
                if setup_error is not None:
                    cell["error"] = setup_error
                else:
                    try:
                        cell.update(measure_cell(model, mode, batch, args, device, wbytes))
                    except Exception as exc:  # one failing cell must not lose a long GPU run
                        cell["error"] = f"{type(exc).__name__}: {exc}"
                        print(f"\n{variant} {mode} batch {batch} failed:\n{traceback.format_exc()}",
                              file=sys.stderr)
                results.append(cell)
                # Each cell is written out and printed as it ends: a run stopped by a time limit
                # keeps what it measured (--table reprints the file).
                if main_rank:
                    save(json_path, meta, results, copy_bw)
                    done = (f"{cell['tok_s']:.1f} tok/s, {cell['ms_per_token']:.2f} ms/token" if "tok_s" in cell
                            else f"fails: {short_reason(cell['error'])}")
                    print(f"{variant} {mode} batch {batch}: {done}", flush=True)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    hf_fused.unpatch_model(model)

    if main_rank:
        print(f"results: {json_path}")
        print(plot(results, meta, png_path))
    print()
    print(markdown_table(results, meta))
    # A peer's failure is one of its results (Liger can't run under a fullgraph compile), not a failed run.
    return 1 if any("error" in r for r in results if r["variant"] in (*VARIANTS, *extras)) else 0


if __name__ == "__main__":
    sys.exit(main())
