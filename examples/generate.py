"""Load a model, patch it with hf_fused, check it, and stream generated text.

    python examples/generate.py                                  # embedded SmolLM2-135M-Instruct
    python examples/generate.py --model Qwen/Qwen2.5-0.5B-Instruct --prompt "Why is the sky blue?"
    python examples/generate.py --shape llama3-8b --static-compile   # random weights: prints token ids
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", default="Explain in two sentences why the sky is blue.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as plain text")
    parser.add_argument("--static-compile", action="store_true",
                        help="static cache; on CUDA transformers then compiles the decode step with CUDA graphs")
    parser.add_argument("--no-patch", action="store_true", help="run the stock model, for comparison")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, model, tokenizer = load_and_report(args)
    inputs = prompt_inputs(model, tokenizer, args.prompt, not args.no_chat_template, device)
    streamer = token_streamer(tokenizer)
    if tokenizer is None:
        print("no tokenizer (random weights?): the prompt is 16 random token ids and the output is token ids")

    if not args.no_patch:
        hf_fused.patch_model(model)
        report = hf_fused.verify_patch(model, inputs["input_ids"], inputs.get("attention_mask"))
        print(f"patched: {patched_layers(model)} {model.config.model_type} layers; kernel: {kernel_path(device)}")
        print(f"logits vs stock: max |diff| {report.max_abs_diff:.3g}, relative error {report.rel_err:.3g}, "
              f"top-1 agreement {report.top1_agreement:.1%}")
        if not report.ok:
            print(f"logits check FAILED (relative error above {report.rtol:g}); stopping", file=sys.stderr)
            return 1
    else:
        print("not patched (--no-patch)")

    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        gen_kwargs["pad_token_id"] = tokenizer.eos_token_id
    if args.static_compile:
        gen_kwargs["cache_implementation"] = "static"
    print("-" * 60)
    start = time.perf_counter()
    out = model.generate(**inputs, **gen_kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    new = out.shape[1] - inputs["input_ids"].shape[1]
    print("-" * 60)
    # Streaming and the first call's compile are inside this clock: compare_tps.py measures speed.
    print(f"{new} tokens in {seconds:.2f} s, end to end ({new / seconds:.1f} tok/s, not a benchmark)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
