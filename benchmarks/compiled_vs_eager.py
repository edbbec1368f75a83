"""Does an op's kernel run as fast when torch.compile launches it as when it is called eagerly?

    python benchmarks/compiled_vs_eager.py

Inductor compiles the user-defined Triton kernels of a traced op itself, with its own argument
types and specializations, so the same kernel can run differently. For the one-token cases of the
Llama-3-8B shapes this times one call per weight copy in a CUDA graph (>= 400 MB of copies, as
the op benchmarks do): the op called eagerly, and the op inside a function compiled with
``fullgraph=True, dynamic=False``, compiled anew for each case. bf16, µs per call.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import copies_for, environment, time_graph  # noqa: E402

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_qkv, streaming_linear  # noqa: E402

EPS = 1e-5
CASES = {  # name: (op on (x, norm_weight, weight), K, weight rows)
    "rmsnorm_qkv": (lambda x, nw, w: rmsnorm_qkv(x, nw, w, eps=EPS), 4096, 6144),
    "rmsnorm_gate_up": (lambda x, nw, w: rmsnorm_gate_up(x, nw, w, eps=EPS), 4096, 2 * 14336),
    "streaming_linear o_proj": (lambda x, nw, w: streaming_linear(x, w), 4096, 4096),
    "streaming_linear down_proj": (lambda x, nw, w: streaming_linear(x, w), 14336, 4096),
}


def main() -> None:
    print(environment())
    dtype = torch.bfloat16
    for name, (op, K, N) in CASES.items():
        weights = [torch.randn(N, K, device="cuda", dtype=dtype) / K**0.5 for _ in range(copies_for(N * K * 2))]
        norm_weight = torch.rand(K, device="cuda", dtype=dtype) + 0.5
        x = torch.randn(1, 1, K, device="cuda", dtype=dtype)
        compiled = torch.compile(op, fullgraph=True, dynamic=False)
        eager_us = time_graph([lambda w=w: op(x, norm_weight, w) for w in weights])
        compiled_us = time_graph([lambda w=w: compiled(x, norm_weight, w) for w in weights])
        print(f"{name:28s} M=1: eager {eager_us:6.1f} us, compiled {compiled_us:6.1f} us", flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
