"""Triton kernels with their PyTorch references; they know nothing of transformers."""

from hf_fused.ops.rmsnorm_qkv import rmsnorm_qkv, rmsnorm_qkv_ref

__all__ = ["rmsnorm_qkv", "rmsnorm_qkv_ref"]
