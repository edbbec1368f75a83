"""The modules and instance forwards that put the fused ops into a decoder layer.

Attention: the family's own forward keeps running. It is handed the fused q/k/v output instead of
the hidden states, and its q_proj/k_proj/v_proj become column slices of that output, so rotary,
q/k norms, sliding windows, softcap, scaling and the cache update are never rewritten.

MLP: a gated MLP's forward becomes down_proj(rmsnorm_gate_up(x)); down_proj stays its own.

Separate projections are stacked by rows into one weight owned by the fused module (stack_into);
the originals keep no storage until unstack points them at rows of it again.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor, nn

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_qkv


def norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return eps if isinstance(eps, float) else None


class FusedNorm(nn.Module):
    """A layer's RMSNorm and the projections it feeds, as one fused op call.

    Owns the stacked weight (and bias) of separate projections; for a packed projection (phi3's
    qkv_proj, gate_up_proj) it owns nothing and reads that module's weight, so no parameter moves.
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

    def operands(self) -> tuple[Tensor, Tensor, Tensor | None, float]:
        # Read at call time, so norm.weight stays the one source of truth after .to() or a load.
        src = self if self.packed is None else self.packed
        return self.norm.weight, src.weight, src.bias, norm_eps(self.norm)

    def extra_repr(self) -> str:
        return f"norm_style={self.norm_style!r}" + (", packed" if self.packed is not None else "")


class FusedRMSNormQKV(FusedNorm):
    """The input RMSNorm and q/k/v projections: rmsnorm_qkv."""

    def forward(self, x: Tensor) -> Tensor:
        norm_weight, weight, bias, eps = self.operands()
        return rmsnorm_qkv(x, norm_weight, weight, bias, eps=eps, norm_style=self.norm_style)


class FusedRMSNormGateUp(FusedNorm):
    """The MLP's input RMSNorm, gate and up projections and act(gate) * up: rmsnorm_gate_up."""

    def __init__(self, *args, activation: str, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, x: Tensor) -> Tensor:
        norm_weight, weight, _, eps = self.operands()
        return rmsnorm_gate_up(x, norm_weight, weight, eps=eps, norm_style=self.norm_style, activation=self.activation)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"


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


class FusedAway(nn.Module):
    """Stands in for gate_proj or up_proj, which the fused MLP forward never calls: a call is a
    mistake, and says where the weight went."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError(f"fused by hf_fused into gate_up_fused.weight[{self.start}:{self.stop}]; unpatch_model to call it")

    def extra_repr(self) -> str:
        return f"gate_up_fused.weight[{self.start}:{self.stop}]"


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


def fused_mlp_forward(mlp: nn.Module, hidden_states: Tensor) -> Tensor:
    return mlp.down_proj(mlp.gate_up_fused(hidden_states))


def stack_rows(parts: list[Tensor]) -> Tensor:
    """torch.cat(parts), without copying when they already are adjacent rows of one buffer.

    That is how unstack leaves them, so an unpatch/repatch cycle (verify_patch) costs nothing.
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


def stack_into(
    parent: nn.Module,
    attr: str,
    make_fused: Callable[[Tensor, Tensor | None], FusedNorm],
    projs: dict[str, nn.Linear],
    placeholder: Callable[[int, int], nn.Module],
) -> FusedNorm:
    """Stack ``projs`` (children of ``parent``) by rows into ``make_fused(weight, bias)``, put
    ``placeholder(start, stop)`` in their places, and keep their state_dict keys on ``parent``."""
    key_order = list(parent.state_dict(keep_vars=True))
    first = next(iter(projs.values()))
    with torch.no_grad():
        weight = stack_rows([p.weight for p in projs.values()]).requires_grad_(first.weight.requires_grad)
        bias = None if first.bias is None else stack_rows([p.bias for p in projs.values()])
    if bias is not None:
        bias.requires_grad_(first.bias.requires_grad)
    fused = make_fused(weight, bias)
    bounds, start = {}, 0
    for name, proj in projs.items():
        bounds[name] = (start, start + proj.out_features)
        start += proj.out_features
        # Drop the originals' storage (the fused weight has it now); unstack points them back
        # at rows of whatever the fused weight is then, e.g. after model.to(float16).
        for p in (proj.weight, proj.bias):
            if p is not None:
                p.data = p.data.new_empty(0)
        setattr(parent, name, placeholder(*bounds[name]).train(parent.training))
    fused.bounds, fused.key_order, fused.originals = bounds, key_order, projs
    fused.hooks = [
        parent.register_state_dict_post_hook(partial(state_dict_post_hook, attr=attr)),
        parent.register_load_state_dict_pre_hook(partial(load_state_dict_pre_hook, attr=attr)),
    ]
    return fused


def unstack(parent: nn.Module, fused: FusedNorm) -> None:
    """Put the original projections back as row views of the current fused weight: no copy, and right after any .to()."""
    for hook in fused.hooks:
        hook.remove()
    weight = fused.weight.detach()
    bias = None if fused.bias is None else fused.bias.detach()
    for name, proj in fused.originals.items():
        start, stop = fused.bounds[name]
        proj.weight.data = weight[start:stop]
        proj.weight.requires_grad_(fused.weight.requires_grad)
        if bias is not None:
            proj.bias.data = bias[start:stop]
            proj.bias.requires_grad_(fused.bias.requires_grad)
        setattr(parent, name, proj)


def state_dict_post_hook(parent: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *, attr: str) -> None:
    """Write the fused weight/bias back as the original projections' keys, in their original order."""
    fused = getattr(parent, attr)
    local = {k[len(prefix) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for kind in ("weight", "bias"):
        stacked = local.pop(f"{attr}.{kind}", None)
        if stacked is not None:
            for name, (start, stop) in fused.bounds.items():
                local[f"{name}.{kind}"] = stacked[start:stop]
    for key in fused.key_order:
        if key in local:
            state_dict[prefix + key] = local.pop(key)
    state_dict.update({prefix + k: v for k, v in local.items()})
    getattr(state_dict, "_metadata", {}).pop(prefix + attr, None)


def load_state_dict_pre_hook(parent: nn.Module, state_dict: dict, prefix: str, *args, attr: str) -> None:
    """Stack the original projections' keys into the fused module's, so standard checkpoints load."""
    for kind in ("weight", "bias"):
        keys = [f"{prefix}{name}.{kind}" for name in getattr(parent, attr).bounds]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}{attr}.{kind}"] = torch.cat([state_dict.pop(k) for k in keys])
