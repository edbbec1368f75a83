"""The rotary + static-cache-write op against transformers' rotary and cache update (GPU only).

    python benchmarks/bench_rope_cache.py --out out/

One decode step's rotary embedding and cache write in one layer of the Llama-3-8B shape (32
query heads, 8 key/value heads, head dim 128, bf16), at batch 1, 4 and 16, one token (and 4
tokens at batch 1, a speculative step), over a static cache of 4224 positions:
  fused     hf_fused.ops.rope_cache_write (one kernel), then the length's add_, as fuse="rope" runs it
  stock     transformers' apply_rotary_pos_emb, then StaticLayer.update (two index_copy_ and the add_)
  compiled  the same under torch.compile, as a compiled decode step runs it (Inductor's kernels)
Timed in µs per call in a CUDA graph (timing.time_graph) and in launch mode. A call moves tens
of KB, so it is bound by its latency, not by bandwidth: the floor (the bytes read and written at
the copy bandwidth of the same run) is shown for scale, and nothing is rotated.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import case_main, compiled, rel_err  # noqa: E402
from timing import time_graph, time_launches  # noqa: E402

from hf_fused.ops import rope_cache_write  # noqa: E402
from hf_fused.ops.rope_cache import rope_cache_write_ref  # noqa: E402

HQ, HKV, D = 32, 8, 128  # Llama-3-8B
CACHE_LEN, LENGTH = 4224, 300  # the static cache, and the tokens it holds before the step
CASES = [(1, 1), (4, 1), (16, 1), (1, 4)]  # (batch, new tokens)


def stock_step(qkv, cos, sin, keys, values, length):
    """What Llama's attention forward and StaticLayer.update do with a fused q/k/v output."""
    B, M, _ = qkv.shape
    q, k, v = (t.transpose(1, 2) for t in qkv.view(B, M, -1, D).split((HQ, HKV, HKV), dim=2))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    positions = torch.arange(M, device=qkv.device) + length
    length.add_(M)
    keys.index_copy_(2, positions, k)
    values.index_copy_(2, positions, v)
    return q


def fused_step(qkv, cos, sin, keys, values, length):
    q = rope_cache_write(qkv, cos, sin, keys, values, length, num_heads=HQ, num_kv_heads=HKV)
    length.add_(qkv.shape[1])
    return q.transpose(1, 2)


def bench_point(batch: int, tokens: int, bandwidth: float) -> dict:
    dtype = torch.bfloat16
    qkv = torch.randn(batch, tokens, (HQ + 2 * HKV) * D, device="cuda", dtype=dtype)
    angles = torch.rand(batch, tokens, D // 2, device="cuda") * 100
    cos, sin = (f(torch.cat([angles, angles], -1)).to(dtype) for f in (torch.cos, torch.sin))
    keys, values = (torch.randn(batch, HKV, CACHE_LEN, D, device="cuda", dtype=dtype) for _ in range(2))
    # Each call writes the same positions: the length goes back after every call.
    lengths = {name: torch.tensor(LENGTH, device="cuda") for name in ("fused", "stock", "compiled")}
    stock_compiled = compiled(stock_step)
    steps = {"fused": fused_step, "stock": stock_step, "compiled": stock_compiled}
    calls = {name: [lambda step=step, length=lengths[name]: (step(qkv, cos, sin, keys, values, length), length.sub_(tokens))]
             for name, step in steps.items()}
    exact_keys, exact_values = keys.double(), values.double()
    exact_q = rope_cache_write_ref(qkv.double(), cos.double(), sin.double(), exact_keys, exact_values,
                                   torch.tensor(LENGTH, device="cuda"), HQ, HKV)
    new = slice(LENGTH, LENGTH + tokens)
    errors = {}
    for name, step in steps.items():
        q = step(qkv, cos, sin, keys, values, lengths[name]).transpose(1, 2)
        lengths[name].sub_(tokens)
        errors[f"{name}_rel_err"] = max(rel_err(q, exact_q), rel_err(keys[:, :, new], exact_keys[:, :, new]))
    moved = (2 * qkv.numel() + 2 * cos.numel()) * dtype.itemsize  # read q/k/v and cos/sin; write q, k, v
    row = {"batch": batch, "tokens": tokens, "bytes": moved, "floor_us": moved / bandwidth * 1e6, **errors}
    for variant, fns in calls.items():
        row[f"{variant}_graph_us"] = time_graph(fns)
        row[f"{variant}_launch_us"] = time_launches(fns)
    return row


def format_table(result: dict) -> str:
    head = ["batch", "tokens", "fused µs", "stock µs", "compiled µs", "floor µs", "vs best peer",
            "fused launch µs", "stock launch µs", "fused err", "compiled err"]
    lines = [f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, transformers {result['transformers']}, "
             f"{result['date']}; copy {result['copy_Bps'] / 1e12:.2f} TB/s; Llama-3-8B rotary + cache write "
             f"(32/8 heads, D 128), bf16, cache {CACHE_LEN}; µs per call, CUDA graph",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        us, best = r["fused_graph_us"], min(r["stock_graph_us"], r["compiled_graph_us"])
        cells = [r["batch"], r["tokens"], f"{us:.1f}", f"{r['stock_graph_us']:.1f}", f"{r['compiled_graph_us']:.1f}",
                 f"{r['floor_us']:.2f}", f"{best / us:.2f}x", f"{r['fused_launch_us']:.1f}", f"{r['stock_launch_us']:.1f}",
                 f"{r['fused_rel_err']:.1e}", f"{r['compiled_rel_err']:.1e}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    case_main(__doc__, "bench_rope_cache", CASES, bench_point, format_table)
