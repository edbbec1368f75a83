"""Programmatic dependent launch (PDL) and the L2 prefetch of a decode step's kernels, measured in
a CUDA graph.

A decode step is a chain of short kernels, each waiting for the one before. Launched with PDL, a
kernel's programs start while the kernel before it drains; a weight-streaming kernel issues its
first weight tiles before it waits (``_await_inputs`` in hf_fused/ops/_common.py). This times
each layer's kernels over distinct per-layer weights, as one CUDA graph, with PDL off and on, and
with PDL on and the weight kernels' L2 prefetch (``_prefetch_rows``) at each --l2-prefetch depth:

- ``chain``: the four weight kernels (norm+qkv, o_proj + residual, norm+gate/up, down_proj +
  residual) back to back, layer after layer;
- ``chain + plain``: a plain PyTorch kernel (not launched with PDL) after the QKV kernel;
- ``layer``: the whole layer as ``fuse`` runs it by default: norm+qkv, the rotary embedding and
  cache write, the decode attention's split and merge over a cache of --cache tokens, then the
  three other weight kernels;
- each weight op alone, over rotating weights: its µs per call beside the op benchmarks' tables.

Every variant checks that PDL and the prefetch leave the output bit for bit unchanged.

    python benchmarks/bench_pdl.py --shape llama3-8b --layers 8 --out out/
    python benchmarks/bench_pdl.py --shape llama3-8b --l2-prefetch 16384,default,65536
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment, measure_copy_bandwidth, time_graph  # noqa: E402

from hf_fused.models import SHAPES  # noqa: E402
from hf_fused.ops._common import l2_prefetch_default  # noqa: E402
# The modules, not the functions of the same names that hf_fused.ops exports.
qkv_op = importlib.import_module("hf_fused.ops.rmsnorm_qkv")
gate_up_op = importlib.import_module("hf_fused.ops.rmsnorm_gate_up")
linear_op = importlib.import_module("hf_fused.ops.streaming_linear")
rope_op = importlib.import_module("hf_fused.ops.rope_cache")
attention_op = importlib.import_module("hf_fused.ops.decode_attention")


def launcher(kernel, launch):
    grid, args, meta = launch
    return lambda: kernel[grid](*args, **meta)


class Layer:
    """One decoder layer's weights and activation buffers, and its four kernel launches."""

    def __init__(self, shape, x: torch.Tensor, dtype: torch.dtype, cache_len: int) -> None:
        K, I = shape["hidden_size"], shape["intermediate_size"]
        self.heads, self.kv_heads = shape["num_attention_heads"], shape["num_key_value_heads"]
        head_dim = K // self.heads
        N = K + 2 * self.kv_heads * head_dim
        dev = x.device

        def weight(*size):
            return torch.randn(*size, device=dev, dtype=dtype) * size[-1] ** -0.5

        self.x = x
        self.norm1, self.norm2 = 1 + 0.1 * torch.randn(K, device=dev, dtype=dtype), 1 + 0.1 * torch.randn(K, device=dev, dtype=dtype)
        self.w_qkv, self.w_o, self.w_gate_up, self.w_down = weight(N, K), weight(K, K), weight(2 * I, K), weight(K, I)
        self.qkv = torch.empty(1, N, device=dev, dtype=dtype)
        self.h = torch.empty(K, device=dev, dtype=dtype)
        self.act = torch.empty(1, I, device=dev, dtype=dtype)
        self.out = torch.empty(K, device=dev, dtype=dtype)
        self.buffers = (self.qkv, self.h, self.act, self.out)
        # The attention's side: a static cache holding cache_len - 1 earlier tokens; the step's
        # token goes to the last position, and the mask admits every written one.
        self.keys, self.values = (torch.randn(1, self.kv_heads, cache_len, head_dim, device=dev, dtype=dtype)
                                  for _ in range(2))
        self.length = torch.tensor(cache_len - 1, device=dev)
        angles = torch.rand(1, 1, head_dim // 2, device=dev) * 6.3
        self.cos, self.sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
        self.mask = torch.ones(1, 1, 1, cache_len, device=dev, dtype=torch.bool)
        self.q, self.attn = torch.empty(1, 1, self.heads, head_dim, device=dev, dtype=dtype), torch.empty(K, device=dev, dtype=dtype)
        self.bytes = sum(w.numel() * w.element_size() for w in (self.w_qkv, self.w_o, self.w_gate_up, self.w_down))

    def attention_calls(self, pdl: bool) -> list:
        """The rotary and cache-write kernel, then the decode attention's, into self.attn."""
        head_dim = self.keys.shape[-1]
        rope = rope_op.rope_launch(self.qkv.view(1, 1, -1), self.cos, self.sin, self.q, self.keys, self.values,
                                   self.length, num_heads=self.heads, num_kv_heads=self.kv_heads, pdl=pdl)
        attention = attention_op.decode_launches(self.q.transpose(1, 2), self.keys, self.values, self.mask,
                                                 head_dim**-0.5, self.attn.view(1, 1, self.heads, head_dim), pdl=pdl)
        return [launcher(kernel, (grid, args, meta)) for kernel, grid, args, meta, _ in (rope, *attention)]

    def calls(self, pdl: bool, plain_between: bool, attention: bool = False, l2_prefetch: int = 0) -> list:
        K = self.x.shape[-1]
        x2 = self.x.view(1, K)
        qkv = launcher(qkv_op._rmsnorm_qkv_decode_kernel,
                       qkv_op.decode_launch(x2, self.norm1, self.w_qkv, None, self.qkv, 1e-5, False, pdl=pdl,
                                            l2_prefetch=l2_prefetch))
        # Without the attention's kernels, the first K columns of qkv stand in for its output.
        attn = self.attn if attention else self.qkv[0, :K]
        o = launcher(linear_op._streaming_linear_kernel,
                     linear_op.stream_launch(attn, self.w_o, None, self.h, residual=self.x.view(K), pdl=pdl,
                                             l2_prefetch=l2_prefetch))
        gu = launcher(gate_up_op._rmsnorm_gate_up_decode_kernel,
                      gate_up_op.decode_launch(self.h.view(1, K), self.norm2, self.w_gate_up, self.act, 1e-5, False,
                                               "silu", pdl=pdl, l2_prefetch=l2_prefetch))
        down = launcher(linear_op._streaming_linear_kernel,
                        linear_op.stream_launch(self.act.view(-1), self.w_down, None, self.out, residual=self.h, pdl=pdl,
                                                l2_prefetch=l2_prefetch))
        between = [lambda: self.qkv.mul_(1.0)] if plain_between else []
        if attention:
            between += self.attention_calls(pdl)
        return [qkv, *between, o, gu, down]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--cache", type=int, default=192, help="tokens in each layer's static cache")
    parser.add_argument("--l2-prefetch", default="default",
                        help="comma-separated bytes of each program's rows to prefetch, each a column with PDL on; "
                             "'default' is the device's l2_prefetch_default, 'none' no such column")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    dtype, dev = torch.bfloat16, torch.device("cuda")
    default_prefetch = l2_prefetch_default(dev)
    depths = [] if args.l2_prefetch == "none" else [
        default_prefetch if d == "default" else int(d) for d in args.l2_prefetch.split(",")]
    shape = SHAPES[args.shape]
    bandwidth = measure_copy_bandwidth()
    x = torch.randn(shape["hidden_size"], device=dev, dtype=dtype)
    layers = []
    for _ in range(args.layers):
        layers.append(Layer(shape, x, dtype, args.cache))
        x = layers[-1].out  # each layer reads the one before's output

    def run(pdl: bool, plain: bool, attention: bool, select=None, l2_prefetch: int = 0) -> tuple[float, torch.Tensor]:
        calls = [c for layer in layers for i, c in enumerate(layer.calls(pdl, plain, attention, l2_prefetch))
                 if select is None or i == select]
        us = time_graph(calls, replays=args.replays) * len(calls)
        return us, torch.cat([b.view(-1) for b in layers[-1].buffers])

    weights = sum(layer.bytes for layer in layers)
    # The layer variant also reads every cache (keys and values, each once).
    caches = sum(2 * layer.keys.numel() * layer.keys.element_size() for layer in layers)
    rows = []
    for name, plain, attention, select, nbytes in [
        ("chain", False, False, None, weights),
        ("chain + plain", True, False, None, weights),
        ("layer", False, True, None, weights + caches),
        ("norm+qkv alone", False, False, 0, sum(layer.w_qkv.numel() * 2 for layer in layers)),
        ("o_proj alone", False, False, 1, sum(layer.w_o.numel() * 2 for layer in layers)),
        ("norm+gate/up alone", False, False, 2, sum(layer.w_gate_up.numel() * 2 for layer in layers)),
        ("down_proj alone", False, False, 3, sum(layer.w_down.numel() * 2 for layer in layers)),
    ]:
        off_us, off_out = run(False, plain, attention, select)
        on_us, on_out = run(True, plain, attention, select)
        per = len(layers)
        floor = nbytes / bandwidth * 1e6
        same = torch.equal(off_out, on_out)
        prefetched = {}
        for depth in depths:
            us, out = run(True, plain, attention, select, depth)
            prefetched[depth] = us / per
            same = same and torch.equal(off_out, out)
        rows.append(dict(variant=name, off_us=off_us / per, on_us=on_us / per, prefetch_us=prefetched,
                         floor_us=floor / per, same_output=bool(same)))
    env = environment()
    print(f"{args.shape}, bf16, {args.layers} layers, cache {args.cache}, µs per layer (per call for one op alone); "
          f"{env['gpu']}, torch {env['torch']}, triton {triton.__version__}; copy {bandwidth / 1e9:.0f} GB/s; "
          f"L2 prefetch default {default_prefetch} bytes a program")
    prefetch_columns = "".join(f" PDL on + prefetch {d} B |" for d in depths)
    print(f"| variant | PDL off µs | PDL on µs | on / off |{prefetch_columns} floor µs | best % of floor | same output |")
    print("| --- " * (7 + len(depths)) + "|")
    for r in rows:
        best = min([r["on_us"], *r["prefetch_us"].values()])
        prefetch_cells = "".join(f" {us:.1f} |" for us in r["prefetch_us"].values())
        print(f"| {r['variant']} | {r['off_us']:.1f} | {r['on_us']:.1f} | {r['on_us'] / r['off_us']:.3f} |{prefetch_cells} "
              f"{r['floor_us']:.1f} | {100 * r['floor_us'] / best:.0f}% | {r['same_output']} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bench_pdl_{args.shape}.json"
        path.write_text(json.dumps(dict(environment=env, shape=args.shape, layers=args.layers, cache=args.cache,
                                        bandwidth=bandwidth, l2_prefetch_default=default_prefetch, rows=rows), indent=1))


if __name__ == "__main__":
    main()
