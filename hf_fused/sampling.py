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

Why top-k works on ``torch.topk`` candidates rather than on a sorted vocabulary: on an H200 with
Llama-3-8B (vocab 128256, batch 1, temperature 0.7, top_k=50, top_p=0.9), the full sort and the
noise for every token made the sampled step 0.39 ms slower than greedy (5.21 against 4.82 ms per
token). With top-k on, every token outside the k largest scores is dropped anyway, so the filters
and the noise need only the ``top_k_cap`` largest (a power of two >= 2 * top_k): top-p on them,
in ascending order, is the same rule, as the softmax over them equals the softmax over the
vocabulary once the rest is -inf; and the noise, a pure function of the token id, is computed for
their ids alone, so the same key and position draw the same token as over the whole vocabulary.
The one difference from transformers: tokens tied with the k-th score that fall outside the
``top_k_cap`` candidates are dropped, where TopKLogitsWarper keeps them; that takes more than
``top_k_cap - k`` scores tied with the k-th. Top-p alone still sorts the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # multipliers of Salmon et al., SC'11, as in Random123
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)  # golden ratio and sqrt(3) - 1, the key's bump per round
# The fewest top-k candidates: top_k values up to 32 share one compiled step, and at this size
# topk's cost hardly depends on how many it returns.
_MIN_TOP_K_CAP = 64


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
    Which filters run, and how many top-k candidates, is structure, not data: ``filters`` picks
    the compiled step.
    """

    temperature: Tensor  # () float32
    top_k: Tensor  # () int64, used when top_k_on
    top_p_tail: Tensor  # () float32: 1 - top_p, the cumulative probability at and below which tokens go
    key: Tensor  # (2,) int64: the Philox key, two 32-bit words
    top_k_cap: int = 0  # how many candidates torch.topk takes for top-k; 0: no top-k
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
        # Twice top_k leaves room for ties with the k-th score; a power of two lets nearby top_k
        # values share one cap, so a new top_k rarely compiles a new step.
        self.top_k_cap = max(_MIN_TOP_K_CAP, 1 << (2 * top_k - 1).bit_length()) if top_k else 0
        self.top_p_on = top_p < 1.0
        self.temperature.fill_(temperature)
        self.top_k.fill_(top_k or 0)
        # 1 - top_p in double, then rounded once: TopPLogitsWarper compares with the Python float
        # 1 - top_p, and 1 - float32(top_p) would move the cut-off by an ulp.
        self.top_p_tail.fill_(1.0 - top_p)
        self.key.copy_(torch.randint(1 << 32, (2,), generator=generator, device=generator.device))

    @property
    def top_k_on(self) -> bool:
        return self.top_k_cap > 0

    @property
    def filters(self) -> tuple[int, bool]:
        return self.top_k_cap, self.top_p_on


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


def gumbel_noise(key: Tensor, position: Tensor, token_ids: Tensor) -> Tensor:
    """``(B, N)`` fp32 standard Gumbel noise for ``token_ids`` ``(N,)`` or ``(B, N)``, in rows at
    ``position`` ``(B, 1)`` int64; a token's noise depends on its id, not on where it is listed."""
    batch = position.shape[0]
    row = torch.arange(batch, device=position.device).view(batch, 1)
    counter = (token_ids, row, position.view(batch, 1) & _MASK32, torch.zeros_like(row))
    bits = philox4x32(counter, (key[0], key[1]))[0]
    # The top 23 bits, as the centre of one of 2**23 equal bins: U is never 0 or 1, so both logs
    # stay finite, and (2m + 1) < 2**24 is exact in fp32.
    uniform = ((bits >> 9) * 2 + 1).float() * 2.0**-24
    return -torch.log(-torch.log(uniform))


def _drop_beyond_top_p(ascending_scores: Tensor, params: SamplingParams) -> Tensor:
    """TopPLogitsWarper's mask over scores sorted ascending: True for the tokens top-p drops."""
    cumulative = ascending_scores.softmax(dim=-1).cumsum(dim=-1)
    beyond_p = cumulative <= params.top_p_tail
    beyond_p[:, -1] = False  # min_tokens_to_keep=1: the most likely token stays
    return beyond_p


def filter_scores(logits: Tensor, params: SamplingParams) -> Tensor:
    """``(B, V)`` fp32 scores after temperature, top-k and top-p; dropped tokens are -inf.

    Over the whole vocabulary: ``sample`` takes it for top-p alone (or no filter), and with top-k
    it is the reference that ``filter_candidates`` must match.
    """
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
        remove = remove | _drop_beyond_top_p(sorted_scores, params)
    return scores.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def filter_candidates(logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor]:
    """With top-k on: the ``top_k_cap`` largest fp32 scores ``(B, C)``, descending, after
    temperature, top-k and top-p (dropped ones -inf), and their token ids ``(B, C)``."""
    scores = logits.float() / params.temperature
    cap = min(params.top_k_cap, scores.shape[-1])
    cand_scores, cand_ids = scores.topk(cap, dim=-1)
    # A top_k above the vocabulary keeps it all, as TopKLogitsWarper's min(top_k, vocab) does.
    kth_index = (params.top_k.clamp(max=cap) - 1).expand(scores.shape[0], 1)
    cand_scores = cand_scores.masked_fill(cand_scores < cand_scores.gather(-1, kth_index), float("-inf"))
    if params.top_p_on:
        # Flipped to ascending, so the cumulative sum runs in TopPLogitsWarper's order.
        beyond_p = _drop_beyond_top_p(cand_scores.flip(-1), params).flip(-1)
        cand_scores = cand_scores.masked_fill(beyond_p, float("-inf"))
    return cand_scores, cand_ids


def sample(logits: Tensor, position: Tensor, params: SamplingParams) -> Tensor:
    """``(B,)`` tokens drawn from ``logits`` ``(B, V)`` filtered as transformers filters them.

    ``position`` ``(B, 1)`` is each row's position of the token that produced these logits; with
    the key it fixes the noise, so the same key and positions give the same tokens.
    """
    if params.top_k_on:
        scores, token_ids = filter_candidates(logits, params)
        choice = (scores + gumbel_noise(params.key, position, token_ids)).argmax(dim=-1, keepdim=True)
        return token_ids.gather(-1, choice).squeeze(-1)
    scores = filter_scores(logits, params)
    token_ids = torch.arange(scores.shape[-1], device=scores.device)
    return (scores + gumbel_noise(params.key, position, token_ids)).argmax(dim=-1)
