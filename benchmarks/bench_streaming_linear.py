"""The streaming linear op (o_proj, down_proj) against cuBLAS and torch.compile.

    python benchmarks/bench_streaming_linear.py --ms 1,4,16 --out out/

For each projection shape (K -> N) and token count M, in bf16, it times:
  fused       hf_fused.ops.streaming_linear (the streaming kernel at M=1, cuBLAS from M=2 on)
  stream      for 2 <= M <= 16, the op's tensor-core kernel instead (multi_token="stream")
  cublas      F.linear, what nn.Linear runs
  compiled    torch.compile of F.linear
Timed as bench_rmsnorm_qkv.py times the QKV op: µs per call in a CUDA graph over >= 400 MB of
weight copies, and in launch mode. The floor is max(bytes / copy bandwidth, flops / matmul
rate), both measured in this run, with bytes = weight + x + y and flops = 2 M N K.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import OpBench, compiled, floor_us, main, rel_err, time_variants  # noqa: E402
from timing import copies_for  # noqa: E402

from hf_fused.ops import streaming_linear  # noqa: E402
from hf_fused.ops.streaming_linear import STREAM_MAX_M, streaming_linear_2d  # noqa: E402

SHAPES = {  # name: (K in features, N out features)
    "smollm2-135m/o_proj": (576, 576),
    "smollm2-135m/down_proj": (1536, 576),
    "llama3.2-1b/o_proj": (2048, 2048),
    "llama3.2-1b/down_proj": (8192, 2048),
    "llama3-8b/o_proj": (4096, 4096),
    "llama3-8b/down_proj": (14336, 4096),
    "llama3-70b/o_proj": (8192, 8192),
    "llama3-70b/down_proj": (28672, 8192),
}


def linear(x, weight):
    return F.linear(x, weight)


def bench_point(name, M, bandwidth, flops):
    K, N = SHAPES[name]
    dtype = torch.bfloat16
    copies = copies_for(N * K * 2)
    weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies)]
    x = torch.randn(M, K, device="cuda", dtype=dtype)
    compiled_linear = compiled(linear)
    calls = {
        "fused": [lambda w=w: streaming_linear(x, w) for w in weights],
        "cublas": [lambda w=w: F.linear(x, w) for w in weights],
        "compiled": [lambda w=w: compiled_linear(x, w) for w in weights],
    }
    streams = 1 < M <= STREAM_MAX_M
    if streams:
        calls["stream"] = [lambda w=w: streaming_linear_2d(x, w, None, None, multi_token="stream") for w in weights]
    exact = F.linear(x.double(), weights[0].double())
    moved = (N * K + M * K + M * N) * 2
    row = {"shape": name, "M": M, "K": K, "N": N, "copies": copies,
           "floor_us": floor_us(moved, 2 * M * N * K, bandwidth, flops), "bytes": moved,
           "fused_rel_err": rel_err(streaming_linear(x, weights[0]), exact),
           "torch_rel_err": rel_err(F.linear(x, weights[0]), exact),
           **({"stream_rel_err": rel_err(calls["stream"][0](), exact)} if streams else {}),
           **time_variants(calls)}
    del weights, calls
    torch.cuda.empty_cache()
    return row


OP = OpBench(
    stem="bench_streaming_linear",
    shapes=list(SHAPES),
    peers={"cublas": "cuBLAS", "compiled": "compiled"},
    extra={"stream_graph_us": "stream", "fused_launch_us": "fused launch", "cublas_launch_us": "cuBLAS launch"},
    bench_point=bench_point,
)

if __name__ == "__main__":
    main(OP, __doc__)
