"""Compile the weight-streaming kernels for an H100/H200 (sm_90) without a GPU and print what each
holds as JSON: run by test_l2_prefetch.py in a process without the Triton interpreter. Triton's
ptxas assembles the PTX, so an instruction the GPU would refuse fails here.

Arguments are specialized as Triton's launcher specializes them on a GPU (16-byte aligned
pointers, integers divisible by 16): without that, loads are not vectorized and the pipeliner
leaves them alone, and the code would not be the GPU's.
"""

import importlib
import json
import re
from dataclasses import replace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

qkv = importlib.import_module("hf_fused.ops.rmsnorm_qkv")
gate_up = importlib.import_module("hf_fused.ops.rmsnorm_gate_up")
linear = importlib.import_module("hf_fused.ops.streaming_linear")

SM90 = GPUTarget("cuda", 90, 32)


def compile_for_sm90(kernel, grid, args, meta) -> dict:
    """The kernel as a launch with these arguments and meta-parameters would compile it on an
    sm_90 GPU, and what its code holds."""
    backend = make_backend(SM90)
    bind = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = bind(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=SM90, options=options.__dict__)
    ttgir = compiled.asm["ttgir"]
    return dict(prefetches=compiled.asm["ptx"].count("cp.async.bulk.prefetch.L2.global"),
                cubin_bytes=len(compiled.asm["cubin"]), prefetch_bytes=meta["L2_PREFETCH_BYTES"],
                async_copies=ttgir.count("ttg.async_copy_global_to_local"),
                mma_versions=sorted(set(re.findall(r"versionMajor = (\d+)", ttgir))),
                wgmma_waits=[int(n) for n in re.findall(r"warp_group_dot_wait .*pendings = (\d+)", ttgir)])


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
    # Tensor cores, 16 tokens, in both orientations (DecodeConfig.tokens_as_rows).
    x16, y16 = torch.randn(16, K, dtype=dtype), torch.empty(16, N, dtype=dtype)
    for tokens_as_rows in (False, True):
        config = replace(qkv.decode_config(16, N, K), tokens_as_rows=tokens_as_rows)
        report[f"rmsnorm_qkv_m16/{tokens_as_rows}"] = compile_for_sm90(qkv._rmsnorm_qkv_decode_kernel, *qkv.decode_launch(
            x16, norm, qkv_weight, None, y16, 1e-5, False, config, pdl=True, l2_prefetch=48 * 1024))
    # The norm's reduction pipelined (DecodeConfig.NORM_STAGES).
    config = replace(qkv.decode_config(16, N, K), tokens_as_rows=True, NORM_STAGES=3)
    report["rmsnorm_qkv_m16_norm_stages/True"] = compile_for_sm90(qkv._rmsnorm_qkv_decode_kernel, *qkv.decode_launch(
        x16, norm, qkv_weight, None, y16, 1e-5, False, config, pdl=True, l2_prefetch=48 * 1024))
    # The gate/up and linear kernels' tensor-core paths, 16 tokens.
    act16 = torch.empty(16, I, dtype=dtype)
    report["rmsnorm_gate_up_m16/True"] = compile_for_sm90(gate_up._rmsnorm_gate_up_decode_kernel, *gate_up.decode_launch(
        x16, norm, gate_up_weight, act16, 1e-5, False, "silu", pdl=True, l2_prefetch=48 * 1024))
    out16 = torch.empty(16, K, dtype=dtype)
    report["streaming_linear_m16/True"] = compile_for_sm90(linear._streaming_linear_kernel, *linear.stream_launch(
        act16, down_weight, None, out16, residual=out16, pdl=True, l2_prefetch=48 * 1024))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
