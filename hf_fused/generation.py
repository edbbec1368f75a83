"""A gpt-fast-style decode loop around any Hugging Face causal LM: greedy, or sampled.

transformers' ``generate`` pays Python overhead per token (logits processors, stopping criteria,
input preparation) and compiles its decode step with ``fullgraph=False``. At batch 1 that
overhead is a large share of a step. This loop does what gpt-fast does instead:

- a ``StaticCache``, so every decode step has the same shapes and tensor addresses;
- the prefill runs eagerly, once;
- the decode step (forward + argmax, or forward + sampling) is
  ``torch.compile(mode="reduce-overhead", fullgraph=True)``, so each token is one CUDA-graph replay.

Sampling takes transformers' ``do_sample``, ``temperature``, ``top_k`` and ``top_p`` and draws on the
device inside that replay (``hf_fused.sampling`` says how). It only calls the model's forward, so it
runs a patched and an unpatched model alike. It is a helper, not a framework: no beams, no
repetition penalties or other logits processors.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import StaticCache

from hf_fused.sampling import SamplingParams, check_sampling_args, sample

logger = logging.getLogger(__name__)


@dataclass
class _State:
    """What one model keeps between calls, so repeated calls neither re-allocate nor recompile."""

    cache: StaticCache | None = None
    cache_key: tuple[Any, ...] = ()
    cache_len: int = 0
    sampling: SamplingParams | None = None
    # Keyed by (compiled, filters): filters is None for greedy, else SamplingParams.filters, the
    # top-k candidate count (0: no top-k) and whether top-p runs.
    steps: dict[tuple[bool, tuple[int, bool] | None], Callable[..., Tensor]] = field(default_factory=dict)


# The state lives on the model, not in a global table: its compiled step refers to the model, so
# a global (even weak-keyed) table would keep every model alive; an attribute makes a cycle that
# the garbage collector frees with the model.
_STATE_ATTR = "_hf_fused_generation_state"


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model: nn.Module) -> str:
    # transformers 5.24 renamed the forward argument past_key_values to cache (the old name
    # still works there, with a deprecation shim); 5.17 only knows past_key_values.
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _get_cache(model: nn.Module, state: _State, batch: int, max_len: int, dtype: torch.dtype) -> StaticCache:
    key = (batch, dtype, next(model.parameters()).device)
    # Reusing the cache keeps its tensor addresses, which the CUDA graphs recorded; a larger cache
    # than needed is fine because the attention mask hides the unused tail.
    if state.cache is not None and state.cache_key == key and state.cache_len >= max_len:
        state.cache.reset()
        return state.cache
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    state.cache = StaticCache(config=config, max_cache_len=max_len)
    state.cache_key, state.cache_len = key, max_len
    return state.cache


def _get_sampling(
    state: _State, device: torch.device, temperature: float, top_k: int | None, top_p: float,
    generator: torch.Generator | None, seed: int | None,
) -> SamplingParams:
    # One SamplingParams per model, updated in place: its tensors keep the addresses the CUDA
    # graphs recorded (like the cache's).
    if state.sampling is None or state.sampling.key.device != device:
        state.sampling = SamplingParams.allocate(device)
    if generator is None:
        generator = torch.Generator(device=device)
        if seed is None:
            generator.seed()  # nondeterministic, as transformers' sampling is without a seed
        else:
            generator.manual_seed(seed)
    state.sampling.set(temperature, top_k, top_p, generator)
    return state.sampling


ARGMAX_CHUNKS = 128


def argmax(logits: Tensor) -> Tensor:
    """``logits.argmax(-1)`` of ``(B, V)`` logits: torch's in eager code, two passes when traced.

    Inductor reduces an argmax in one program per row: over a 128k vocabulary that took 30 µs of
    an 8B decode step on an H200 (docs/profile_decode.md). Eager torch.argmax is already a
    parallel reduction, and one call costs less host time than the two passes.
    """
    return _two_pass_argmax(logits) if torch.compiler.is_compiling() else logits.argmax(dim=-1)


def _two_pass_argmax(logits: Tensor) -> Tensor:
    """The first index of each row's maximum: each of ARGMAX_CHUNKS chunks' maximum and its
    first index in parallel, then the first chunk holding the overall maximum."""
    batch, vocab = logits.shape
    chunk = -(-vocab // ARGMAX_CHUNKS)
    padded = torch.nn.functional.pad(logits, (0, chunk * ARGMAX_CHUNKS - vocab), value=float("-inf"))
    chunk_max, chunk_arg = padded.view(batch, ARGMAX_CHUNKS, chunk).max(dim=-1)
    best = chunk_max.argmax(dim=-1, keepdim=True)
    return (best * chunk + chunk_arg.gather(1, best)).squeeze(1)


def _next_token(logits: Tensor, position: Tensor, sampling: SamplingParams | None) -> Tensor:
    """``(B,)`` next tokens from the last position's ``(B, V)`` logits: argmax, or a sample."""
    return argmax(logits) if sampling is None else sample(logits, position, sampling)


def _make_step(model: nn.Module, state: _State, compiled: bool) -> Callable[..., Tensor]:
    cache_kw = _cache_kwarg(model)

    def step(
        tokens: Tensor, position_ids: Tensor, attention_mask: Tensor | None, sampling: SamplingParams | None
    ) -> Tensor:
        out = model(
            input_ids=tokens,
            position_ids=position_ids,
            attention_mask=attention_mask,
            use_cache=True,
            **{cache_kw: state.cache},
        )
        # Sampling happens here, inside the compiled graph: no host round trip per token.
        return _next_token(out.logits[:, -1], position_ids, sampling)

    if not compiled:
        return step
    on_cuda = next(model.parameters()).device.type == "cuda"
    # reduce-overhead = CUDA graphs; off CUDA there are no graphs to capture. dynamic=False: a new
    # batch size or cache length gets its own specialized graph rather than a slower symbolic one.
    return torch.compile(step, mode="reduce-overhead" if on_cuda else "default", fullgraph=True, dynamic=False)


def reset(model: nn.Module) -> None:
    """Drop the cache and compiled decode step kept for ``model`` (e.g. after patching it)."""
    model.__dict__.pop(_STATE_ATTR, None)


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    compile: bool | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    streamer: Any | None = None,
    callback: Callable[[Tensor], None] | None = None,
) -> Tensor:
    """Greedy or sampled decoding with a static cache and a compiled decode step.

    Args:
        model: a causal LM (``AutoModelForCausalLM``), patched or not.
        input_ids: ``(B, S)`` prompt token ids on the model's device.
        max_new_tokens: how many tokens to generate per sequence.
        attention_mask: ``(B, S)``, 1 for real tokens; needed only for left-padded batches.
        compile: compile the decode step; ``None`` means on CUDA only, where CUDA graphs make it pay.
        eos_token_id: stop a sequence at this token (or any of these); ``None`` always runs
            ``max_new_tokens`` steps and never synchronizes with the host, the fastest.
        pad_token_id: written after a sequence's EOS; defaults to the first EOS id.
        do_sample: sample instead of taking the argmax (greedy, the default). The sampling
            arguments below mean what they mean in transformers' ``generate`` and, like there,
            are ignored when ``do_sample`` is False.
        temperature: divides the logits before sampling; must be > 0.
        top_k: keep the ``top_k`` most likely tokens (ties with the last stay); 0 or ``None``
            keeps all. Unlike transformers' ``generate``, whose default is 50, there is no default cut.
        top_p: keep the smallest set of most likely tokens whose probability sums to at least
            ``top_p``, in (0, 1]; 1 keeps all. Applied after temperature and top-k, in that order.
        generator: the randomness; one key is drawn from it per call, so the same generator state
            gives the same tokens.
        seed: instead of ``generator``: a new generator on the model's device seeded with it.
            With neither, every call draws differently.
        streamer: a transformers streamer (e.g. ``TextStreamer``), fed like ``generate`` feeds it.
        callback: called with each step's ``(B,)`` new tokens.

    Returns:
        ``(B, S + max_new_tokens)`` ids, prompt first, as transformers' ``generate`` returns them
        (fewer columns if every sequence hit EOS early).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    check_sampling_args(do_sample, temperature, top_k, top_p, generator, seed)
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    batch, prompt_len = input_ids.shape
    compiled = device.type == "cuda" if compile is None else compile
    if compiled and any(hasattr(m, "_hf_hook") for m in model.modules()):
        # accelerate wraps its hooks in torch.compiler.disable: a fullgraph compile cannot trace them.
        raise ValueError("the decode step can't be compiled over accelerate's hooks (a device_map or offloaded "
                         "model); pass compile=False")
    eos = None if eos_token_id is None else torch.tensor(eos_token_id, device=device).view(-1)
    if eos is not None and pad_token_id is None:
        pad_token_id = int(eos[0])

    state = model.__dict__.setdefault(_STATE_ATTR, _State())
    dtype = next(model.parameters()).dtype
    cache = _get_cache(model, state, batch, prompt_len + max_new_tokens, dtype)
    if compiled and any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        # transformers keeps a sliding-window layer's length in a Python int and branches on it,
        # so a fullgraph compile would recompile at every step until its limit, then fail.
        raise ValueError("the decode step can't be compiled over a static cache with sliding-window layers "
                         "(transformers tracks their length in a Python int, which every step changes); pass "
                         "compile=False, or decode with transformers' generate(cache_implementation='static')")
    sampling = _get_sampling(state, device, temperature, top_k, top_p, generator, seed) if do_sample else None
    # Each kind of step is its own compiled function: greedy stays the plain argmax graph, and
    # a graph with the top-k/top-p filtering runs only when they are asked for.
    step_key = (compiled, None if sampling is None else sampling.filters)
    if step_key not in state.steps:
        state.steps[step_key] = _make_step(model, state, compiled)
    step = state.steps[step_key]

    # A mask of fixed width (the whole cache) keeps decode shapes static; it is needed only when
    # some prompt is left-padded, otherwise the causal mask alone is exact and cheaper.
    mask = None
    if attention_mask is not None and not bool(attention_mask.all()):
        mask = torch.ones(batch, state.cache_len, dtype=attention_mask.dtype, device=device)
        mask[:, :prompt_len] = attention_mask.to(device)
        positions = (attention_mask.to(device).long().cumsum(-1) - 1).clamp_min(0)
    else:
        positions = torch.arange(prompt_len, device=device).expand(batch, prompt_len)

    if streamer is not None:
        streamer.put(input_ids.cpu())
    prefill_kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(
        input_ids=input_ids,
        position_ids=positions,
        attention_mask=None if mask is None else mask[:, :prompt_len],
        use_cache=True,
        **{_cache_kwarg(model): cache},
        **prefill_kwargs,
    )
    position = positions[:, -1:].clone()
    # The first token is picked the same way, eagerly, from the prefill's logits.
    token = _next_token(out.logits[:, -1], position, sampling)
    del out
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    new_tokens: list[Tensor] = []

    for i in range(max_new_tokens):
        if eos is not None:
            token = torch.where(finished, torch.full_like(token, pad_token_id), token)
            finished |= torch.isin(token, eos)
        new_tokens.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
        if callback is not None:
            callback(token)
        if i == max_new_tokens - 1 or (eos is not None and bool(finished.all())):
            break
        position += 1
        if compiled:
            # Tells the CUDA-graph runtime that the previous step's outputs are no longer read,
            # so the next replay may overwrite them; the clone keeps the token we still need.
            torch.compiler.cudagraph_mark_step_begin()
            token = step(token.view(batch, 1), position, mask, sampling).clone()
        else:
            token = step(token.view(batch, 1), position, mask, sampling)

    if streamer is not None:
        streamer.end()
    return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
