"""One chat answer from the stock model, then from the same model patched by hf_fused.

    python examples/chat_compare.py                        # embedded SmolLM2-135M-Instruct
    python examples/chat_compare.py --prompt "What is a GPU?" --new-tokens 60
    python examples/chat_compare.py --model Qwen/Qwen2.5-0.5B-Instruct

Both answers are greedy, from hf_fused.generation.generate, so the patch is the only difference,
and the token ids are compared. They should be identical; the fused kernels round differently
from the stock ones, so a near-tie between two tokens could still flip, and the first
difference is then shown. scripts/demo.sh runs this before examples/compare_tps.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hf_fused  # noqa: E402
from example_utils import (  # noqa: E402
    add_model_args,
    kernel_path,
    load_and_report,
    patched_layers,
    prompt_inputs,
    token_streamer,
)
from hf_fused import generation  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser, placement=False)  # one device: the fast loop compiles over no hooks
    parser.add_argument("--prompt", default="What does a GPU do? Answer in one sentence.")
    parser.add_argument("--new-tokens", type=int, default=40, help="at most this many; the answer may end sooner")
    return parser.parse_args(argv)


def answer(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, input_ids: torch.Tensor, new_tokens: int
) -> torch.Tensor:
    """The greedy answer's new token ids, streamed to stdout as they come."""
    # A fresh compiled step: the other variant's code and CUDA graphs must not be reused.
    generation.reset(model)
    torch._dynamo.reset()
    eos = tokenizer.eos_token_id if tokenizer is not None else None
    out = generation.generate(model, input_ids, new_tokens, eos_token_id=eos, streamer=token_streamer(tokenizer))
    return out[0, input_ids.shape[1]:].cpu()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, model, tokenizer = load_and_report(args)
    input_ids = prompt_inputs(model, tokenizer, args.prompt, chat=True, device=device)["input_ids"]
    if tokenizer is None:
        print("no tokenizer (random weights): the prompt is 16 random token ids and the answers are token ids")
    else:
        print(f"user: {args.prompt}")
    print(f"greedy, at most {args.new_tokens} new tokens, hf_fused.generation.generate\n")

    print("stock model:")
    stock = answer(model, tokenizer, input_ids, args.new_tokens)
    hf_fused.patch_model(model)
    print(f"\npatched model ({patched_layers(model)} layers fused; kernel: {kernel_path(device)}):")
    patched = answer(model, tokenizer, input_ids, args.new_tokens)
    hf_fused.unpatch_model(model)

    if torch.equal(stock, patched):
        print(f"\ntoken ids: identical ({len(stock)} new tokens)")
    else:
        shorter = min(len(stock), len(patched))
        first = next((i for i in range(shorter) if stock[i] != patched[i]), shorter)
        print(f"\ntoken ids: different from new token {first + 1} on (stock {stock[first:first + 1].tolist()}, "
              f"patched {patched[first:first + 1].tolist()}); the fused kernels round differently from the "
              "stock ones, which can flip a near-tie")
    return 0


if __name__ == "__main__":
    sys.exit(main())
