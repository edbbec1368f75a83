"""Host time of a compiled decode step's entry, unpatched and patched: its guards and dispatch.

    python benchmarks/guard_overhead.py --layers 32

transformers' static-cache ``generate`` calls its compiled decode step once per token, and on
each call torch.compile first checks the step's guards against the model and the inputs. A
patch that added guards (or slow Python ones) would add that host time to every step. This
compiles one decode step of a tiny Llama with the given layer count, unpatched and then
patched, with a backend that returns the traced graph's outputs without computing them, so the
time per call is Dynamo's entry alone: guard checks, argument handling, the frame's dispatch.
It runs on any machine: CPU tensors change which ops the graph holds, not what the model's
guards check.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaForCausalLM, StaticCache

import hf_fused
from hf_fused.models import shape_config


def entry_us(model: torch.nn.Module, calls: int, rounds: int = 1) -> float:
    """µs per call of the compiled decode step, its graph not run: the median over ``rounds``
    rounds of ``calls`` calls (a shared CPU's other work lands in a few rounds, not the median)."""
    cache = StaticCache(config=model.config, max_cache_len=256)
    prompt = torch.randint(model.config.vocab_size, (1, 8))
    model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(8))

    def outputs_only(gm, example_inputs):
        out = gm(*example_inputs)
        return lambda *args: out

    torch._dynamo.reset()
    step = torch.compile(model.forward, backend=outputs_only, fullgraph=True, dynamic=False)
    kwargs = dict(past_key_values=cache, use_cache=True, cache_position=torch.tensor([8]),
                  position_ids=torch.tensor([[8]]), attention_mask=torch.ones(1, 9, dtype=torch.long), logits_to_keep=1)
    token = torch.randint(model.config.vocab_size, (1, 1))
    for _ in range(3):
        step(token, **kwargs)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            step(token, **kwargs)
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=200, help="calls per round")
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args()
    config = shape_config("tiny-llama")
    config.num_hidden_layers = args.layers
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        unpatched = entry_us(model, args.calls, args.rounds)
        hf_fused.patch_model(model)
        patched = entry_us(model, args.calls, args.rounds)
    print(f"tiny-llama with {args.layers} layers, torch {torch.__version__}; µs per compiled-step call, graph not "
          f"run, median of {args.rounds} rounds of {args.calls} calls\n")
    print("| variant | µs per call |\n| --- | --- |")
    print(f"| unpatched | {unpatched:.1f} |\n| patched | {patched:.1f} |")


if __name__ == "__main__":
    main()
