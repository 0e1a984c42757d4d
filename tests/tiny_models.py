"""Tiny random Qwen2 and Llama models built from configs in code (no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

TINY_SIZES = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                  num_hidden_layers=2, vocab_size=128, max_position_embeddings=256)


def tiny_config(model_type: str, attn_implementation: str = "sdpa", **overrides):
    sizes = {**TINY_SIZES, **overrides}
    if model_type == "qwen2":
        config = Qwen2Config(**sizes, tie_word_embeddings=True)
    elif model_type == "llama":
        config = LlamaConfig(**sizes, tie_word_embeddings=True)
    else:
        raise ValueError(model_type)
    config._attn_implementation = attn_implementation
    return config


def tiny_model(model_type: str, attn_implementation: str = "sdpa", seed: int = 0, **overrides):
    """A random fp32 model whose norms and biases are not trivial (so folding is exercised)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, attn_implementation, **overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                parameter.copy_(1.0 + 0.3 * torch.randn_like(parameter))
            elif name.endswith(".bias"):
                parameter.normal_(0.0, 0.1)
    return model.eval()
