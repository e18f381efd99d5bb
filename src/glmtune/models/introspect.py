"""Find the parts of a transformers decoder that the methods need, without per-architecture tables."""

from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks: the longest ModuleList in the model."""
    candidates = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not candidates:
        raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
    return max(candidates, key=len)


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def attention_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(num_layers, num_key_value_heads, head_dim, hidden_size) of a transformers decoder."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return len(decoder_layers(model)), kv_heads, head_dim, config.hidden_size


def linear_module_names(model: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of the model's weights have."""
    counts: dict[torch.dtype, int] = {}
    for parameter in model.parameters():
        counts[parameter.dtype] = counts.get(parameter.dtype, 0) + parameter.numel()
    return max(counts, key=counts.get)
