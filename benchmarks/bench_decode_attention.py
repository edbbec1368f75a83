"""The decode-attention op against transformers' sdpa attention over a static KV cache (GPU only).

    python benchmarks/bench_decode_attention.py --out out/

One decode step's attention in one layer of the Llama-3-8B shape (32 query heads, 8 key/value
heads, head dim 128, bf16), at batch 1 and 4, for each (static cache length, valid keys):
  fused          hf_fused.ops.decode_attention (flash-decoding kernels, masked tiles skipped)
  one_split      its split kernel with one split per (sequence, kv head), writing the output
                 itself: no merge launch, a smaller grid (DecodeConfig(num_splits=1))
  sdpa           transformers' sdpa_attention_forward as eager decode runs it (one query: GQA packed)
  sdpa_compiled  the same under torch.compile, as a compiled decode step runs it (repeat_kv)
The mask is the (B, 1, 1, S) boolean one transformers builds for a static-cache step. Timed in
µs per call in a CUDA graph (timing.time_graph) and in launch mode, rotating over copies of the
cache (>= 400 MB) so that every call reads its keys and values from HBM. The floor is the valid
K and V bytes, plus q and the output, at the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import case_main, compiled, rel_err  # noqa: E402
from timing import copies_for, time_graph, time_launches  # noqa: E402

from hf_fused.ops import decode_attention, decode_attention_ref  # noqa: E402
from hf_fused.ops.decode_attention import DecodeConfig, launch_decode  # noqa: E402

HQ, HKV, D = 32, 8, 128  # Llama-3-8B
CASES = [(384, 384), (4224, 4224), (4224, 384)]  # (static cache length, valid keys)
BATCHES = [1, 4]


def one_split(q, k, v, mask, scaling):
    out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    launch_decode(q, k, v, mask, scaling, out, DecodeConfig(num_splits=1))
    return out


def sdpa(q, k, v, mask, scaling):
    module = SimpleNamespace(num_key_value_groups=HQ // HKV, is_causal=True)
    return sdpa_attention_forward(module, q, k, v, mask, scaling=scaling)[0]


def bench_point(batch: int, cache_len: int, valid: int, bandwidth: float) -> dict:
    dtype, scaling = torch.bfloat16, D**-0.5
    kv_bytes = 2 * batch * HKV * cache_len * D * dtype.itemsize
    caches = [(torch.randn(batch, HKV, cache_len, D, device="cuda", dtype=dtype),
               torch.randn(batch, HKV, cache_len, D, device="cuda", dtype=dtype)) for _ in range(copies_for(kv_bytes))]
    q = torch.randn(batch, 1, HQ, D, device="cuda", dtype=dtype).transpose(1, 2)  # as the attention hands it
    mask = (torch.arange(cache_len, device="cuda") < valid).view(1, 1, 1, -1).expand(batch, 1, 1, -1).contiguous()
    sdpa_compiled = compiled(sdpa)
    calls = {
        "fused": [lambda k=k, v=v: decode_attention(q, k, v, mask, scaling=scaling) for k, v in caches],
        "one_split": [lambda k=k, v=v: one_split(q, k, v, mask, scaling) for k, v in caches],
        "sdpa": [lambda k=k, v=v: sdpa(q, k, v, mask, scaling) for k, v in caches],
        "sdpa_compiled": [lambda k=k, v=v: sdpa_compiled(q, k, v, mask, scaling) for k, v in caches],
    }
    k, v = caches[0]
    exact = decode_attention_ref(q, k, v, mask, scaling, upcast=True)
    moved = 2 * batch * HKV * valid * D * dtype.itemsize + 2 * q.numel() * dtype.itemsize
    row = {"batch": batch, "cache_len": cache_len, "valid": valid, "copies": len(caches), "bytes": moved,
           "floor_us": moved / bandwidth * 1e6,
           "fused_rel_err": rel_err(decode_attention(q, k, v, mask, scaling=scaling), exact),
           "one_split_rel_err": rel_err(one_split(q, k, v, mask, scaling), exact),
           "sdpa_rel_err": rel_err(sdpa(q, k, v, mask, scaling), exact)}
    for variant, fns in calls.items():
        row[f"{variant}_graph_us"] = time_graph(fns)
        row[f"{variant}_launch_us"] = time_launches(fns)
    del caches, calls
    torch.cuda.empty_cache()
    return row


def format_table(result: dict) -> str:
    head = ["batch", "cache", "valid", "fused µs", "GB/s", "% of floor", "one split µs", "sdpa µs", "sdpa compiled µs", "floor µs",
            "vs best sdpa", "fused err", "sdpa err"]
    lines = [f"{result['gpu']}, torch {result['torch']}, triton {result['triton']}, transformers {result['transformers']}, "
             f"{result['date']}; copy {result['copy_Bps'] / 1e12:.2f} TB/s; Llama-3-8B attention (32/8 heads, D 128), "
             "bf16, one query token; µs per call, CUDA graph",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        us, best = r["fused_graph_us"], min(r["sdpa_graph_us"], r["sdpa_compiled_graph_us"])
        cells = [r["batch"], r["cache_len"], r["valid"], f"{us:.1f}", f"{r['bytes'] / us / 1e3:.0f}",
                 f"{100 * r['floor_us'] / us:.0f}%",
                 f"{r['one_split_graph_us']:.1f}" if "one_split_graph_us" in r else "-", f"{r['sdpa_graph_us']:.1f}", f"{r['sdpa_compiled_graph_us']:.1f}",
                 f"{r['floor_us']:.1f}", f"{best / us:.2f}x", f"{r['fused_rel_err']:.1e}", f"{r['sdpa_rel_err']:.1e}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cases = [(batch, cache_len, valid) for batch in BATCHES for cache_len, valid in CASES]
    case_main(__doc__, "bench_decode_attention", cases, bench_point, format_table)
