"""hf_fused: a fused RMSNorm+QKV kernel, put into Hugging Face models with one call.

    import hf_fused
    model = hf_fused.patch_model(model)
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
