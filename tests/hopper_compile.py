"""Compile the one-token weight-streaming kernels for an H100/H200 (sm_90) without a GPU, with
and without the L2 prefetch, and print what each holds as JSON: run by test_l2_prefetch.py in a
process without the Triton interpreter. Triton's ptxas assembles the PTX, so an instruction the
GPU would refuse fails here."""

import importlib
import json

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

qkv = importlib.import_module("hf_fused.ops.rmsnorm_qkv")
gate_up = importlib.import_module("hf_fused.ops.rmsnorm_gate_up")
linear = importlib.import_module("hf_fused.ops.streaming_linear")

LAUNCH_OPTIONS = ("num_warps", "num_stages", "launch_pdl")
POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_for_sm90(kernel, grid, args, meta) -> dict:
    """The kernel as a launch with these arguments would compile it on an sm_90 GPU."""
    signature = {name: POINTER_TYPES[a.dtype] if isinstance(a, torch.Tensor) else "i32"
                 for name, a in zip(kernel.arg_names, args)}
    constexprs = {name: value for name, value in meta.items() if name not in LAUNCH_OPTIONS}
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    options = {name: meta[name] for name in ("num_warps", "num_stages") if name in meta}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options=options)
    return dict(prefetches=compiled.asm["ptx"].count("cp.async.bulk.prefetch.L2.global"),
                cubin_bytes=len(compiled.asm["cubin"]), prefetch_bytes=meta["L2_PREFETCH_BYTES"])


def main() -> None:
    K, N, I, dtype = 4096, 6144, 14336, torch.bfloat16  # Llama-3-8B
    x, norm = torch.randn(1, K, dtype=dtype), torch.ones(K, dtype=dtype)
    qkv_weight, y_qkv = torch.empty(N, K, dtype=dtype), torch.empty(1, N, dtype=dtype)
    gate_up_weight, act = torch.empty(2 * I, K, dtype=dtype), torch.empty(1, I, dtype=dtype)
    down_weight, out = torch.empty(K, I, dtype=dtype), torch.empty(K, dtype=dtype)
    report = {}
    for prefetch in (0, 48 * 1024):
        report[f"rmsnorm_qkv/{prefetch}"] = compile_for_sm90(qkv._rmsnorm_qkv_decode_kernel, *qkv.decode_launch(
            x, norm, qkv_weight, None, y_qkv, 1e-5, False, pdl=True, l2_prefetch=prefetch))
        report[f"rmsnorm_gate_up/{prefetch}"] = compile_for_sm90(gate_up._rmsnorm_gate_up_decode_kernel, *gate_up.decode_launch(
            x, norm, gate_up_weight, act, 1e-5, False, "silu", pdl=True, l2_prefetch=prefetch))
        report[f"streaming_linear/{prefetch}"] = compile_for_sm90(linear._streaming_linear_kernel, *linear.stream_launch(
            act.view(-1), down_weight, None, out, residual=out, pdl=True, l2_prefetch=prefetch))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
