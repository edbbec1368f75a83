"""Host time per call of each fused op from eager code, next to the unfused eager calls it replaces.

    python benchmarks/host_overhead.py

Eager decoding at batch 1 is bound by the host: each call's Python, dispatch and launch time,
not its kernel. This times calls back to back on the CPU clock, at shapes small enough that the
GPU is never the bottleneck (SmolLM2-135M's), so the numbers are host cost alone:

  rmsnorm_qkv            hf_fused.ops.rmsnorm_qkv as eager code calls it (its eager launch)
  torch.ops rmsnorm_qkv  the registered custom op, as compiled code and autograd call it
  norm + 3 linears       LlamaRMSNorm and three nn.Linear, as transformers runs them
  rmsnorm_gate_up        hf_fused.ops.rmsnorm_gate_up, one token
  norm + gate/up + act   LlamaRMSNorm, gate_proj, up_proj, silu(gate) * up
  streaming_linear       hf_fused.ops.streaming_linear, one token
  one F.linear           one cuBLAS call, what streaming_linear replaces
  decode_attention       hf_fused.ops.decode_attention, one query over a 384-key static cache
  sdpa attention         transformers' sdpa_attention_forward on the same inputs
  rotary                 hf_fused.ops.rotary on the fused q/k/v output (fuse="rope" over a dynamic cache)
  apply_rotary_pos_emb   transformers' rotary of q and k, as Llama's attention calls it
  rope_cache_write       hf_fused.ops.rope_cache_write and the length's add_ (fuse="rope", static cache)
  rotary + cache update  apply_rotary_pos_emb, then StaticLayer.update
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.cache_utils import StaticLayer
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import environment  # noqa: E402

from hf_fused.ops import decode_attention, rmsnorm_gate_up, rmsnorm_qkv, rope_cache_write, rotary, streaming_linear  # noqa: E402

K, N, I, EPS = 576, 960, 1536, 1e-5
HQ, HKV, D, CACHE = 9, 3, 64, 384  # SmolLM2-135M's attention


def host_us(call, calls: int = 2000, rounds: int = 5) -> float:
    """Median over rounds of host µs per call; the GPU queue absorbs the kernels meanwhile."""
    for _ in range(50):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        times.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    dtype, device = torch.bfloat16, "cuda"
    x = torch.randn(1, 1, K, device=device, dtype=dtype)
    norm_weight = torch.rand(K, device=device, dtype=dtype) + 0.5
    qkv_weight = torch.randn(N, K, device=device, dtype=dtype) / K**0.5
    gate_up_weight = torch.randn(2 * I, K, device=device, dtype=dtype) / K**0.5
    norm = LlamaRMSNorm(K, eps=EPS).to(device, dtype)
    q, k, v = (torch.nn.Linear(K, n, bias=False, device=device, dtype=dtype) for n in (576, 192, 192))
    gate, up = (torch.nn.Linear(K, I, bias=False, device=device, dtype=dtype) for _ in range(2))

    query = torch.randn(1, HQ, 1, D, device=device, dtype=dtype)
    keys, values = (torch.randn(1, HKV, CACHE, D, device=device, dtype=dtype) for _ in range(2))
    valid = (torch.arange(CACHE, device=device) < 200).view(1, 1, 1, CACHE)
    attention = SimpleNamespace(num_key_value_groups=HQ // HKV, is_causal=True)

    fused_qkv = torch.randn(1, 1, (HQ + 2 * HKV) * D, device=device, dtype=dtype)
    cos, sin = (torch.rand(1, 1, D, device=device, dtype=dtype) for _ in range(2))
    layer = StaticLayer(max_cache_len=CACHE)
    layer.lazy_initialization(keys, values)
    heads = dict(num_heads=HQ, num_kv_heads=HKV)

    def stock_rotary():
        q, k, _ = (t.transpose(1, 2) for t in fused_qkv.view(1, 1, -1, D).split((HQ, HKV, HKV), dim=2))
        return apply_rotary_pos_emb(q, k, cos, sin)

    def stock_rotary_and_update():
        q, k = stock_rotary()
        layer.update(k, fused_qkv[..., -HKV * D :].view(1, 1, HKV, D).transpose(1, 2))
        layer.cumulative_length.zero_()  # every call writes position 0 again
        return q

    def fused_rotary_and_write():
        q = rope_cache_write(fused_qkv, cos, sin, layer.keys, layer.values, layer.cumulative_length, **heads)
        layer.cumulative_length.add_(1)
        layer.cumulative_length.zero_()  # as above
        return q

    def unfused_mlp_input():
        h = norm(x)
        return F.silu(gate(h)) * up(h)

    rows = {
        "rmsnorm_qkv": lambda: rmsnorm_qkv(x, norm_weight, qkv_weight, eps=EPS),
        "torch.ops rmsnorm_qkv": lambda: torch.ops.hf_fused.rmsnorm_qkv(x, norm_weight, qkv_weight, None, EPS, False),
        "norm + 3 linears": lambda: (lambda h: (q(h), k(h), v(h)))(norm(x)),
        "rmsnorm_gate_up": lambda: rmsnorm_gate_up(x, norm_weight, gate_up_weight, eps=EPS),
        "norm + gate/up + act": unfused_mlp_input,
        "streaming_linear": lambda: streaming_linear(x, qkv_weight),
        "one F.linear": lambda: F.linear(x, qkv_weight),
        "decode_attention": lambda: decode_attention(query, keys, values, valid, scaling=D**-0.5),
        "sdpa attention": lambda: sdpa_attention_forward(attention, query, keys, values, valid, scaling=D**-0.5),
        "rotary": lambda: rotary(fused_qkv, cos, sin, **heads),
        "apply_rotary_pos_emb": stock_rotary,
        "rope_cache_write": fused_rotary_and_write,
        "rotary + cache update": stock_rotary_and_update,
    }
    env = environment()
    print(f"{env['gpu']}, torch {env['torch']}, triton {env['triton']}, {env['date']}; host µs per call, "
          f"K={K}, N={N}, I={I}, one token, bf16\n")
    print("| call | host µs |\n| --- | --- |")
    for name, call in rows.items():
        print(f"| {name} | {host_us(call):.1f} |", flush=True)


if __name__ == "__main__":
    main()
