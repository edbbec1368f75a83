"""fuse="attention": a model's decode attention over the static cache runs decode_attention.

transformers picks each attention module's function by name, config._attn_implementation, in
its AttentionInterface, and builds masks by the same name in its AttentionMaskInterface. This
adds one new name, ATTENTION_NAME, to both: no existing name is replaced, and nothing changes
for a model until patch_model sets that name on the configs its attention modules read. The
choice is then that model's (as with set_attn_implementation, models built on one config object
share it); unpatch_model puts the previous name back.

Under the new name masks are built by sdpa's mask function, and the attention function runs
the decode kernel only where it computes what sdpa computes on the same inputs: at most
MAX_QUERY query tokens, a boolean mask (or none, for one token in compiled code), no softcap,
sliding window, sinks, dropout, position bias or output_attentions. Every other call, prefill
included, goes to transformers' sdpa function unchanged, logged once per reason.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_fused.ops import kernel_runs
from hf_fused.ops.decode_attention import MAX_HEAD_DIM, MAX_QUERY, MAX_ROWS, decode_attention

logger = logging.getLogger("hf_fused")

ATTENTION_NAME = "hf_fused_decode"
BASE = "sdpa"  # the implementation it stands in for, and hands the rest to
_STATE = "_hf_fused_attention"  # on the model: [(config, its previous implementation)]
_logged: set[str] = set()


def _delegated(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, dropout: float, kwargs: dict) -> str | None:
    """Why this call can't run the decode kernel exactly, or should not, or None if it can.
    Decided on shapes, dtypes and arguments only (and whether the call is traced), so that a
    compiled step makes the same choice every call."""
    (B, Hq, M, D), (Hkv, S) = query.shape, key.shape[1:3]
    if M > MAX_QUERY:
        return f"more than {MAX_QUERY} query tokens (prefill)"
    for name in ("softcap", "sliding_window", "s_aux", "sinks", "position_bias"):
        if kwargs.get(name) is not None:
            return f"{name} is set"
    if dropout or kwargs.get("output_attentions"):
        return "dropout or output_attentions"
    if mask is None and M > 1:
        return "several query tokens and no mask (sdpa's is_causal)"
    if mask is None and not torch.compiler.is_compiling():
        # Transformers' dynamic cache: its keys grow every step, so each eager call would resolve
        # the kernels' launch anew, which costs more host time than sdpa's call (eager decoding is
        # bound by host time). Static caches come with a mask, and compiled steps launch from a graph.
        return "eager decoding with no mask (a dynamic cache, whose length changes every step)"
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[2:] != (M, S)
                             or mask.shape[0] not in (1, B) or mask.shape[1] not in (1, Hq)):
        return "a mask that is not a (B, 1, M, S) boolean one"
    if key.shape != value.shape or Hq % Hkv or (Hq // Hkv) * M > MAX_ROWS or D > MAX_HEAD_DIM:
        return f"shapes the kernel does not take (over {MAX_ROWS} query rows per kv head, or D over {MAX_HEAD_DIM})"
    if not kernel_runs(query) or min(t.stride(-1) for t in (query, key, value)) != 1:
        return f"no kernel for {query.dtype} on {query.device.type}, or a strided head dimension"
    return None


def decode_attention_forward(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
    dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function interface, as sdpa_attention_forward's."""
    reason = _delegated(query, key, value, attention_mask, dropout, kwargs)
    if reason is None:
        scaling = query.shape[-1] ** -0.5 if scaling is None else scaling  # F.scaled_dot_product_attention's default
        return decode_attention(query, key, value, attention_mask, scaling=scaling), None
    # Not while tracing: the reason was logged by the eager calls before, and a log call would break the graph.
    if reason not in _logged and not torch.compiler.is_compiling():
        _logged.add(reason)
        logger.info("hf_fused: attention calls with %s run transformers' %s attention", reason, BASE)
    return ALL_ATTENTION_FUNCTIONS[BASE](
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def _base_mask(*args, **kwargs):
    """Masks exactly as for sdpa, looked up at call time."""
    return ALL_MASK_ATTENTION_FUNCTIONS[BASE](*args, **kwargs)


def _register() -> None:
    """Add ATTENTION_NAME to transformers' two interfaces, once; never replace a name."""
    for interface, table, fn in ((AttentionInterface, ALL_ATTENTION_FUNCTIONS, decode_attention_forward),
                                 (AttentionMaskInterface, ALL_MASK_ATTENTION_FUNCTIONS, _base_mask)):
        current = table.get(ATTENTION_NAME)
        if current is None:
            interface.register(ATTENTION_NAME, fn)
        elif current is not fn:
            raise RuntimeError(f"{ATTENTION_NAME!r} is already registered in transformers' {interface.__name__} "
                               f"by something else ({current!r}); hf_fused will not replace it")


def _configs(model: nn.Module) -> list:
    """The configs that the decoder layers' attention modules read, each once."""
    attns = [m.self_attn for m in model.modules() if getattr(m, "self_attn", None) is not None]
    return list({id(c): c for c in (getattr(a, "config", None) for a in attns)}.values())


def attention_problem(model: nn.Module) -> str | None:
    """Why fuse="attention" can't apply to this model, or None if it can."""
    configs = _configs(model)
    if not configs or None in configs:
        return "its attention modules have no config to choose their attention function by"
    impls = {getattr(c, "_attn_implementation", None) for c in configs}
    if impls != {BASE}:
        return f"its attention runs {', '.join(map(repr, sorted(map(str, impls))))}; the decode kernel stands in for {BASE!r} only"
    return None


def use_decode_attention(model: nn.Module) -> None:
    """Point the model's attention configs at ATTENTION_NAME (attention_problem must be None)."""
    _register()
    saved = [(config, config._attn_implementation) for config in _configs(model)]
    for config, _ in saved:
        config._attn_implementation = {"": ATTENTION_NAME}  # a dict sets this config only, not its sub-configs
    model.__dict__[_STATE] = saved


def uses_decode_attention(model: nn.Module) -> bool:
    return _STATE in model.__dict__


def restore_attention(model: nn.Module) -> None:
    """Put back each config's previous implementation, unless someone has chosen another since."""
    for config, previous in model.__dict__.pop(_STATE, []):
        if config._attn_implementation == ATTENTION_NAME:
            config._attn_implementation = {"": previous}
