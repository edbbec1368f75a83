"""The modules that put the fused ops into a decoder layer.

Norms: a norm whose work a fused op does becomes a PassThroughNorm, which hands its input on.

Attention: the family's own forward keeps running. A forward pre-hook hands it the fused q/k/v
output instead of the hidden states, and its q_proj/k_proj/v_proj become column slices of that
output, so rotary, q/k norms, sliding windows, softcap, scaling and the cache update are not
rewritten (fuse="rope" alone does rotary, and a static cache's write, for Llama's attention:
patches/rope_cache.py).

MLP: a gated MLP becomes a FusedMLP, down_proj(rmsnorm_gate_up(x)); down_proj stays its own.

o_proj and down_proj, which no norm feeds, become StreamingLinear modules holding the very same
Parameters: streaming_linear instead of F.linear, nothing else changed.

Residual adds (fuse="residual"): the layer's two `residual + ...` adds move into the o_proj and
down_proj kernels. That takes the layer's forward, so the layer instance gets a subclass of its
own class whose forward is ResidualFusedLayer's (residual_fused_class); o_proj becomes a
DeferredOProj, which the attention's forward calls as before and which hands its input on, for
the layer to project with the residual added.

Every change is a module put in place of another (its forward is its class's) or a hook, never an
instance forward: torch.compile checks an instance forward, and any module it reaches by two paths,
with a Python guard on every call of the compiled code. Instance forwards and held norms once put
six such guards in each layer, paid on every step of transformers' static-cache generate
(docs/h200/session2/README.md). The residual fusion's class swap is no instance forward: the
forward is the subclass's.

Separate projections are stacked by rows into one weight owned by the fused module (stack_into);
the originals keep no storage until unstack points them at rows of it again. Under tensor
parallelism each rank stacks its own row shards; the DTensors come back on unstack and in the
state_dict (ShardLayout).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Shard

from hf_fused.ops import rmsnorm_gate_up, rmsnorm_qkv, streaming_linear


def norm_eps(norm: nn.Module) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return eps if isinstance(eps, float) else None


class PassThroughNorm(nn.Module):
    """Stands in for a decoder layer's RMSNorm whose work a fused op does: its input goes on as it
    is (the layer takes its residual before the norm). It holds the very same weight Parameter,
    so the state_dict keeps its key, and the original module, for unpatching."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = norm
        self.weight = norm.weight
        self.eps = norm_eps(norm)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return hidden_states

    def restored(self) -> nn.Module:
        """The original module, holding this one's weight (a load with assign=True may have replaced it)."""
        self.original.weight = self.weight
        return self.original.train(self.training)

    def extra_repr(self) -> str:
        return f"{type(self.original).__name__}, computed by the fused op it feeds"


class FusedNorm(nn.Module):
    """A layer's RMSNorm and the projections it feeds, as one fused op call.

    Owns the stacked weight (and bias) of separate projections; for a packed projection (phi3's
    qkv_proj, gate_up_proj) it owns nothing and reads that module's weight, so no parameter moves.
    """

    def __init__(
        self,
        norm: PassThroughNorm,
        norm_style: str,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        packed: nn.Module | None = None,
    ) -> None:
        super().__init__()
        # The norm's and the packed projection's parameter dicts are held, not the modules: their
        # Parameters stay the one source of truth after .to() or a load with assign=True, and
        # compiled code reaches those modules by no second path (which it would guard in Python).
        self.__dict__["norm_params"] = norm._parameters
        self.__dict__["packed_params"] = None if packed is None else packed._parameters
        self.eps = norm.eps
        self.norm_style = norm_style
        self.hooks = []  # handles of what the patch registered for this module, removed on unpatch
        if packed is None:
            self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
            self.register_parameter("bias", None if bias is None else nn.Parameter(bias, bias.requires_grad))

    @property
    def packed(self) -> bool:
        return self.packed_params is not None

    def operands(self) -> tuple[Tensor, Tensor, Tensor | None, float]:
        params = self._parameters if self.packed_params is None else self.packed_params
        return self.norm_params["weight"], params["weight"], params.get("bias"), self.eps

    def extra_repr(self) -> str:
        return f"norm_style={self.norm_style!r}" + (", packed" if self.packed else "")


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


class LinearStandIn(nn.Module):
    """Stands in for a plain nn.Linear: the same weight and bias Parameters under the same names,
    so no byte is copied and the state_dict keeps its keys. The original module is held for
    unpatching."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.__dict__["original"] = linear
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)

    def restored(self) -> nn.Linear:
        """The original module, holding this one's Parameters (a load with assign=True may have replaced them)."""
        linear = self.original
        linear.weight = self.weight
        linear.register_parameter("bias", self.bias)
        return linear.train(self.training)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class StreamingLinear(LinearStandIn):
    """Stands in for a plain nn.Linear that no norm feeds (o_proj, down_proj), computed by streaming_linear."""

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return streaming_linear(x, self.weight, self.bias, residual)


class DeferredOProj(StreamingLinear):
    """Stands in for o_proj in a layer whose residual add the projection does (fuse="residual").
    The attention's own forward calls it last, on its output, which goes on unprojected; the
    layer's forward (ResidualFusedLayer) then projects it with the residual added."""

    def forward(self, x: Tensor) -> Tensor:
        return x

    def project(self, x: Tensor, residual: Tensor) -> Tensor:
        return streaming_linear(x, self.weight, self.bias, residual)


class ResidualFusedLayer(nn.Module):
    """The forward of a decoder layer whose residual adds the projections' kernels do.

    Never used alone: residual_fused_class puts it before a family's layer class, whose forward
    is h = x + self_attn(input_layernorm(x)); out = h + mlp(post_attention_layernorm(h)) (the
    families whose FamilySpec says plain_residuals). Here, with self_attn.o_proj a DeferredOProj
    and mlp a FusedMLP over a StreamingLinear down_proj, the same is computed by
    o_proj.project(attention, residual=x) and mlp(..., residual=h). The attention gets the
    arguments that the stock forward would have handed it: the layer's own, with their defaults.
    """

    stock_class: type[nn.Module]
    stock_names: tuple[str, ...]  # the stock forward's parameters after hidden_states, in order
    stock_defaults: dict  # and the defaults of those that have one

    def forward(self, hidden_states: Tensor, *args, **kwargs) -> Tensor:
        kwargs = {**self.stock_defaults, **dict(zip(self.stock_names, args)), **kwargs}
        attention, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        hidden_states = self.self_attn.o_proj.project(attention, residual=hidden_states)
        return self.mlp(self.post_attention_layernorm(hidden_states), residual=hidden_states)

    def __reduce_ex__(self, protocol):
        # Pickle can't name a class made at patch time; it rebuilds it from the stock class.
        _, _, *rest = super().__reduce_ex__(protocol)
        return _new_residual_fused_layer, (self.stock_class,), *rest


def _new_residual_fused_layer(stock: type[nn.Module]) -> nn.Module:
    """An empty instance of residual_fused_class(stock), for unpickling and copying to fill in."""
    return object.__new__(residual_fused_class(stock))


@functools.cache
def residual_fused_class(stock: type[nn.Module]) -> type[nn.Module]:
    """The subclass of a decoder layer class that patch_model gives a layer instance for
    fuse="residual" (unpatch_model gives it ``stock`` back): one per class, so compiled code
    sees one class for all such layers."""
    params = list(inspect.signature(stock.forward).parameters.values())[2:]  # after self, hidden_states
    named = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    attrs = dict(
        stock_class=stock,
        stock_names=tuple(p.name for p in named if p.kind is p.POSITIONAL_OR_KEYWORD),
        stock_defaults={p.name: p.default for p in named if p.default is not p.empty},
        __module__=__name__,
    )
    return type(f"ResidualFused{stock.__name__}", (ResidualFusedLayer, stock), attrs)


def stock_forward_problem(stock: type[nn.Module]) -> str | None:
    """Why residual_fused_class can't stand for this layer class's forward, or None if it can."""
    if not stock.__module__.startswith("transformers.models."):
        return f"{stock.__name__} is not a transformers layer class (its forward may compute otherwise)"
    params = list(inspect.signature(stock.forward).parameters)
    if params[1:2] != ["hidden_states"]:
        return f"{stock.__name__}.forward does not take hidden_states first"
    return None


class PackedPassThrough(LinearStandIn):
    """Stands in for a packed qkv_proj whose rows the fused op already multiplied: its input,
    the fused output, goes on as it is, for the attention's own slicing."""

    def forward(self, x: Tensor) -> Tensor:
        return x


class FusedMLP(nn.Module):
    """Stands in for a gated MLP whose norm, gate/up projections and activation one fused op
    computes: down_proj(gate_up_fused(x)). It holds the MLP's children under their names (the
    packed gate_up_proj, or the stand-ins of gate_proj and up_proj), so the state_dict keeps its
    keys, and the original MLP, for unpatching."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.__dict__["original"] = mlp
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.train(mlp.training)

    def forward(self, hidden_states: Tensor, residual: Tensor | None = None) -> Tensor:
        if residual is None:
            return self.down_proj(self.gate_up_fused(hidden_states))
        # fuse="residual": down_proj is then a StreamingLinear, which adds it in its kernel.
        return self.down_proj(self.gate_up_fused(hidden_states), residual=residual)

    def restored(self) -> nn.Module:
        """The original MLP, with this one's down_proj (the streaming fusion may have replaced it)."""
        self.original.down_proj = self.down_proj
        return self.original.train(self.training)

    def extra_repr(self) -> str:
        return type(self.original).__name__


def feed_fused_qkv(attn: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of a patched attention: its hidden states become the fused q/k/v output,
    which its q_proj, k_proj and v_proj stand-ins slice."""
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": attn.qkv_fused(kwargs["hidden_states"])}
    return (attn.qkv_fused(args[0]), *args[1:]), kwargs


@dataclass(frozen=True)
class ShardLayout:
    """How a tensor-parallel parameter (a DTensor) was laid out, so that rows of the fused local
    weight can be handed out again as the same DTensor."""

    mesh: object
    placements: tuple
    shape: torch.Size
    stride: tuple[int, ...]

    @classmethod
    def of(cls, t: DTensor) -> ShardLayout:
        return cls(t.device_mesh, tuple(t.placements), t.shape, t.stride())

    def wrap(self, local: Tensor) -> DTensor:
        return DTensor.from_local(local, self.mesh, self.placements, run_check=False, shape=self.shape, stride=self.stride)


def local_shard(t: Tensor) -> Tensor:
    """This rank's part of a tensor-parallel DTensor; a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def tensor_parallel_problem(
    norm_weight: Tensor, projs: dict[str, nn.Linear], heads: tuple[int | None, int | None] | None
) -> str | None:
    """Why these projections can't be fused under tensor parallelism, or None if they can.

    Each rank fuses its own row shards (transformers' "colwise" plan), so each rank must hold
    whole heads, with as many query heads per key/value head as the model has (``heads`` is
    (head_dim, query heads per kv head) for attention, None for an MLP), and equal shards of
    projections that meet elementwise. Every weight must be sharded alike, and the norm not at all.
    """
    params = [t for p in projs.values() for t in (p.weight, p.bias) if t is not None]
    sharded = [isinstance(t, DTensor) for t in params]
    if isinstance(norm_weight, DTensor):
        return "the norm weight is a DTensor (sharded norms are not supported)"
    if not any(sharded):
        return None
    if not all(sharded):
        return "mixes tensor-parallel (DTensor) and plain weights"
    if len({(t.device_mesh, tuple(t.placements)) for t in params}) > 1 or tuple(params[0].placements) != (Shard(0),):
        return "is not sharded by output rows (tensor parallel 'colwise') on one mesh dimension"
    rows = {name: local_shard(p.weight).shape[0] for name, p in projs.items()}
    names = list(rows)
    if heads is None:
        if len(set(rows.values())) > 1:
            return f"has shards of unequal sizes on this rank: {rows}"
        return None
    head_dim, groups = heads
    if not (isinstance(head_dim, int) and isinstance(groups, int)):
        return "is tensor-parallel, and its attention has no int head_dim and num_key_value_groups to check shards against"
    q, k, v = (rows[n] for n in names)
    if q % head_dim or k % head_dim or k != v or q != groups * k:
        return (f"has tensor-parallel shards that are not whole heads on this rank ({rows}; head_dim {head_dim}, "
                f"{groups} query heads per key/value head)")
    return None


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
    ``placeholder(start, stop)`` in their places, and keep their state_dict keys on ``parent``.

    Under tensor parallelism the projections hold DTensor row shards: the fused weight stacks
    this rank's shards, a plain tensor, and the DTensors are rebuilt from its rows on unstack
    and in the state_dict."""
    key_order = list(parent.state_dict(keep_vars=True))
    first = next(iter(projs.values()))
    with torch.no_grad():
        weight = stack_rows([local_shard(p.weight) for p in projs.values()]).requires_grad_(first.weight.requires_grad)
        bias = None if first.bias is None else stack_rows([local_shard(p.bias) for p in projs.values()])
    if bias is not None:
        bias.requires_grad_(first.bias.requires_grad)
    fused = make_fused(weight, bias)
    bounds, layouts, start = {}, {}, 0
    for name, proj in projs.items():
        rows = local_shard(proj.weight).shape[0]
        bounds[name] = (start, start + rows)
        start += rows
        # Drop the originals' storage (the fused weight has it now); unstack points them back
        # at rows of whatever the fused weight is then, e.g. after model.to(float16).
        for kind in ("weight", "bias"):
            p = getattr(proj, kind)
            if isinstance(p, DTensor):
                # A DTensor's local storage can't be swapped through .data: drop the parameter.
                layouts[name, kind] = ShardLayout.of(p)
                proj._parameters[kind] = None
            elif p is not None:
                p.data = p.data.new_empty(0)
        setattr(parent, name, placeholder(*bounds[name]).train(parent.training))
    fused.bounds, fused.layouts, fused.key_order, fused.originals = bounds, layouts, key_order, projs
    fused.hooks += [
        parent.register_state_dict_post_hook(partial(state_dict_post_hook, attr=attr)),
        parent.register_load_state_dict_pre_hook(partial(load_state_dict_pre_hook, attr=attr)),
    ]
    return fused


def unstack(parent: nn.Module, fused: FusedNorm) -> None:
    """Put the original projections back as row views of the current fused weight: no copy, and right after any .to()."""
    for name, proj in fused.originals.items():
        start, stop = fused.bounds[name]
        for kind in ("weight", "bias"):
            stacked = getattr(fused, kind)
            if stacked is None:
                continue
            rows = stacked.detach()[start:stop]
            layout = fused.layouts.get((name, kind))
            if layout is not None:
                proj._parameters[kind] = nn.Parameter(layout.wrap(rows), requires_grad=stacked.requires_grad)
            else:
                getattr(proj, kind).data = rows
                getattr(proj, kind).requires_grad_(stacked.requires_grad)
        setattr(parent, name, proj)


def state_dict_post_hook(parent: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, *, attr: str) -> None:
    """Write the fused weight/bias back as the original projections' keys, in their original order."""
    fused = getattr(parent, attr)
    local = {k[len(prefix) :]: state_dict.pop(k) for k in [k for k in state_dict if k.startswith(prefix)]}
    for kind in ("weight", "bias"):
        stacked = local.pop(f"{attr}.{kind}", None)
        if stacked is not None:
            for name, (start, stop) in fused.bounds.items():
                layout = fused.layouts.get((name, kind))
                rows = stacked[start:stop]
                local[f"{name}.{kind}"] = rows if layout is None else layout.wrap(rows)
    for key in fused.key_order:
        if key in local:
            state_dict[prefix + key] = local.pop(key)
    state_dict.update({prefix + k: v for k, v in local.items()})
    getattr(state_dict, "_metadata", {}).pop(prefix + attr, None)


def load_state_dict_pre_hook(parent: nn.Module, state_dict: dict, prefix: str, *args, attr: str) -> None:
    """Stack the original projections' keys into the fused module's, so standard checkpoints load."""
    fused = getattr(parent, attr)
    for kind in ("weight", "bias"):
        keys = {name: f"{prefix}{name}.{kind}" for name in fused.bounds}
        if not all(k in state_dict for k in keys.values()):
            continue
        for name, key in keys.items():
            if (name, kind) in fused.layouts and not isinstance(state_dict[key], DTensor):
                raise ValueError(f"{key}: a tensor-parallel patched model loads the DTensor shards its own "
                                 f"state_dict() gives, not a full tensor; load it before patch_model")
        parts = [local_shard(state_dict.pop(key)) for key in keys.values()]
        state_dict[f"{prefix}{attr}.{kind}"] = torch.cat(parts)
