"""patch_model / unpatch_model / verify_patch: the public entry points.

Instances are patched, never classes, so one patched model leaves every other one alone, and
unpatching restores the original module objects with bit-identical weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from hf_fused.patches.fused import (
    QKV_NAMES,
    FusedRMSNormQKV,
    QKVSlice,
    fused_attention_forward,
    identity_forward,
    load_state_dict_pre_hook,
    norm_eps,
    stack_rows,
    state_dict_post_hook,
)
from hf_fused.patches.specs import SPECS, FamilySpec

logger = logging.getLogger("hf_fused")

# Relative L2 error of the logits that verify_patch accepts. On CPU the op is bit-identical;
# on GPU only the matmul's summation order differs, so these are a few ulps of each dtype
# grown over the depth of a model.
RTOL = {torch.float32: 1e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class UnsupportedModelError(ValueError):
    """The model can't be patched; it was left untouched."""


@dataclass
class _Layer:
    attn: nn.Module
    norm: nn.Module
    projs: dict[str, nn.Linear]


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


def _check_layer(attn: nn.Module, norm: nn.Module, spec: FamilySpec, where: str) -> _Layer:
    weight = getattr(norm, "weight", None)
    if not (isinstance(weight, nn.Parameter) and weight.dim() == 1):
        raise UnsupportedModelError(f"{where}.input_layernorm is {type(norm).__name__}, not an RMSNorm with a weight")
    if norm_eps(norm) is None:
        raise UnsupportedModelError(f"{where}.input_layernorm has no float eps/variance_epsilon")
    names = QKV_NAMES if spec.qkv == "separate" else ("qkv_proj",)
    projs = {name: getattr(attn, name, None) for name in names}
    for name, proj in projs.items():
        # Exactly nn.Linear: quantized layers and PEFT/LoRA wrappers compute something else.
        if type(proj) is not nn.Linear:
            raise UnsupportedModelError(f"{where}.self_attn.{name} is {type(proj).__name__}, not a plain nn.Linear")
        if proj.in_features != weight.shape[0]:
            raise UnsupportedModelError(f"{where}.self_attn.{name} does not take the norm's {weight.shape[0]} features")
    tensors = [weight] + [t for p in projs.values() for t in (p.weight, p.bias) if t is not None]
    if any(t.is_meta for t in tensors):
        raise UnsupportedModelError(f"{where} has weights on the meta device (offloaded or not loaded yet)")
    if len({(t.dtype, t.device) for t in tensors}) > 1:
        raise UnsupportedModelError(f"{where}: input norm and q/k/v weights differ in dtype or device")
    if len({p.bias is None for p in projs.values()}) > 1:
        raise UnsupportedModelError(f"{where}: some of q/k/v have a bias and some don't")
    return _Layer(attn, norm, projs)


def _plan(model: nn.Module) -> tuple[str, FamilySpec, list[_Layer]]:
    """Find and check every decoder layer before anything is touched."""
    model_type, spec = _family(model)
    layers, seen = [], set()
    for where, layer in model.named_modules():
        attn, norm = getattr(layer, "self_attn", None), getattr(layer, "input_layernorm", None)
        if attn is None or norm is None:
            continue
        if id(attn) in seen or id(norm) in seen:
            raise UnsupportedModelError(f"{where} shares its attention or input norm with another layer")
        seen.update((id(attn), id(norm)))
        layers.append(_check_layer(attn, norm, spec, where))
    if not layers:
        raise UnsupportedModelError(f"no decoder layer with input_layernorm and self_attn found in {model_type} model")
    for norm in {type(layer.norm): layer.norm for layer in layers}.values():
        if not _computes_norm_style(norm, spec.norm_style):
            raise UnsupportedModelError(
                f"{type(norm).__name__} in this {model_type} model does not compute a {spec.norm_style}-style RMSNorm"
            )
    return model_type, spec, layers


def _computes_norm_style(norm: nn.Module, style: str) -> bool:
    """Run one norm of each class on a small input: the op must reproduce what it computes,
    whatever its name says (a kernelized forward, or a class whose numerics changed)."""
    weight = norm.weight
    x = (3 * torch.randn(4, weight.shape[0], generator=torch.Generator().manual_seed(0))).to(weight)
    x32 = x.float()
    with torch.no_grad():
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm_eps(norm))
        want = (normed * (1 + weight.float())).to(x.dtype) if style == "gemma" else weight * normed.to(x.dtype)
        try:
            got = norm(x)
        except Exception:
            return False
    return isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(got, want, rtol=2e-2, atol=1e-3)


def _patch_layer(layer: _Layer, spec: FamilySpec) -> None:
    attn, norm = layer.attn, layer.norm
    if spec.qkv == "packed":
        (proj,) = layer.projs.values()
        fused = FusedRMSNormQKV(norm, spec.norm_style, packed=proj)
        fused.packed_forward = proj.__dict__.get("forward")
        proj.forward = partial(identity_forward, proj)
    else:
        key_order = list(attn.state_dict(keep_vars=True))
        projs = list(layer.projs.values())
        with torch.no_grad():
            weight = stack_rows([p.weight for p in projs]).requires_grad_(projs[0].weight.requires_grad)
            bias = None if projs[0].bias is None else stack_rows([p.bias for p in projs])
        if bias is not None:
            bias.requires_grad_(projs[0].bias.requires_grad)
        fused = FusedRMSNormQKV(norm, spec.norm_style, weight, bias)
        bounds, start = {}, 0
        for name, proj in layer.projs.items():
            bounds[name] = (start, start + proj.out_features)
            start += proj.out_features
            # Drop the originals' storage (the fused weight has it now); unpatch points them back
            # at rows of whatever the fused weight is then, e.g. after model.to(float16).
            for p in (proj.weight, proj.bias):
                if p is not None:
                    p.data = p.data.new_empty(0)
            setattr(attn, name, QKVSlice(*bounds[name]).train(attn.training))
        fused.bounds, fused.key_order, fused.originals = bounds, key_order, layer.projs
        fused.hooks = [
            attn.register_state_dict_post_hook(state_dict_post_hook),
            attn.register_load_state_dict_pre_hook(load_state_dict_pre_hook),
        ]
    # Instance forwards that were already there (accelerate hooks) are wrapped and restored.
    fused.inner_forward, fused.norm_forward = attn.__dict__.get("forward"), norm.__dict__.get("forward")
    attn.qkv_fused = fused.train(attn.training)
    attn.forward = partial(fused_attention_forward, attn)
    # The layer takes its residual before the norm, so the norm can pass its input through.
    norm.forward = partial(identity_forward, norm)


def _restore_forward(module: nn.Module, saved) -> None:
    module.__dict__.pop("forward", None)
    if saved is not None:
        module.forward = saved


def _unpatch_attention(attn: nn.Module) -> None:
    fused = attn.qkv_fused
    if fused.packed is not None:
        _restore_forward(fused.packed, fused.packed_forward)
    else:
        for hook in fused.hooks:
            hook.remove()
        weight = fused.weight.detach()
        bias = None if fused.bias is None else fused.bias.detach()
        for name, proj in fused.originals.items():
            start, stop = fused.bounds[name]
            # Row views of the current fused weight: no copy, and right after any .to().
            proj.weight.data = weight[start:stop]
            proj.weight.requires_grad_(fused.weight.requires_grad)
            if bias is not None:
                proj.bias.data = bias[start:stop]
                proj.bias.requires_grad_(fused.bias.requires_grad)
            setattr(attn, name, proj)
    _restore_forward(attn, fused.inner_forward)
    _restore_forward(fused.norm, fused.norm_forward)
    del attn.qkv_fused


def is_patched(model: nn.Module) -> bool:
    """Whether patch_model has put fused modules into ``model``."""
    return isinstance(model, nn.Module) and any(isinstance(m, FusedRMSNormQKV) for m in model.modules())


def patch_model(model: nn.Module, *, verify: bool = False) -> nn.Module:
    """Fuse each decoder layer's input RMSNorm into its q/k/v projection, in place.

    Raises UnsupportedModelError, with the model untouched, for families or layers it can't
    patch exactly. A second call is a no-op. With ``verify=True`` it compares patched and
    stock logits on a short input, and unpatches and raises RuntimeError if they disagree.
    """
    if is_patched(model):
        return model
    model_type, spec, layers = _plan(model)
    try:
        for layer in layers:
            _patch_layer(layer, spec)
    except BaseException:
        unpatch_model(model)
        raise
    logger.info("hf_fused: fused RMSNorm+QKV in %d %s layers", len(layers), model_type)
    if verify:
        report = verify_patch(model, _probe_ids(model))
        if not report.ok:
            unpatch_model(model)
            raise RuntimeError(f"hf_fused: patched {model_type} model disagrees with the stock one: {report}")
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Put the original modules and forwards back, in place; weights are bit-identical."""
    attns = [m for m in model.modules() if isinstance(getattr(m, "qkv_fused", None), FusedRMSNormQKV)]
    for attn in attns:
        _unpatch_attention(attn)
    if attns:
        logger.info("hf_fused: unpatched %d layers", len(attns))
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
    model.eval()
    try:
        with torch.no_grad():
            fused = _logits(model, input_ids, attention_mask).float()
            unpatch_model(model)
            try:
                stock = _logits(model, input_ids, attention_mask).float()
            finally:
                patch_model(model)
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
