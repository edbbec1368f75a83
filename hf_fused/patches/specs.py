"""What differs between model families, as data. Adding a family is one line in SPECS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    """How a family's decoder layer feeds its attention.

    norm_style: "llama" rounds the normalized value before the weight multiply (two roundings);
        "gemma" multiplies by (1 + weight) in fp32 and rounds once.
    qkv: "separate" for q_proj/k_proj/v_proj; "packed" for one qkv_proj already stacked [q; k; v].
    """

    norm_style: str = "llama"
    qkv: str = "separate"


LLAMA = FamilySpec()
GEMMA = FamilySpec(norm_style="gemma")

# Only families whose input_layernorm feeds q/k/v and nothing else, and whose attention
# forward starts with proj(hidden_states).view(...): everything after that stays theirs.
SPECS: dict[str, FamilySpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "mixtral": LLAMA,
    "qwen2": LLAMA,
    "qwen2_moe": LLAMA,
    "qwen3": LLAMA,
    "qwen3_moe": LLAMA,
    "granite": LLAMA,
    "granitemoe": LLAMA,
    "smollm3": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA,
    "gemma3_text": GEMMA,
    "phi3": FamilySpec(qkv="packed"),
}
