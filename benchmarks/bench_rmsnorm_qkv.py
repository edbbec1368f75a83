"""The fused RMSNorm+QKV op against the unfused PyTorch paths, torch.compile and cuBLAS.

    python benchmarks/bench_rmsnorm_qkv.py --out out/

For each shape (K -> N) and token count M, in bf16, it times:
  fused       hf_fused.ops.rmsnorm_qkv (for M > 64 its default prefill path: Triton norm, then cuBLAS)
  tokens_as_rows  for 2 <= M <= 16, the tensor-core decode kernel with DecodeConfig.tokens_as_rows
  split       for 2 <= M <= 16, multi_token="split": the Triton norm pass, then cuBLAS
  fused_gemm  for M > 64, the single fused tl.dot GEMM kernel instead
  tma_gemm    for M > 64, the persistent TMA tl.dot GEMM kernel, the norm's reduction in its K loop
  eager3      LlamaRMSNorm, then three nn.Linear (what transformers runs)
  compiled3   torch.compile of eager3
  compiled1   torch.compile of the norm and one linear on the concatenated weight (strongest peer)
  gemm_only   cuBLAS F.linear on the concatenated weight, no norm at all
Each as µs per call in a CUDA graph that replays one call per weight copy over >= 400 MB of
copies (so weights stream from HBM, not L2), and in launch mode (back-to-back eager calls).
The floor is max(bytes / copy bandwidth, flops / matmul rate), both measured in this run.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import OpBench, compiled, floor_us, main, rel_err, time_variants  # noqa: E402
from timing import copies_for  # noqa: E402

from hf_fused.ops import rmsnorm_qkv, rmsnorm_qkv_ref  # noqa: E402
from hf_fused.ops.rmsnorm_qkv import DECODE_MAX_M, decode_config, launch_decode, rmsnorm_qkv_2d  # noqa: E402

SHAPES = {  # name: (K hidden, N = q + k + v rows)
    "smollm2-135m": (576, 960),
    "llama3.2-1b": (2048, 3072),
    "llama3-8b": (4096, 6144),
    "llama3-70b": (8192, 10240),
}
HEAD_SPLIT = {  # q rows, kv rows
    "smollm2-135m": (576, 192),
    "llama3.2-1b": (2048, 512),
    "llama3-8b": (4096, 1024),
    "llama3-70b": (8192, 1024),
}
EPS = 1e-5


class UnfusedQKV(torch.nn.Module):
    """The transformers path: a LlamaRMSNorm module, then three separate projections."""

    def __init__(self, norm_weight, qkv_weight, q_rows, kv_rows):
        super().__init__()
        K = norm_weight.shape[0]
        self.norm = LlamaRMSNorm(K, eps=EPS).to(norm_weight)
        self.norm.weight.data = norm_weight
        wq, wk, wv = qkv_weight.split([q_rows, kv_rows, kv_rows])
        self.q, self.k, self.v = (torch.nn.Linear(K, w.shape[0], bias=False) for w in (wq, wk, wv))
        for linear, w in zip((self.q, self.k, self.v), (wq, wk, wv)):
            linear.weight.data = w
        self.requires_grad_(False)  # inference weights, as a loaded model's are under generate

    def forward(self, x):
        h = self.norm(x)
        return self.q(h), self.k(h), self.v(h)


def norm_then_linear(x, norm_weight, qkv_weight):
    return rmsnorm_qkv_ref(x, norm_weight, qkv_weight, eps=EPS)


def norm_then_three_linears(x, norm_weight, wq, wk, wv):
    """UnfusedQKV as a function of its weights, so one compiled graph serves every weight copy."""
    h = norm_weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
    return F.linear(h, wq), F.linear(h, wk), F.linear(h, wv)


def bench_point(name, M, bandwidth, flops):
    K, N = SHAPES[name]
    q_rows, kv_rows = HEAD_SPLIT[name]
    dtype = torch.bfloat16
    copies = copies_for(N * K * 2)
    weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies)]
    norm_weights = [torch.rand(K, device="cuda", dtype=dtype) + 0.5 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    unfused = [UnfusedQKV(nw, w, q_rows, kv_rows) for nw, w in zip(norm_weights, weights)]
    compiled3, compiled1 = compiled(norm_then_three_linears), compiled(norm_then_linear)

    calls = {
        "fused": [lambda nw=nw, w=w: rmsnorm_qkv(x, nw, w, eps=EPS) for nw, w in zip(norm_weights, weights)],
        "eager3": [lambda m=m: m(x) for m in unfused],
        "compiled3": [
            lambda m=m: compiled3(x, m.norm.weight, m.q.weight, m.k.weight, m.v.weight) for m in unfused
        ],
        "compiled1": [lambda nw=nw, w=w: compiled1(x, nw, w) for nw, w in zip(norm_weights, weights)],
        "gemm_only": [lambda w=w: F.linear(x, w) for w in weights],
    }
    as_rows_y = None
    if 1 < M <= 16:  # the tensor-core decode kernel with the product's other orientation, and the split path
        calls["split"] = [
            lambda nw=nw, w=w: rmsnorm_qkv_2d(x, nw, w, None, EPS, False, multi_token="split")
            for nw, w in zip(norm_weights, weights)
        ]
        config = replace(decode_config(M, N, K, x.device), tokens_as_rows=True)
        as_rows_y = x.new_empty(M, N)
        calls["tokens_as_rows"] = [
            lambda nw=nw, w=w: launch_decode(x, nw, w, None, as_rows_y, EPS, False, config)
            for nw, w in zip(norm_weights, weights)
        ]
    if M > DECODE_MAX_M:
        calls["fused_gemm"] = [
            lambda nw=nw, w=w: rmsnorm_qkv_2d(x, nw, w, None, EPS, False, prefill="fused")
            for nw, w in zip(norm_weights, weights)
        ]
        try:  # a new kernel, first timed here: a config that fails to compile is reported, not fatal
            tma_y = rmsnorm_qkv_2d(x, norm_weights[0], weights[0], None, EPS, False, prefill="tma")
        except Exception as error:
            print(f"  TMA GEMM kernel failed: {type(error).__name__}: {error}", flush=True)
            tma_y = None
        if tma_y is not None:
            calls["tma_gemm"] = [
                lambda nw=nw, w=w: rmsnorm_qkv_2d(x, nw, w, None, EPS, False, prefill="tma")
                for nw, w in zip(norm_weights, weights)
            ]
    exact = rmsnorm_qkv_ref(x, norm_weights[0], weights[0], eps=EPS, upcast=True)

    moved = N * K * 2 + (M * K + M * N + K) * 2
    row = {"shape": name, "M": M, "K": K, "N": N, "copies": copies,
           "floor_us": floor_us(moved, 2 * M * N * K, bandwidth, flops), "bytes": moved,
           "fused_rel_err": rel_err(rmsnorm_qkv(x, norm_weights[0], weights[0], eps=EPS), exact),
           "torch_rel_err": rel_err(norm_then_linear(x, norm_weights[0], weights[0]), exact),
           **({"tma_rel_err": rel_err(tma_y, exact)} if "tma_gemm" in calls else {}),
           **time_variants(calls)}
    if as_rows_y is not None:  # the output of the last timed call, on weights[-1]
        row["tokens_as_rows_rel_err"] = rel_err(as_rows_y, rmsnorm_qkv_ref(x, norm_weights[-1], weights[-1], eps=EPS,
                                                                         upcast=True))
    del weights, norm_weights, unfused, calls
    torch.cuda.empty_cache()
    return row


OP = OpBench(
    stem="bench_rmsnorm_qkv",
    shapes=list(SHAPES),
    peers={"eager3": "eager3", "compiled3": "compiled3", "compiled1": "compiled1", "gemm_only": "cuBLAS no norm"},
    extra={"tokens_as_rows_graph_us": "tokens as rows", "split_graph_us": "split", "fused_gemm_graph_us": "fused GEMM kernel", "tma_gemm_graph_us": "TMA GEMM kernel", "fused_launch_us": "fused launch",
           "eager3_launch_us": "eager3 launch"},
    bench_point=bench_point,
)

if __name__ == "__main__":
    main(OP, __doc__)
