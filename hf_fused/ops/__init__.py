"""Triton kernels with their PyTorch references; they know nothing of transformers."""

from hf_fused.ops._common import kernel_runs, rmsnorm_ref
from hf_fused.ops.decode_attention import decode_attention, decode_attention_ref
from hf_fused.ops.rmsnorm_gate_up import rmsnorm_gate_up, rmsnorm_gate_up_ref
from hf_fused.ops.rmsnorm_qkv import rmsnorm_qkv, rmsnorm_qkv_ref
from hf_fused.ops.rope_cache import rope_cache_write, rope_cache_write_ref, rotary, rotary_ref
from hf_fused.ops.streaming_linear import streaming_linear

__all__ = ["decode_attention", "decode_attention_ref", "kernel_runs", "rmsnorm_gate_up", "rmsnorm_gate_up_ref", "rmsnorm_qkv"]
__all__ += ["rmsnorm_qkv_ref", "rmsnorm_ref", "rope_cache_write", "rope_cache_write_ref", "rotary",
            "rotary_ref", "streaming_linear"]
