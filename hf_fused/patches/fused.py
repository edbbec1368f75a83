"""The modules and instance forwards that put rmsnorm_qkv into one attention block.

The family's own attention forward keeps running: it is handed the fused q/k/v output instead
of the hidden states, and its q_proj/k_proj/v_proj become column slices of that output. Rotary,
q/k norms, sliding windows, softcap, scaling and the cache update are therefore never rewritten.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hf_fused.ops import rmsnorm_qkv

QKV_NAMES = ("q_proj", "k_proj", "v_proj")


def norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return eps if isinstance(eps, float) else None


class FusedRMSNormQKV(nn.Module):
    """The layer's input RMSNorm and its q/k/v projections as one rmsnorm_qkv call.

    Owns the stacked [Wq; Wk; Wv] (and bias) for separate projections; for a packed qkv_proj
    it owns nothing and reads that module's weight, so no parameter moves.
    """

    def __init__(
        self,
        norm: nn.Module,
        norm_style: str,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        packed: nn.Linear | None = None,
    ) -> None:
        super().__init__()
        # Held, not registered: the norm keeps its own state_dict key and moves with the layer.
        self.__dict__["norm"] = norm
        self.__dict__["packed"] = packed
        self.norm_style = norm_style
        if packed is None:
            self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
            self.register_parameter("bias", None if bias is None else nn.Parameter(bias, bias.requires_grad))

    def forward(self, x: Tensor) -> Tensor:
        src = self if self.packed is None else self.packed
        # Read at call time, so norm.weight stays the one source of truth after .to() or a load.
        return rmsnorm_qkv(
            x, self.norm.weight, src.weight, src.bias, eps=norm_eps(self.norm), norm_style=self.norm_style
        )

    def extra_repr(self) -> str:
        return f"norm_style={self.norm_style!r}" + (", packed" if self.packed is not None else "")


class QKVSlice(nn.Module):
    """Stands in for q_proj, k_proj or v_proj: its columns of the fused output.

    A last-dim slice of the contiguous fused output still allows the .view(B, S, H, D) the
    stock forward does next, so no copy is made.
    """

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: Tensor) -> Tensor:
        return x[..., self.start : self.stop]

    def extra_repr(self) -> str:
        return f"qkv_fused[..., {self.start}:{self.stop}]"


# Instance forwards are bound with functools.partial, not MethodType: a partial of a module-level
# function pickles (torch.save(model)) and deep-copies onto the copied module.
def identity_forward(module: nn.Module, hidden_states: Tensor) -> Tensor:
    return hidden_states


def fused_attention_forward(attn: nn.Module, hidden_states: Tensor, *args, **kwargs):
    fused = attn.qkv_fused
    qkv = fused(hidden_states)
    if fused.inner_forward is not None:  # an instance forward that was there before (accelerate hooks)
        return fused.inner_forward(qkv, *args, **kwargs)
    return type(attn).forward(attn, qkv, *args, **kwargs)


def stack_rows(parts: list[Tensor]) -> Tensor:
    """torch.cat(parts), without copying when they already are adjacent rows of one buffer.

    That is how unpatch leaves q/k/v, so an unpatch/repatch cycle (verify_patch) costs nothing.
    """
    parts = [p.detach() for p in parts]
    first = parts[0]
    offset = first.storage_offset()
    for p in parts:
        if (
            not p.is_contiguous()
            or p.shape[1:] != first.shape[1:]
            or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
            or p.storage_offset() != offset
        ):
            return torch.cat(parts)
        offset += p.numel()
    rows = sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def state_dict_post_hook(attn: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Write qkv_fused.weight/bias back as q_proj/k_proj/v_proj keys, in their original order."""
    fused = attn.qkv_fused
    local = {k[len(prefix) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for kind in ("weight", "bias"):
        stacked = local.pop(f"qkv_fused.{kind}", None)
        if stacked is not None:
            for name, (start, stop) in fused.bounds.items():
                local[f"{name}.{kind}"] = stacked[start:stop]
    for key in fused.key_order:
        if key in local:
            state_dict[prefix + key] = local.pop(key)
    state_dict.update({prefix + k: v for k, v in local.items()})
    getattr(state_dict, "_metadata", {}).pop(prefix + "qkv_fused", None)


def load_state_dict_pre_hook(attn: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """Stack q_proj/k_proj/v_proj keys into qkv_fused's, so standard checkpoints load."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in QKV_NAMES]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}qkv_fused.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
