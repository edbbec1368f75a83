"""patch_model / unpatch_model / verify_patch: the public entry points.

Instances are patched, never classes, so one patched model leaves every other one alone, and
unpatching restores the original module objects with bit-identical weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from hf_fused.ops import rmsnorm_ref
from hf_fused.ops.rmsnorm_gate_up import ACTIVATIONS
from hf_fused.patches.attention import attention_problem, restore_attention, use_decode_attention, uses_decode_attention
from hf_fused.patches.rope_cache import RopeCacheAttention, rope_cache_class, rope_cache_problem
from hf_fused.patches.fused import (
    DeferredOProj,
    FusedAway,
    FusedMLP,
    FusedNorm,
    FusedRMSNormGateUp,
    FusedRMSNormQKV,
    LinearStandIn,
    PackedPassThrough,
    PassThroughNorm,
    QKVSlice,
    ResidualFusedLayer,
    StreamingLinear,
    feed_fused_qkv,
    local_shard,
    norm_eps,
    residual_fused_class,
    stack_into,
    stock_forward_problem,
    tensor_parallel_problem,
    unstack,
)
from hf_fused.patches.specs import SPECS, FamilySpec

logger = logging.getLogger("hf_fused")

# Relative L2 error of the logits that verify_patch accepts. On CPU the ops are bit-identical;
# on GPU only the matmul's summation order differs, so these are a few ulps of each dtype
# grown over the depth of a model.
RTOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class UnsupportedModelError(ValueError):
    """The model can't be patched; it was left untouched."""


@dataclass(frozen=True)
class _Kind:
    """What differs between the fusions, as data."""

    parent: str  # the decoder layer's child that the norm feeds
    attr: str  # the fused module's name on that child
    separate: tuple[str, ...]  # the projections it stacks, or else one packed projection:
    packed: str
    module: type[FusedNorm]
    bias: bool  # whether its op takes the projections' bias
    # The child's own forward still runs on the fused output (attention), so its projections
    # become slices or pass-throughs of it; the MLP is replaced whole and never calls them.
    passthrough: bool
    placeholder: type[nn.Module]


KINDS = {
    "qkv": _Kind("self_attn", "qkv_fused", ("q_proj", "k_proj", "v_proj"), "qkv_proj", FusedRMSNormQKV,
                 bias=True, passthrough=True, placeholder=QKVSlice),
    "mlp": _Kind("mlp", "gate_up_fused", ("gate_proj", "up_proj"), "gate_up_proj", FusedRMSNormGateUp,
                 bias=False, passthrough=False, placeholder=FusedAway),
}


# fuse="gemv": the projections that no norm feeds, as (the layer's child, its projection).
STREAMED = (("self_attn", "o_proj"), ("mlp", "down_proj"))
# The fusions that replace modules, and those that change how the layer's remaining work runs
# (patches/attention.py, the residual adds in the o_proj and down_proj kernels, patches/rope_cache.py).
MODULE_FUSIONS = (*KINDS, "gemv")
FUSIONS = (*MODULE_FUSIONS, "attention", "residual", "rope")
# Every fusion: on an H100, Llama-3-8B shape at batch 1, it beat the module fusions alone in
# eager generate (2.51x unpatched against 1.32x), static-cache generate (1.13x against 1.06x)
# and the CUDA-graph loop (1.18x against 1.12x), in one run (docs/h100/2026-12-06/).
DEFAULT_FUSE = FUSIONS


@dataclass
class _Fusion:
    kind: str
    layer: nn.Module
    norm_name: str
    parent: nn.Module
    norm: nn.Module
    projs: dict[str, nn.Linear]
    activation: str | None = None


def _family(model: nn.Module) -> tuple[str, FamilySpec]:
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or config is None:
        raise UnsupportedModelError(f"expected a transformers model with a .config, got {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    if model_type not in SPECS and hasattr(config, "get_text_config"):
        # Multimodal wrappers (Gemma3ForConditionalGeneration) carry a supported text decoder.
        text_type = getattr(config.get_text_config(), "model_type", None)
        model_type = text_type if text_type in SPECS else model_type
    if model_type not in SPECS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by hf_fused; supported: {', '.join(sorted(SPECS))}"
        )
    return model_type, SPECS[model_type]


def _fusion(layer: nn.Module, kind: str, spec: FamilySpec) -> _Fusion | str:
    """One fusion's norm and projections in this decoder layer, or why they can't be fused exactly."""
    k = KINDS[kind]
    norm_name = "input_layernorm" if kind == "qkv" else spec.mlp_norm
    packed = (spec.qkv if kind == "qkv" else spec.mlp) == "packed"
    norm, parent = getattr(layer, norm_name, None), getattr(layer, k.parent, None)
    if parent is None:
        return f"has no {k.parent}"
    weight = getattr(norm, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1):
        return f"{norm_name} is {type(norm).__name__}, not an RMSNorm with a weight"
    if norm_eps(norm) is None:
        return f"{norm_name} has no float eps/variance_epsilon"
    projs = {name: getattr(parent, name, None) for name in ((k.packed,) if packed else k.separate)}
    for name, proj in projs.items():
        if proj is None:
            return f"{k.parent} ({type(parent).__name__}) has no {name}"
        # Exactly nn.Linear: quantized layers and PEFT/LoRA wrappers compute something else.
        if type(proj) is not nn.Linear:
            return f"{k.parent}.{name} is {type(proj).__name__}, not a plain nn.Linear"
        if proj.in_features != weight.shape[0]:
            return f"{k.parent}.{name} does not take the norm's {weight.shape[0]} features"
    tensors = [weight] + [t for p in projs.values() for t in (p.weight, p.bias) if t is not None]
    if any(t.is_meta for t in tensors):
        return "has weights on the meta device (offloaded or not loaded yet)"
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        return f"{norm_name} and {k.parent} weights differ in dtype or device"
    biases = {p.bias is None for p in projs.values()}
    if len(biases) > 1 or (not k.bias and biases != {True}):
        return f"{k.parent}'s {' and '.join(projs)} have biases the fused op doesn't take"
    heads = (getattr(parent, "head_dim", None), getattr(parent, "num_key_value_groups", None)) if kind == "qkv" else None
    if packed and any(isinstance(t, DTensor) for t in tensors):
        return f"{k.parent}.{k.packed} is tensor-parallel (DTensor); packed projections are fused only unsharded"
    if problem := tensor_parallel_problem(weight, projs, heads):
        return f"{k.parent}.{'/'.join(projs)} {problem}"
    if not k.passthrough and ("forward" in parent.__dict__ or parent._forward_hooks or parent._forward_pre_hooks):
        return f"{k.parent} has an instance forward or hooks (accelerate) that the fused MLP would drop"
    if not k.passthrough and (parent._parameters or parent._buffers):
        return f"{k.parent} ({type(parent).__name__}) has parameters or buffers of its own that the fused MLP would drop"
    if list(norm._parameters) != ["weight"] or norm._buffers or norm._modules:
        return f"{norm_name} ({type(norm).__name__}) holds more than its weight, which its stand-in would drop"
    return _Fusion(kind, layer, norm_name, parent, norm, projs)


def _streamed_problem(proj: nn.Module | None) -> str | None:
    """Why this projection can't run streaming_linear in place of nn.Linear, or None if it can."""
    if proj is None:
        return "is missing (a mixture of experts' projections are not streamed)"
    if type(proj) is not nn.Linear:
        return f"is {type(proj).__name__}, not a plain nn.Linear"
    if proj.weight.is_meta:
        return "has weights on the meta device (offloaded or not loaded yet)"
    if isinstance(proj.weight, DTensor):
        # Row-sharded o_proj/down_proj need the all-reduce that tensor parallelism hooks onto them.
        return "is tensor-parallel (DTensor)"
    if "forward" in proj.__dict__ or proj._forward_hooks or proj._forward_pre_hooks:
        return "has hooks or an instance forward that a new module would drop"
    return None


def _streamed(layer: nn.Module, skipped: dict[str, int]) -> list[tuple[nn.Module, str]]:
    """(parent, name) of each of this layer's projections that StreamingLinear can take; the
    others are counted in ``skipped`` by reason."""
    found = []
    for child, name in STREAMED:
        parent = getattr(layer, child, None)
        problem = _streamed_problem(getattr(parent, name, None))
        if problem is None:
            found.append((parent, name))
        else:
            reason = f"{child}.{name} {problem}"
            skipped[reason] = skipped.get(reason, 0) + 1
    return found


def _residual_problem(
    layer: nn.Module, spec: FamilySpec, mlp_fused: set[int], streamed: set[tuple[int, str]]
) -> str | None:
    """Why this layer's residual adds can't move into its o_proj and down_proj kernels, or None if they can."""
    if not spec.plain_residuals:
        return f"residual: {type(layer).__name__} adds its residuals otherwise than x + attention, h + mlp"
    if problem := stock_forward_problem(type(layer)):
        return f"residual: {problem}"
    if "forward" in layer.__dict__:
        return "residual: the layer has an instance forward"
    if id(layer) not in mlp_fused:
        return "residual: the layer's MLP is not fused"
    if (id(layer.self_attn), "o_proj") not in streamed or (id(layer.mlp), "down_proj") not in streamed:
        return "residual: the layer's o_proj or down_proj is not streamed"
    return None


@dataclass
class _Plan:
    model_type: str
    spec: FamilySpec
    fusions: list[_Fusion]
    streamed: list[tuple[nn.Module, str]]  # (parent, name) of each projection to stream
    attention: bool
    residual_layers: list[nn.Module]
    rope_attentions: list[nn.Module]


def _plan(model: nn.Module, fuse: tuple[str, ...]) -> _Plan:
    """Find and check every decoder layer (and whether the attention can be chosen) before anything is touched.

    A layer that can't take the QKV fusion is an error; an MLP that can't (MoE experts, biases,
    another activation), or a projection that can't stream, or a layer whose residual adds can't
    move, stays as it is, logged once per reason.
    """
    model_type, spec = _family(model)
    fusions, streamed, skipped, seen, layers = [], [], {}, set(), []
    for where, layer in model.named_modules():
        if getattr(layer, "self_attn", None) is None or getattr(layer, "input_layernorm", None) is None:
            continue
        layers.append(layer)
        if "gemv" in fuse:
            streamed += _streamed(layer, skipped)
        for kind in (k for k in fuse if k in KINDS):
            fusion = _fusion(layer, kind, spec)
            if isinstance(fusion, str) and kind == "qkv":
                raise UnsupportedModelError(f"{where}: {fusion}")
            if isinstance(fusion, str):
                skipped[fusion] = skipped.get(fusion, 0) + 1
                continue
            if id(fusion.parent) in seen or id(fusion.norm) in seen:
                raise UnsupportedModelError(f"{where} shares its {KINDS[kind].parent} or its norm with another layer")
            seen.update((id(fusion.parent), id(fusion.norm)))
            fusions.append(fusion)
    n_layers = len(layers)
    if not n_layers:
        raise UnsupportedModelError(f"no decoder layer with input_layernorm and self_attn found in {model_type} model")
    activations = {}
    for fusion in fusions:
        if fusion.kind == "mlp":
            cls = type(fusion.parent)
            if cls not in activations:
                activations[cls] = _mlp_activation(fusion)
            fusion.activation = activations[cls]
            if fusion.activation is None:
                reason = f"mlp ({cls.__name__}) computes other than down_proj(act(gate) * up), act silu or gelu_tanh"
                skipped[reason] = skipped.get(reason, 0) + 1
    fusions = [f for f in fusions if f.kind == "qkv" or f.activation is not None]
    residual_layers = []
    if "residual" in fuse:
        mlp_fused = {id(f.layer) for f in fusions if f.kind == "mlp"}
        streamed_ids = {(id(parent), name) for parent, name in streamed}
        for layer in layers:
            problem = _residual_problem(layer, spec, mlp_fused, streamed_ids)
            if problem is None:
                residual_layers.append(layer)
            else:
                skipped[problem] = skipped.get(problem, 0) + 1
    rope_attentions = []
    if "rope" in fuse:
        for fusion in (f for f in fusions if f.kind == "qkv"):
            rows = sum(local_shard(p.weight).shape[0] for p in fusion.projs.values())
            problem = rope_cache_problem(fusion.parent, rows)
            if problem is None:
                rope_attentions.append(fusion.parent)
            else:
                skipped[problem] = skipped.get(problem, 0) + 1
    attention = "attention" in fuse and (problem := attention_problem(model)) is None
    if "attention" in fuse and not attention:
        skipped[f"attention: {problem}"] = n_layers
    for reason, count in skipped.items():
        # "attention: ...", "residual: ...", "rope: ...": a fusion that the default asks for
        # wherever it applies, so its absence is news only to one who named it.
        optional = reason.split(":")[0] in FUSIONS[len(MODULE_FUSIONS):] and fuse == DEFAULT_FUSE
        logger.log(logging.INFO if optional else logging.WARNING, "hf_fused: left as it is in %d of %d %s layers: %s",
                   count, n_layers, model_type, reason)
    if not fusions and not streamed and not attention:
        raise UnsupportedModelError(f"nothing to fuse in this {model_type} model: {'; '.join(skipped)}")
    for norm in {type(f.norm): f.norm for f in fusions}.values():
        if not _computes_norm_style(norm, spec.norm_style):
            raise UnsupportedModelError(
                f"{type(norm).__name__} in this {model_type} model does not compute a {spec.norm_style}-style RMSNorm"
            )
    return _Plan(model_type, spec, fusions, streamed, attention, residual_layers, rope_attentions)


def _probe(weight: Tensor) -> Tensor:
    return (3 * torch.randn(4, weight.shape[-1], generator=torch.Generator().manual_seed(0))).to(weight)


def _computes_norm_style(norm: nn.Module, style: str) -> bool:
    """Run one norm of each class on a small input: the op must reproduce what it computes,
    whatever its name says (a kernelized forward, or a class whose numerics changed)."""
    x = _probe(norm.weight)
    with torch.no_grad():
        want = rmsnorm_ref(x, norm.weight, eps=norm_eps(norm), norm_style=style)
        try:
            got = norm(x)
        except Exception:
            return False
    return isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=2e-2, atol=1e-3)


def _mlp_activation(fusion: _Fusion) -> str | None:
    """The op's name for the activation with which this MLP computes down_proj(act(gate) * up), or None.

    The MLP's one other child must match an activation of the op bit for bit (erf GELU is close to
    GELU-tanh, but not the same function); the whole MLP, run on a small input, loosely, as a
    kernelized forward may round differently.
    """
    mlp = fusion.parent
    others = [m for name, m in mlp.named_children() if name not in fusion.projs and name != "down_proj"]
    weights = [local_shard(p.weight) for p in fusion.projs.values()]  # this rank's rows, under tensor parallelism
    gate_weight, up_weight = weights if len(weights) == 2 else weights[0].chunk(2)
    g, x = torch.linspace(-8, 8, 255).to(gate_weight), _probe(gate_weight)
    with torch.no_grad():
        try:
            name = next(n for n, act in ACTIVATIONS.items() if len(others) == 1 and torch.equal(others[0](g), act(g)))
            got = mlp(x)
            want = mlp.down_proj(ACTIVATIONS[name](F.linear(x, gate_weight)) * F.linear(x, up_weight))
        except Exception:  # no such activation (StopIteration), or an MLP of another shape
            return None
    ok = isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=2e-2, atol=1e-3)
    return name if ok else None


def _apply(fusion: _Fusion, spec: FamilySpec, fuse: tuple[str, ...]) -> None:
    k = KINDS[fusion.kind]
    layer, parent = fusion.layer, fusion.parent
    # The layer takes its residual before the norm, so the norm can pass its input through.
    norm = PassThroughNorm(fusion.norm).train(fusion.norm.training)
    setattr(layer, fusion.norm_name, norm)
    if not k.passthrough:  # the MLP: replaced whole, its children kept under their names
        parent = FusedMLP(parent)
        setattr(layer, k.parent, parent)
    extra = {"activation": fusion.activation} if fusion.activation else {}
    make = partial(k.module, norm, spec.norm_style, **extra)
    if k.packed in fusion.projs:
        packed = fusion.projs[k.packed]
        if k.passthrough:  # the attention still calls it, on the fused output
            packed = PackedPassThrough(packed).train(packed.training)
            setattr(parent, k.packed, packed)
        fused = make(packed=packed)
    else:
        fused = stack_into(parent, k.attr, make, fusion.projs, k.placeholder)
    fused.fuse = fuse
    setattr(parent, k.attr, fused.train(parent.training))
    if k.passthrough:
        # A hook runs before any instance forward accelerate put there, which then still runs.
        fused.hooks.append(parent.register_forward_pre_hook(feed_fused_qkv, with_kwargs=True))


def _unapply(parent: nn.Module, attr: str) -> None:
    fused = getattr(parent, attr)
    for hook in fused.hooks:
        hook.remove()
    if not fused.packed:
        unstack(parent, fused)
    delattr(parent, attr)


# What unpatch_model puts back by calling restored(); FusedMLP before the stand-ins it holds.
_STAND_INS = (FusedMLP, PassThroughNorm, LinearStandIn)


def _restore_classes(model: nn.Module) -> int:
    """Give the instances that fuse="residual" or fuse="rope" gave a subclass their own class back."""
    swapped = [m for m in model.modules() if isinstance(m, (ResidualFusedLayer, RopeCacheAttention))]
    for module in swapped:
        module.__class__ = module.stock_class
    return len(swapped)


def _restore_stand_ins(model: nn.Module, kind: type[nn.Module]) -> int:
    found = [(m, name) for m in model.modules() for name, child in m._modules.items() if isinstance(child, kind)]
    for parent, name in found:
        setattr(parent, name, getattr(parent, name).restored())
    return len(found)


def _check_fuse(fuse) -> tuple[str, ...]:
    if not isinstance(fuse, (tuple, list, set, frozenset)) or not fuse or not set(fuse) <= set(FUSIONS):
        raise ValueError(f"fuse must be a non-empty tuple drawn from {FUSIONS}, got {fuse!r}")
    if "residual" in fuse and not {"mlp", "gemv"} <= set(fuse):
        raise ValueError(f"fuse='residual' adds the residuals in the kernels of the mlp fusion's down_proj and of "
                         f"gemv's o_proj: fuse must include 'mlp' and 'gemv' too, got {fuse!r}")
    if "rope" in fuse and "qkv" not in fuse:
        raise ValueError(f"fuse='rope' rotates and caches the qkv fusion's output: fuse must include 'qkv' too, got {fuse!r}")
    return tuple(kind for kind in FUSIONS if kind in fuse)


_PATCH_MODULES = (FusedNorm, StreamingLinear)


def _patched_with(model: nn.Module) -> tuple[str, ...]:
    return next((m.fuse for m in model.modules() if isinstance(m, _PATCH_MODULES)), ("attention",))


def is_patched(model: nn.Module) -> bool:
    """Whether patch_model has put fused modules into ``model``."""
    return isinstance(model, nn.Module) and (
        uses_decode_attention(model) or any(isinstance(m, _PATCH_MODULES) for m in model.modules())
    )


def patch_model(model: nn.Module, *, verify: bool = False, fuse: tuple[str, ...] = DEFAULT_FUSE) -> nn.Module:
    """Fuse each decoder layer's RMSNorms into the projections they feed, in place.

    ``fuse`` picks the fusions, any of:
      - "qkv": the input RMSNorm and the q/k/v projections become one rmsnorm_qkv call.
      - "mlp": the MLP's input RMSNorm, gate and up projections and act(gate) * up become one
        rmsnorm_gate_up call. MLPs that are not gated dense ones of plain nn.Linear (MoE blocks,
        biases, other activations) are left as they are, logged.
      - "gemv": each attention's o_proj and dense MLP's down_proj become a StreamingLinear with
        the same Parameters: hf_fused.ops.streaming_linear, a weight-streaming GEMV at one token,
        cuBLAS for more. Projections that are not plain nn.Linear, tensor-parallel or hooked
        stay as they are, logged.
      - "attention": attention of up to 16 query tokens over the cache runs
        hf_fused.ops.decode_attention, chosen on this model's config under a new attention
        name; everything else (prefill, softcap, sliding window, ...) stays sdpa's.
        Only for a model that runs transformers' "sdpa" attention (patches/attention.py).
      - "residual" (with "mlp" and "gemv"): each decoder layer's two residual adds
        run in the epilogues of its o_proj and down_proj kernels. The layer instance gets a
        subclass of its class with that forward (the families whose layer adds plainly:
        llama, mistral, qwen2/3, gemma, smollm3, in layers whose MLP is fused); o_proj's
        module hands the attention's output on for the layer to project. state_dict keys,
        save_pretrained and torch.save(model) are unchanged.
      - "rope" (with "qkv"): a decode step's rotary embedding of q and k and its write of
        k and v into a static cache run in one kernel, hf_fused.ops.rope_cache_write; over other
        caches hf_fused.ops.rotary rotates and the cache writes. The attention instance gets a
        subclass of its class with that forward, for Llama's attention only
        (patches/rope_cache.py); prefills of over 16 tokens and training run the stock forward.
    The default is every fusion, each where it applies: the measured best in eager and
    static-cache ``generate`` and in the CUDA-graph loop (README, "Measured speed"). Under the
    default, one of the last three that can't apply to a model (rope to another family's
    attention, say) is logged at INFO; one asked for by name, at WARNING.

    Raises UnsupportedModelError, with the model untouched, for families or layers it can't
    patch exactly. A second call with the same ``fuse`` is a no-op; with another it raises
    ValueError (unpatch_model first). With ``verify=True`` it compares patched and stock logits
    on a short input, and unpatches and raises RuntimeError if they disagree.
    """
    fuse = _check_fuse(fuse)
    if is_patched(model):
        if _patched_with(model) != fuse:
            raise ValueError(f"model is patched with fuse={_patched_with(model)}; unpatch_model it before fuse={fuse}")
        return model
    plan = _plan(model, fuse)
    model_type, fusions = plan.model_type, plan.fusions
    deferred = {id(layer.self_attn) for layer in plan.residual_layers}
    try:
        # Streamed first: a FusedMLP takes over the MLP's down_proj as it is then.
        for parent, name in plan.streamed:
            stand_in = DeferredOProj if name == "o_proj" and id(parent) in deferred else StreamingLinear
            module = stand_in(getattr(parent, name)).train(parent.training)
            module.fuse = fuse
            setattr(parent, name, module)
        for fusion in fusions:
            _apply(fusion, plan.spec, fuse)
        for layer in plan.residual_layers:
            layer.__class__ = residual_fused_class(type(layer))
        for attn in plan.rope_attentions:
            attn.__class__ = rope_cache_class(type(attn))
        if plan.attention:
            use_decode_attention(model)
    except BaseException:
        unpatch_model(model)
        raise
    counts = [f"{kind} in {sum(f.kind == kind for f in fusions)} layers" for kind in KINDS if kind in fuse]
    counts = ", ".join(counts + ([f"gemv in {len(plan.streamed)} projections"] if "gemv" in fuse else [])
                       + ([f"residual adds in {len(plan.residual_layers)} layers"] if "residual" in fuse else [])
                       + ([f"rope and cache writes in {len(plan.rope_attentions)} layers"] if "rope" in fuse else [])
                       + (["decode attention"] if plan.attention else []))
    logger.info("hf_fused: fused %s of a %s model", counts, model_type)
    if verify:
        report = verify_patch(model, _probe_ids(model))
        if not report.ok:
            unpatch_model(model)
            raise RuntimeError(f"hf_fused: patched {model_type} model disagrees with the stock one: {report}")
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original modules, forwards and attention implementation back, in place; weights are bit-identical."""
    found = [(m, k.attr) for m in model.modules() for k in KINDS.values() if isinstance(m._modules.get(k.attr), FusedNorm)]
    for parent, attr in found:
        _unapply(parent, attr)
    restored = _restore_classes(model) + sum(_restore_stand_ins(model, kind) for kind in _STAND_INS)
    if found or restored:
        logger.info("hf_fused: unpatched %d fused modules and %d stand-ins", len(found), restored)
    restore_attention(model)
    return model


@dataclass
class VerifyReport:
    """Patched vs stock logits: max |diff|, relative L2 error, and argmax agreement per position."""

    max_abs_diff: float
    rel_err: float
    top1_agreement: float
    dtype: torch.dtype
    rtol: float

    @property
    def ok(self) -> bool:
        return self.rel_err <= self.rtol


def _probe_ids(model: nn.Module) -> Tensor:
    emb = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(0)
    # Low ids: multimodal placeholders (image tokens) sit at the end of the vocabulary.
    return torch.randint(min(emb.num_embeddings, 1000), (1, 16), generator=generator).to(emb.weight.device)


def _logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits if getattr(out, "logits", None) is not None else out[0]


def verify_patch(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None, *, rtol: float | None = None
) -> VerifyReport:
    """Run the patched model, then the stock one (unpatched for the call), and compare logits.

    The model is left patched, with the same weights and training flags as before.
    """
    if not is_patched(model):
        raise ValueError("verify_patch needs a model patched by hf_fused.patch_model")
    # By name: the unpatch/repatch cycle below puts new fused modules under the same names.
    modes = {name: m.training for name, m in model.named_modules()}
    fuse = _patched_with(model)
    model.eval()
    try:
        with torch.no_grad():
            fused = _logits(model, input_ids, attention_mask).float()
            unpatch_model(model)
            try:
                stock = _logits(model, input_ids, attention_mask).float()
            finally:
                patch_model(model, fuse=fuse)
    finally:
        for name, module in model.named_modules():
            module.training = modes.get(name, module.training)
    dtype = next(model.parameters()).dtype
    diff = (fused - stock).abs()
    return VerifyReport(
        max_abs_diff=diff.max().item(),
        rel_err=(torch.linalg.vector_norm(fused - stock) / torch.linalg.vector_norm(stock).clamp_min(1e-30)).item(),
        top1_agreement=(fused.argmax(-1) == stock.argmax(-1)).float().mean().item(),
        dtype=dtype,
        rtol=RTOL.get(dtype, 1e-3) if rtol is None else rtol,
    )
