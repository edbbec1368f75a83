"""Model knowledge: which families can take the fused op, and how it is put in and taken out."""

from hf_fused.patches.patch import DEFAULT_FUSE, UnsupportedModelError, VerifyReport
from hf_fused.patches.patch import is_patched, patch_model, unpatch_model, verify_patch
from hf_fused.patches.specs import SPECS, FamilySpec

__all__ = ["DEFAULT_FUSE", "SPECS", "FamilySpec", "UnsupportedModelError", "VerifyReport"]
__all__ += ["is_patched", "patch_model", "unpatch_model", "verify_patch"]
