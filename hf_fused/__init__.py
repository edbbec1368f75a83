"""hf_fused: fused RMSNorm+projection Triton kernels, put into Hugging Face models with one call.

    import hf_fused
    model = hf_fused.patch_model(model)

By default each decoder layer's input RMSNorm and q/k/v projections become one kernel
(hf_fused.ops.rmsnorm_qkv), the MLP's input RMSNorm, gate and up projections and act(gate) * up
another (hf_fused.ops.rmsnorm_gate_up), and o_proj and down_proj stream their weights at one
token (hf_fused.ops.streaming_linear). ``fuse=`` picks a subset.
"""

from hf_fused.patches import (
    UnsupportedModelError,
    VerifyReport,
    is_patched,
    patch_model,
    unpatch_model,
    verify_patch,
)

__all__ = ["UnsupportedModelError", "VerifyReport", "is_patched", "patch_model", "unpatch_model", "verify_patch"]
