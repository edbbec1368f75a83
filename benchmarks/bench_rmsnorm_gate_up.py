"""The fused RMSNorm+gate/up op against the unfused PyTorch paths, torch.compile and cuBLAS.

    python benchmarks/bench_rmsnorm_gate_up.py --out out/

For each shape (K -> I, the weight [Wg; Wu] being (2I, K)) and token count M, in bf16, it times:
  fused       hf_fused.ops.rmsnorm_gate_up, SiLU (for M > 1: Triton norm, cuBLAS, then silu * up in PyTorch)
  stream      for 2 <= M <= 16, the op's tensor-core kernel instead (multi_token="stream")
  eager       LlamaRMSNorm, then gate and up nn.Linear and silu(gate) * up (what transformers runs
              before down_proj)
  compiled2   torch.compile of eager
  compiled1   torch.compile of the norm, one linear on [Wg; Wu] and silu * up on its halves
  gemm_only   cuBLAS F.linear on [Wg; Wu], no norm and no activation
Timed as bench_rmsnorm_qkv.py times the QKV op: µs per call in a CUDA graph over >= 400 MB of
weight copies, and in launch mode. The floor is max(bytes / copy bandwidth, flops / matmul rate),
both measured in this run, with bytes = weight + x + the (M, I) output + norm weight and
flops = 2 M (2I) K.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import OpBench, compiled, floor_us, main, rel_err, time_variants  # noqa: E402
from timing import copies_for  # noqa: E402

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_gate_up_ref  # noqa: E402
from hf_fused.ops._common import rmsnorm_ref  # noqa: E402
from hf_fused.ops.rmsnorm_gate_up import STREAM_MAX_M, rmsnorm_gate_up_2d  # noqa: E402

SHAPES = {  # name: (K hidden, I intermediate)
    "smollm2-135m": (576, 1536),
    "llama3.2-1b": (2048, 8192),
    "llama3-8b": (4096, 14336),
    "llama3-70b": (8192, 28672),
}
EPS = 1e-5


class UnfusedMLP(torch.nn.Module):
    """The transformers path: the post-attention LlamaRMSNorm, then LlamaMLP up to down_proj."""

    def __init__(self, norm_weight, gate_up_weight):
        super().__init__()
        K, I = norm_weight.shape[0], gate_up_weight.shape[0] // 2
        # On the meta device, so that no weight is filled at random only to be replaced.
        with torch.device("meta"):
            self.norm = LlamaRMSNorm(K, eps=EPS)
            self.gate = torch.nn.Linear(K, I, bias=False)
            self.up = torch.nn.Linear(K, I, bias=False)
        for module, weight in zip((self.norm, self.gate, self.up), (norm_weight, *gate_up_weight.chunk(2))):
            # Inference weights: with requires_grad, eager and compiled2 would also record autograd.
            module.weight = torch.nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        h = self.norm(x)
        return F.silu(self.gate(h)) * self.up(h)


def norm_then_two_linears(x, norm_weight, wg, wu):
    """UnfusedMLP as a function of its weights, so one compiled graph serves every weight copy."""
    h = rmsnorm_ref(x, norm_weight, eps=EPS, norm_style="llama")
    return F.silu(F.linear(h, wg)) * F.linear(h, wu)


def norm_then_linear(x, norm_weight, gate_up_weight):
    gate, up = F.linear(rmsnorm_ref(x, norm_weight, eps=EPS, norm_style="llama"), gate_up_weight).chunk(2, dim=-1)
    return F.silu(gate) * up


def bench_point(name, M, bandwidth, flops):
    K, I = SHAPES[name]
    N = 2 * I
    dtype = torch.bfloat16
    copies = copies_for(N * K * 2)
    weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies)]
    norm_weights = [torch.rand(K, device="cuda", dtype=dtype) + 0.5 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    unfused = [UnfusedMLP(nw, w) for nw, w in zip(norm_weights, weights)]
    compiled2, compiled1 = compiled(norm_then_two_linears), compiled(norm_then_linear)

    calls = {
        "fused": [lambda nw=nw, w=w: rmsnorm_gate_up(x, nw, w, eps=EPS) for nw, w in zip(norm_weights, weights)],
        "eager": [lambda m=m: m(x) for m in unfused],
        "compiled2": [lambda m=m: compiled2(x, m.norm.weight, m.gate.weight, m.up.weight) for m in unfused],
        "compiled1": [lambda nw=nw, w=w: compiled1(x, nw, w) for nw, w in zip(norm_weights, weights)],
        "gemm_only": [lambda w=w: F.linear(x, w) for w in weights],
    }
    streams = 1 < M <= STREAM_MAX_M
    if streams:
        calls["stream"] = [lambda nw=nw, w=w: rmsnorm_gate_up_2d(x, nw, w, EPS, False, "silu", multi_token="stream")
                           for nw, w in zip(norm_weights, weights)]
    exact = rmsnorm_gate_up_ref(x, norm_weights[0], weights[0], eps=EPS, upcast=True)

    moved = N * K * 2 + (M * K + M * I + K) * 2
    row = {"shape": name, "M": M, "K": K, "N": N, "I": I, "copies": copies,
           "floor_us": floor_us(moved, 2 * M * N * K, bandwidth, flops), "bytes": moved,
           "fused_rel_err": rel_err(rmsnorm_gate_up(x, norm_weights[0], weights[0], eps=EPS), exact),
           "torch_rel_err": rel_err(rmsnorm_gate_up_ref(x, norm_weights[0], weights[0], eps=EPS), exact),
           **({"stream_rel_err": rel_err(calls["stream"][0](), exact)} if streams else {}),
           **time_variants(calls)}
    del weights, norm_weights, unfused, calls
    torch.cuda.empty_cache()
    return row


OP = OpBench(
    stem="bench_rmsnorm_gate_up",
    shapes=list(SHAPES),
    peers={"eager": "eager", "compiled2": "compiled2", "compiled1": "compiled1", "gemm_only": "cuBLAS GEMM only"},
    extra={"stream_graph_us": "stream", "fused_launch_us": "fused launch", "eager_launch_us": "eager launch"},
    bench_point=bench_point,
)

if __name__ == "__main__":
    main(OP, __doc__)
