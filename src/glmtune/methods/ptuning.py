"""P-Tuning v2 for any transformers decoder: a prefix encoder gives every layer past keys and values.

Written here instead of using PEFT's prefix tuning because PEFT's (on transformers 5.x) refuses
gradient checkpointing and its ``generate`` silently ignores the prefix. The prefix enters through
the model's KV cache, so grouped-query attention (fewer KV heads) works as-is. During training the
cache is read-only (``_PrefixLayer.update`` does not store), so a checkpointed layer can be replayed
in backward and still see the same keys and values.

ChatGLM models use their own native encoder (``transformer.prefix_encoder``), as the originals do.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods.base import Method
from glmtune.models.introspect import attention_shape, decoder_layers

PREFIX_FILE = "prefix_encoder.safetensors"


class PrefixEncoder(nn.Module):
    """ChatGLM's prefix encoder: an embedding of ``pre_seq_len`` rows, optionally through Linear-tanh-Linear."""

    def __init__(self, pre_seq_len: int, kv_size: int, hidden_size: int, projection: bool, projection_hidden: int):
        super().__init__()
        self.projection = projection
        if projection:
            self.embedding = nn.Embedding(pre_seq_len, hidden_size)
            self.trans = nn.Sequential(nn.Linear(hidden_size, projection_hidden), nn.Tanh(), nn.Linear(projection_hidden, kv_size))
        else:
            self.embedding = nn.Embedding(pre_seq_len, kv_size)

    def forward(self, prefix_tokens: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix_tokens)
        return self.trans(embedded) if self.projection else embedded


class _PrefixLayer(DynamicLayer):
    """A cache layer that prepends fixed prefix keys/values and stores nothing new."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _give_each_layer_its_prefix(layers: nn.ModuleList, cache_argument: str) -> None:
    """Hand decoder layer i its ``_PrefixLayer`` instead of the whole read-only training cache.

    Attention calls ``cache.update(keys, values, self.layer_idx)``. On the whole cache, the index makes
    torch.compile specialize a layer's graph on ``layer_idx``: one compiled entry per layer (they share
    one code object), and past ``recompile_limit`` (8) every other layer and sequence length runs
    eagerly. A ``_PrefixLayer`` ignores the index, so one graph serves all layers. The generation cache
    and calls without a prefix pass through unchanged.
    """

    def hook(index: int, module: nn.Module, args: tuple, kwargs: dict):
        cache = kwargs.get(cache_argument)
        if isinstance(cache, DynamicCache) and index < len(cache.layers) and isinstance(cache.layers[index], _PrefixLayer):
            return args, {**kwargs, cache_argument: cache.layers[index]}
        return None

    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(functools.partial(hook, index), with_kwargs=True)


def cache_argument_name(model: nn.Module) -> str:
    """transformers 5.24 renamed ``past_key_values`` to ``cache``; 5.17 (our GPU machine) has the old name."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore both the prefix and left padding, as ChatGLM's P-Tuning v2 does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class PrefixTuningModel(nn.Module):
    """A frozen causal LM plus a trainable prefix encoder."""

    def __init__(self, base_model: nn.Module, pre_seq_len: int, projection: bool, projection_hidden: int | None):
        super().__init__()
        self.base_model = base_model
        self.config = base_model.config
        self.pre_seq_len = pre_seq_len
        self.num_layers, self.kv_heads, self.head_dim, hidden = attention_shape(base_model)
        kv_size = self.num_layers * 2 * self.kv_heads * self.head_dim
        self.prefix_encoder = PrefixEncoder(pre_seq_len, kv_size, hidden, projection, projection_hidden or hidden)
        self.register_buffer("prefix_tokens", torch.arange(pre_seq_len), persistent=False)
        self.cache_argument = cache_argument_name(base_model)
        _give_each_layer_its_prefix(decoder_layers(base_model), self.cache_argument)

    @property
    def device(self) -> torch.device:
        return self.prefix_tokens.device

    def prefix_key_values(self, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values), each ``[batch, kv_heads, pre_seq_len, head_dim]``."""
        prefix = self.prefix_encoder(self.prefix_tokens)
        dtype = next(self.base_model.parameters()).dtype
        prefix = prefix.to(dtype).view(self.pre_seq_len, self.num_layers * 2, self.kv_heads, self.head_dim)
        # unbind, then expand each piece: in backward that is one stack of per-layer gradients summed over
        # the batch. Indexing a batch-expanded tensor instead made autograd zero-fill and add a gradient
        # of the whole [2·layers, batch, heads, prefix, dim] tensor once per key and value (H200: a third
        # of a P-Tuning v2 step on the 7.66B proxy).
        pieces = [piece.unsqueeze(0).expand(batch_size, -1, -1, -1) for piece in prefix.permute(1, 2, 0, 3).unbind(0)]
        return list(zip(pieces[0::2], pieces[1::2]))

    def prefix_cache(self, batch_size: int, for_generation: bool = False) -> DynamicCache:
        """The prefix as a KV cache: read-only for training, a normal growing cache for generation."""
        cache = DynamicCache()
        key_values = self.prefix_key_values(batch_size)
        if for_generation:
            for index, (keys, values) in enumerate(key_values):
                cache.update(keys.contiguous(), values.contiguous(), index)
        else:
            cache.layers = [_PrefixLayer(keys, values) for keys, values in key_values]
        return cache

    def extend_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        ones = attention_mask.new_ones(attention_mask.shape[0], self.pre_seq_len)
        return torch.cat([ones, attention_mask], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels=None, use_cache=False, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs[self.cache_argument] = self.prefix_cache(input_ids.shape[0])
        return self.base_model(
            input_ids=input_ids,
            attention_mask=self.extend_mask(attention_mask),
            position_ids=prefix_positions(attention_mask),
            labels=labels,
            use_cache=False,
            **kwargs,
        )


class PTuningMethod(Method):
    name = "ptuning"

    def apply(self, model: nn.Module, config: GlmtuneConfig) -> nn.Module:
        if config.additional_target:
            raise GlmtuneError("--additional_target trains modules beside LoRA or freeze; P-Tuning v2 trains only its prefix")
        model.requires_grad_(False)
        if getattr(model.config, "model_type", None) == "chatglm":
            from glmtune.models.chatglm import enable_ptuning

            enable_ptuning(model, config.pre_seq_len, config.prefix_projection, config.prefix_hidden_size)
            return model
        wrapped = PrefixTuningModel(model, config.pre_seq_len, config.prefix_projection, config.prefix_hidden_size)
        return wrapped.to(model.device)

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if "prefix_encoder." in n and p.requires_grad}

    def save(self, model: nn.Module, directory: Path) -> None:
        state = {n: p.detach().contiguous().cpu() for n, p in self.trainable_parameters(model).items()}
        save_file(state, str(Path(directory) / PREFIX_FILE))

    def restore(self, model: nn.Module, directory: Path) -> None:
        state = load_file(str(Path(directory) / PREFIX_FILE))
        parameters = self.trainable_parameters(model)
        if set(state) != set(parameters):
            raise ValueError(f"{directory}: prefix encoder does not match (--pre_seq_len/--prefix_projection?)")
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)

    @contextlib.contextmanager
    def base_view(self, model: nn.Module) -> Iterator[nn.Module]:
        if isinstance(model, PrefixTuningModel):
            yield model.base_model
            return
        # Native ChatGLM carries its prefix encoder inside; without it the model runs prefix-free.
        transformer = model.transformer
        encoder, transformer.prefix_encoder = transformer.prefix_encoder, None
        try:
            yield model
        finally:
            transformer.prefix_encoder = encoder
