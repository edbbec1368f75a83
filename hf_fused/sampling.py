"""Sampling for the decode loop: transformers' temperature, top-k and top-p, drawn on the device.

The filters are transformers' own (``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper``), applied in its order to the fp32 logits:

    scores = logits / temperature
    top-k:  drop every score below the k-th largest (ties with it stay)
    top-p:  sort ascending; drop the tokens whose cumulative probability is <= 1 - top_p, so the
            smallest set holding >= top_p of the mass stays, and the most likely token always does

The token is then drawn from softmax(scores) by the Gumbel-max trick: argmax(scores + G) with
G = -log(-log U) for U uniform on (0, 1) picks token i with probability softmax(scores)_i. It needs
no normalization, never picks a dropped (-inf) score, and ends in an argmax on the device:
``torch.multinomial`` would check its input on the host, a synchronization per token.

Why the uniform noise comes from Philox written in tensor ops rather than from a torch.Generator:
the decode step is compiled with ``fullgraph=True``, and dynamo cannot trace a ``torch.Generator``
argument: in torch 2.13 ``exponential_(generator=g)`` and ``multinomial(..., generator=g)`` both
stop with "Failed to convert args/kwargs to proxy". The global RNG would trace, but then the
caller's generator or seed would be ignored and the tokens would depend on global state. So the
noise is Philox4x32-10 (the counter-based generator behind torch's CUDA RNG and Triton's
``tl.rand``) as a pure function of a key and a counter:

    key     = 64 bits drawn from the caller's generator once per ``generate`` call
    counter = (token id, batch row, position of the token fed in, 0)

The state is explicit: nothing advances between steps, the position input (which the loop
increments anyway) makes every step's noise new, so the step stays one CUDA-graph replay. The
integer ops give the same bits on CPU and CUDA, eager or compiled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # multipliers of Salmon et al., SC'11, as in Random123
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)  # golden ratio and sqrt(3) - 1, the key's bump per round


def check_sampling_args(
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None,
    seed: int | None,
) -> None:
    """Raise ValueError, naming the argument, for values transformers' warpers would refuse."""
    if generator is not None and seed is not None:
        raise ValueError("give generator or seed, not both (seed builds a generator on the model's device)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise ValueError(f"top_k must be an int >= 0 (0 or None: no top-k), got {top_k!r}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1: no top-p), got {top_p!r}")
    # Only checked when sampling: with do_sample=False transformers ignores temperature, and
    # temperature=0 is a common way of asking for greedy decoding.
    if do_sample and not temperature > 0.0:
        raise ValueError(f"temperature must be > 0 when do_sample=True, got {temperature!r}")


@dataclass
class SamplingParams:
    """The sampling settings as device tensors, read by the decode step.

    As tensors, new values need no recompile; kept in one place and updated in place (``set``),
    their addresses stay fixed, so the CUDA graphs read them without copying them in each step.
    Which filters run is structure, not data: ``top_k_on`` and ``top_p_on`` pick the compiled step.
    """

    temperature: Tensor  # () float32
    top_k: Tensor  # () int64, used when top_k_on
    top_p_tail: Tensor  # () float32: 1 - top_p, the cumulative probability at and below which tokens go
    key: Tensor  # (2,) int64: the Philox key, two 32-bit words
    top_k_on: bool = False
    top_p_on: bool = False

    @classmethod
    def allocate(cls, device: torch.device) -> SamplingParams:
        params = cls(
            temperature=torch.ones((), device=device),
            top_k=torch.zeros((), dtype=torch.int64, device=device),
            top_p_tail=torch.zeros((), device=device),
            key=torch.zeros(2, dtype=torch.int64, device=device),
        )
        for tensor in (params.temperature, params.top_k, params.top_p_tail, params.key):
            torch._dynamo.mark_static_address(tensor)
        return params

    def set(self, temperature: float, top_k: int | None, top_p: float, generator: torch.Generator) -> None:
        """New values for one ``generate`` call, and a new key drawn from ``generator``."""
        self.top_k_on = bool(top_k)
        self.top_p_on = top_p < 1.0
        self.temperature.fill_(temperature)
        self.top_k.fill_(top_k or 0)
        # 1 - top_p in double, then rounded once: TopPLogitsWarper compares with the Python float
        # 1 - top_p, and 1 - float32(top_p) would move the cut-off by an ulp.
        self.top_p_tail.fill_(1.0 - top_p)
        self.key.copy_(torch.randint(1 << 32, (2,), generator=generator, device=generator.device))

    @property
    def filters(self) -> tuple[bool, bool]:
        return self.top_k_on, self.top_p_on


def _mulhilo32(a: Tensor, multiplier: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * multiplier`` for 32-bit values held in int64.

    The full product needs 64 unsigned bits, and int64 overflow is undefined behaviour in the
    C++ of CPU kernels, so it is formed from the multiplier's 16-bit halves: every intermediate
    stays below 2**49 and the bits are exact on every backend.
    """
    low = a * (multiplier & 0xFFFF)
    mid = (low >> 16) + a * (multiplier >> 16)  # the product is (low & 0xFFFF) + mid * 2**16
    return mid >> 16, ((mid & 0xFFFF) << 16) | (low & 0xFFFF)


def philox4x32(
    counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor], rounds: int = 10
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32 (Random123's philox4x32_R) on int64 tensors holding 32-bit words; they broadcast."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(c0, _PHILOX_ROUND[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_ROUND[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & _MASK32, (k1 + _PHILOX_KEY_STEP[1]) & _MASK32
    return c0, c1, c2, c3


def gumbel_noise(key: Tensor, position: Tensor, vocab_size: int) -> Tensor:
    """``(B, vocab_size)`` fp32 standard Gumbel noise for rows at ``position`` ``(B, 1)`` int64."""
    batch = position.shape[0]
    token = torch.arange(vocab_size, device=position.device)
    row = torch.arange(batch, device=position.device).view(batch, 1)
    counter = (token, row, position.view(batch, 1) & _MASK32, torch.zeros_like(row))
    bits = philox4x32(counter, (key[0], key[1]))[0]
    # The top 23 bits, as the centre of one of 2**23 equal bins: U is never 0 or 1, so both logs
    # stay finite, and (2m + 1) < 2**24 is exact in fp32.
    uniform = ((bits >> 9) * 2 + 1).float() * 2.0**-24
    return -torch.log(-torch.log(uniform))


def filter_scores(logits: Tensor, params: SamplingParams) -> Tensor:
    """``(B, V)`` fp32 scores after temperature, top-k and top-p; dropped tokens are -inf."""
    scores = logits.float() / params.temperature
    if not (params.top_k_on or params.top_p_on):
        return scores
    # One ascending sort serves both filters; k and p stay tensors, so no shape depends on them.
    sorted_scores, order = scores.sort(dim=-1)
    remove = torch.zeros_like(sorted_scores, dtype=torch.bool)
    if params.top_k_on:
        vocab = scores.shape[-1]
        kth_index = (vocab - params.top_k).clamp(min=0).expand(scores.shape[0], 1)
        remove = sorted_scores < sorted_scores.gather(-1, kth_index)
        # Still ascending: the dropped scores were the smallest.
        sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
    if params.top_p_on:
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        beyond_p = cumulative <= params.top_p_tail
        beyond_p[:, -1] = False  # min_tokens_to_keep=1: the most likely token stays
        remove = remove | beyond_p
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def sample(logits: Tensor, position: Tensor, params: SamplingParams) -> Tensor:
    """``(B,)`` tokens drawn from ``logits`` ``(B, V)`` filtered as transformers filters them.

    ``position`` ``(B, 1)`` is each row's position of the token that produced these logits; with
    the key it fixes the noise, so the same key and positions give the same tokens.
    """
    scores = filter_scores(logits, params)
    return (scores + gumbel_noise(params.key, position, scores.shape[-1])).argmax(dim=-1)
