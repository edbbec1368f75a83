"""fuse="rope": a decode step's rotary embedding, and its static-cache write, in one kernel.

The stock attention forward rotates q and k (apply_rotary_pos_emb), then its cache layer writes
k and v (StaticLayer.update: two index_copy_), then it calls its attention function. Compiled,
that is four small Inductor kernels a layer (docs/profile_decode.md); eager, over transformers'
dynamic cache, apply_rotary_pos_emb alone is a dozen eager calls. Here the attention instance
gets a subclass of its class (one per class, as for fuse="residual") whose forward does the same
on the fused q/k/v output that the qkv fusion's pre-hook hands it: over an initialized
StaticLayer, hf_fused.ops.rope_cache_write rotates and writes in one kernel; over any other
cache (or none), hf_fused.ops.rotary rotates and the cache's own update writes. Then it calls
the attention function that the stock forward would call, with the same arguments.

Only where that forward is known line for line: ROPE_CACHE_ATTENTIONS, Llama's attention (q, k,
v heads from one projection each, full-width rotary, no q/k norm, no sliding window). Prefill
(more than MAX_QUERY tokens), training, and dtypes or devices without the kernel run the stock
forward unchanged.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
from torch import Tensor, nn
from transformers.cache_utils import StaticLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_fused.ops import kernel_runs, rope_cache_write, rotary

# The attention classes whose forward RopeCacheAttention.forward computes, as module.qualname.
ROPE_CACHE_ATTENTIONS = frozenset({"transformers.models.llama.modeling_llama.LlamaAttention"})
MAX_QUERY = 16  # tokens of a decode step (or a few speculative ones); more is prefill
_CACHE_ARGS = ("cache", "past_key_values")  # the cache argument's name in transformers >= 5.24, and before


def _static_layer(cache, layer_idx: int) -> StaticLayer | None:
    """This layer's static cache layer, if the step can write it directly, else None."""
    layers = getattr(cache, "layers", None)
    if layers is None or not isinstance(layer_idx, int) or not 0 <= layer_idx < len(layers):
        return None
    layer = layers[layer_idx]
    # Exactly StaticLayer: its subclasses (sliding windows, offloading) write otherwise.
    return layer if type(layer) is StaticLayer and layer.is_initialized else None


class RopeCacheAttention(nn.Module):
    """The forward of an attention whose decode steps rotate (and cache, if static) in one kernel.

    Never used alone: rope_cache_class puts it before a class of ROPE_CACHE_ATTENTIONS, whose
    forward is: q, k, v = views of the projections; q, k = apply_rotary_pos_emb(q, k, cos, sin);
    k, v = cache.update(k, v, layer_idx); out = attention_function(self, q, k, v, mask,
    dropout=..., scaling=self.scaling, **kwargs); o_proj(out). Its q_proj/k_proj/v_proj are the
    qkv fusion's slices, so hidden_states here is the fused q/k/v output.
    """

    stock_class: type[nn.Module]
    # Whether the stock forward hands its **kwargs on to cache.update (transformers >= 5.24,
    # which also renamed past_key_values to cache), so that this forward does the same.
    update_gets_kwargs: bool

    def forward(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor] | None = None,
                attention_mask: Tensor | None = None, *args, **kwargs) -> tuple[Tensor, Tensor | None]:
        cache = None
        for name in _CACHE_ARGS:
            if kwargs.get(name) is not None:
                cache = kwargs[name]
        if (args or position_embeddings is None or self.training or hidden_states.dim() != 3
                or hidden_states.shape[1] > MAX_QUERY or not kernel_runs(hidden_states)
                or (torch.is_grad_enabled() and hidden_states.requires_grad)
                or position_embeddings[0].dtype != hidden_states.dtype):
            return super().forward(hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        batch, tokens, _ = hidden_states.shape
        cos, sin = position_embeddings
        heads = dict(num_heads=self.config.num_attention_heads, num_kv_heads=self.config.num_key_value_heads)
        rest = {k: v for k, v in kwargs.items() if k not in _CACHE_ARGS}
        layer = None if cache is None else _static_layer(cache, self.layer_idx)
        if layer is not None and layer.keys.dtype == hidden_states.dtype:
            query = rope_cache_write(hidden_states, cos, sin, layer.keys, layer.values, layer.cumulative_length, **heads)
            layer.cumulative_length.add_(tokens)  # as StaticLayer.update advances it
            keys, values = layer.keys, layer.values
        else:
            query, keys = rotary(hidden_states, cos, sin, **heads)
            kv_heads, head_dim = heads["num_kv_heads"], keys.shape[-1]
            values = hidden_states[..., -kv_heads * head_dim :].view(batch, tokens, kv_heads, head_dim).transpose(1, 2)
            keys = keys.transpose(1, 2)
            if cache is not None:
                extra = {"kwargs": rest} if self.update_gets_kwargs else {}
                keys, values = cache.update(keys, values, self.layer_idx, **extra)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, sys.modules[self.stock_class.__module__].eager_attention_forward
        )
        out, weights = attention(self, query.transpose(1, 2), keys, values, attention_mask,
                                 dropout=0.0, scaling=self.scaling, **rest)
        return self.o_proj(out.reshape(batch, tokens, -1).contiguous()), weights

    def __reduce_ex__(self, protocol):
        # Pickle can't name a class made at patch time; it rebuilds it from the stock class.
        _, _, *rest = super().__reduce_ex__(protocol)
        return _new_rope_cache_attention, (self.stock_class,), *rest


def _new_rope_cache_attention(stock: type[nn.Module]) -> nn.Module:
    """An empty instance of rope_cache_class(stock), for unpickling and copying to fill in."""
    return object.__new__(rope_cache_class(stock))


@functools.cache
def rope_cache_class(stock: type[nn.Module]) -> type[nn.Module]:
    """The subclass that patch_model gives an attention instance for fuse="rope" (unpatch_model
    gives it ``stock`` back): one per class, so compiled code sees one class for all layers."""
    update_gets_kwargs = "cache" in inspect.signature(stock.forward).parameters
    return type(f"RopeCache{stock.__name__}", (RopeCacheAttention, stock),
                dict(stock_class=stock, update_gets_kwargs=update_gets_kwargs, __module__=__name__))


def rope_cache_problem(attn: nn.Module, qkv_rows: int) -> str | None:
    """Why this attention's decode steps can't take rope_cache_write, or None if they can;
    ``qkv_rows`` is the height of its fused q/k/v weight on this rank."""
    cls = type(attn)
    if f"{cls.__module__}.{cls.__qualname__}" not in ROPE_CACHE_ATTENTIONS:
        return f"rope: {cls.__name__}'s forward is not one that hf_fused computes (only {', '.join(sorted(ROPE_CACHE_ATTENTIONS))})"
    if "forward" in attn.__dict__:
        return "rope: the attention has an instance forward"
    config = getattr(attn, "config", None)
    heads = (getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None),
             getattr(attn, "head_dim", None))
    if not all(isinstance(n, int) for n in heads):
        return "rope: the attention has no int num_attention_heads, num_key_value_heads and head_dim"
    num_heads, num_kv_heads, head_dim = heads
    if head_dim % 2 or qkv_rows != (num_heads + 2 * num_kv_heads) * head_dim:
        return (f"rope: the fused q/k/v weight has {qkv_rows} rows, not the config's {num_heads} + 2 x {num_kv_heads} "
                f"heads of an even size {head_dim} (tensor parallel shards, or another layout)")
    return None
