"""hf_fused: a fused RMSNorm+QKV kernel, put into Hugging Face models with one call.

    import hf_fused
    model = hf_fused.patch_model(model)

``patch_model(model, fuse=("qkv", "mlp"))`` also fuses each MLP's input RMSNorm, gate and up
projections (hf_fused.ops.rmsnorm_gate_up): tested on CPU only, so not yet the default.
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
