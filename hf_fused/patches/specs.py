"""What differs between model families, as data. Adding a family is one line in SPECS."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FamilySpec:
    """How a family's decoder layer feeds its attention and its MLP.

    norm_style: "llama" rounds the normalized value before the weight multiply (two roundings);
        "gemma" multiplies by (1 + weight) in fp32 and rounds once.
    qkv: "separate" for q_proj/k_proj/v_proj; "packed" for one qkv_proj already stacked [q; k; v].
    mlp_norm: the layer's norm whose output feeds the MLP and nothing else.
    mlp: "separate" for gate_proj/up_proj; "packed" for one gate_up_proj already stacked [gate; up].
    plain_residuals: whether the decoder layer's forward is exactly
        h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h)),
        with an attention that ends in o_proj: then fuse="residual" may add both residuals in
        the o_proj and down_proj kernels. Not so for granite (residual_multiplier), gemma2/3
        (norms after attention and MLP) or phi3 (dropouts).
    """

    norm_style: str = "llama"
    qkv: str = "separate"
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "separate"
    plain_residuals: bool = False


LLAMA = FamilySpec(plain_residuals=True)
LLAMA_SCALED = FamilySpec()  # granite: the same layer, its residual branches scaled
GEMMA = FamilySpec(norm_style="gemma", plain_residuals=True)
# Gemma 2 and 3 normalize the attention output with post_attention_layernorm before the residual
# add; the MLP's input norm is pre_feedforward_layernorm.
GEMMA2 = FamilySpec(norm_style="gemma", mlp_norm="pre_feedforward_layernorm")

# Only families whose input_layernorm feeds q/k/v and nothing else, and whose attention
# forward starts with proj(hidden_states).view(...): everything after that stays theirs.
# MoE layers (mixtral, qwen2_moe, qwen3_moe, granitemoe) have no gated dense MLP to fuse:
# patch_model leaves those MLPs as they are, and so their residual adds too.
SPECS: dict[str, FamilySpec] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "mixtral": LLAMA,
    "qwen2": LLAMA,
    "qwen2_moe": LLAMA,
    "qwen3": LLAMA,
    "qwen3_moe": LLAMA,
    "granite": LLAMA_SCALED,
    "granitemoe": LLAMA_SCALED,
    "smollm3": LLAMA,
    "gemma": GEMMA,
    "gemma2": GEMMA2,
    "gemma3_text": GEMMA2,
    "phi3": FamilySpec(qkv="packed", mlp="packed"),
}
