"""Tiny random models of every supported architecture, built with transformers for the tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

_COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)

CONFIGS = {
    "llama": lambda **kw: LlamaConfig(**_COMMON | kw),
    "mistral": lambda **kw: MistralConfig(**_COMMON | kw),
    "qwen2": lambda **kw: Qwen2Config(**_COMMON | {"tie_word_embeddings": True} | kw),
    "qwen3": lambda **kw: Qwen3Config(**_COMMON | {"head_dim": 8} | kw),
    "gemma2": lambda **kw: Gemma2Config(**_COMMON | {"head_dim": 8, "sliding_window": 16} | kw),
    "gemma3": lambda **kw: Gemma3TextConfig(**_COMMON | {"head_dim": 8, "sliding_window": 16} | kw),
    "phi3": lambda **kw: Phi3Config(**_COMMON | {"pad_token_id": 0} | kw),
}


def make_model(
    kind: str,
    path: Path,
    *,
    layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **overrides: object,
) -> Path:
    """Save a randomly initialised model of `kind` (biases and norms randomised too) at `path`."""
    torch.manual_seed(seed)
    config = CONFIGS[kind](num_hidden_layers=layers, **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        # Default inits leave norms at 1 and biases at 0; randomise so copies are distinguishable.
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.to(dtype).save_pretrained(path)
    return path
