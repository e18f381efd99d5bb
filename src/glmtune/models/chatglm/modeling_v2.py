"""ChatGLM2-6B / ChatGLM3-6B (GLM v2) in plain PyTorch.

Numerically follows THUDM's `modeling_chatglm.py` for ChatGLM2-6B (RMSNorm, SwiGLU, multi-query
attention with groups, RoPE on half of each head with interleaved pairs, P-Tuning v2 prefix) and keeps
the original parameter names, so original checkpoint folders load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .common import ChatGLMGenerationMixin, ChatGLMOutput, KVCache, causal_lm_loss, positions_to_keep

# The original applies this dropout to the prefix keys/values (hard-coded there too).
PREFIX_DROPOUT = 0.1


class ChatGLM2Config(PretrainedConfig):
    """Configuration of ChatGLM2/3-6B; the keys are those of the original `config.json`."""

    model_type = "chatglm"

    def __init__(
        self,
        num_layers: int = 28,
        padded_vocab_size: int = 65024,
        hidden_size: int = 4096,
        ffn_hidden_size: int = 13696,
        kv_channels: int | None = 128,
        num_attention_heads: int = 32,
        seq_length: int = 32768,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        layernorm_epsilon: float = 1e-5,
        rmsnorm: bool = True,
        apply_residual_connection_post_layernorm: bool = False,
        post_layer_norm: bool = True,
        add_bias_linear: bool = False,
        add_qkv_bias: bool = True,
        multi_query_attention: bool = True,
        multi_query_group_num: int = 2,
        fp32_residual_connection: bool = False,
        eos_token_id: int | list[int] = 2,
        pad_token_id: int = 0,
        use_cache: bool = True,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        prefix_hidden_size: int | None = None,
        quantization_bit: int = 0,
        rope_ratio: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_layers = num_layers
        self.padded_vocab_size = padded_vocab_size
        self.vocab_size = padded_vocab_size
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.kv_channels = kv_channels if kv_channels is not None else hidden_size // num_attention_heads
        self.num_attention_heads = num_attention_heads
        self.seq_length = seq_length
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layernorm_epsilon = layernorm_epsilon
        self.rmsnorm = rmsnorm
        self.apply_residual_connection_post_layernorm = apply_residual_connection_post_layernorm
        self.post_layer_norm = post_layer_norm
        self.add_bias_linear = add_bias_linear
        self.add_qkv_bias = add_qkv_bias
        self.multi_query_attention = multi_query_attention
        self.multi_query_group_num = multi_query_group_num
        self.fp32_residual_connection = fp32_residual_connection
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.prefix_hidden_size = prefix_hidden_size
        self.quantization_bit = quantization_bit
        self.rope_ratio = rope_ratio
        self.tie_word_embeddings = False

    @property
    def num_kv_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads


def rotary_table(position_ids: torch.Tensor, kv_channels: int, dtype: torch.dtype) -> torch.Tensor:
    """RoPE table [B, L, kv_channels/4, 2] (last axis = cos, sin), indexed by `position_ids` [B, L].

    Computed like the original: frequencies and positions in the model dtype, cos/sin in float32,
    cast back for float16/bfloat16 models.
    """
    n_elem = kv_channels // 2
    device = position_ids.device
    theta = 1.0 / (10000 ** (torch.arange(0, n_elem, 2, dtype=dtype, device=device) / n_elem))
    seq_idx = torch.arange(int(position_ids.max()) + 1, dtype=dtype, device=device)
    idx_theta = torch.outer(seq_idx, theta).float()
    cache = torch.stack([torch.cos(idx_theta), torch.sin(idx_theta)], dim=-1)
    if dtype in (torch.float16, torch.bfloat16):
        cache = cache.to(dtype)
    return cache[position_ids]


def apply_rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d]: rotate the first d/2 dims as interleaved pairs (2j, 2j+1); keep the rest."""
    rot_dim = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x_pairs = x_rot.reshape(*x_rot.shape[:-1], rot_dim // 2, 2)
    cos, sin = rope[:, None, :, :, 0], rope[:, None, :, :, 1]
    rotated = torch.stack(
        (
            x_pairs[..., 0] * cos - x_pairs[..., 1] * sin,
            x_pairs[..., 1] * cos + x_pairs[..., 0] * sin,
        ),
        dim=-1,
    ).flatten(-2)
    return torch.cat((rotated, x_pass), dim=-1)


def get_masks(
    batch_size: int, seq_length: int, past_length: int, padding_mask: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    """Bool mask [B, 1, L, past+L], True = masked, as the original `get_masks`.

    Causal over the new tokens, past (prefix/cache) visible, padded keys masked. Without a past, rows
    of padded queries are left fully visible so they never produce NaN.
    """
    mask = torch.ones(batch_size, seq_length, seq_length, device=device).tril_()
    if past_length:
        mask = torch.cat((torch.ones(batch_size, seq_length, past_length, device=device), mask), dim=-1)
    if padding_mask is not None:
        padding_mask = padding_mask.to(mask.dtype)
        mask = mask * padding_mask.unsqueeze(1)
        if not past_length:
            mask -= padding_mask.unsqueeze(-1) - 1
    return (mask < 0.5).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.eps)
        return (self.weight * hidden_states).to(input_dtype)


def _norm(config: ChatGLM2Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.kv_channels
        self.multi_query_attention = config.multi_query_attention
        self.dropout = config.attention_dropout
        projection = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(
            config.hidden_size,
            projection + 2 * self.num_kv_heads * self.head_dim,
            bias=config.add_bias_linear or config.add_qkv_bias,
        )
        self.dense = nn.Linear(projection, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rope: torch.Tensor,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        batch_size, seq_length, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states)
        if self.multi_query_attention:
            # [all q | all k | all v]
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = mixed.split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(batch_size, seq_length, self.num_heads, self.head_dim)
            k = k.view(batch_size, seq_length, self.num_kv_heads, self.head_dim)
            v = v.view(batch_size, seq_length, self.num_kv_heads, self.head_dim)
        else:
            # per head [q_h | k_h | v_h]
            q, k, v = mixed.view(batch_size, seq_length, self.num_heads, 3 * self.head_dim).chunk(3, dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if past_key is not None:
            k = torch.cat((past_key, k), dim=2)
            v = torch.cat((past_value, v), dim=2)
        present = (k, v) if use_cache else None

        group = self.num_heads // self.num_kv_heads
        k_heads, v_heads = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        dropout = self.dropout if self.training else 0.0
        if attention_mask is None:
            context = F.scaled_dot_product_attention(
                q, k_heads, v_heads, dropout_p=dropout, is_causal=q.shape[2] == k_heads.shape[2]
            )
        else:
            context = F.scaled_dot_product_attention(q, k_heads, v_heads, attn_mask=~attention_mask, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(batch_size, seq_length, -1)
        return self.dense(context), present


class MLP(nn.Module):
    """SwiGLU: dense_h_to_4h gives [gate | up], silu(gate) * up, then dense_4h_to_h."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.ffn_hidden_size * 2, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout
        self.residual_post_layernorm = config.apply_residual_connection_post_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rope: torch.Tensor,
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        layernorm_output = self.input_layernorm(hidden_states)
        attention_output, present = self.self_attention(
            layernorm_output, attention_mask, rope, past_key, past_value, use_cache
        )
        residual = layernorm_output if self.residual_post_layernorm else hidden_states
        layernorm_input = residual + F.dropout(attention_output, p=self.hidden_dropout, training=self.training)
        layernorm_output = self.post_attention_layernorm(layernorm_input)
        residual = layernorm_output if self.residual_post_layernorm else layernorm_input
        output = residual + F.dropout(self.mlp(layernorm_output), p=self.hidden_dropout, training=self.training)
        return output, present


class GLMTransformer(nn.Module):
    """The `transformer.encoder` submodule: blocks and the final norm."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = _norm(config) if config.post_layer_norm else None


class Embedding(nn.Module):
    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: `pre_seq_len` vectors giving every layer's past keys and values."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        kv_size = config.num_layers * config.kv_channels * config.num_kv_heads * 2
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if config.prefix_projection:
            mlp_size = config.prefix_hidden_size or config.hidden_size
            self.trans = nn.Sequential(nn.Linear(kv_size, mlp_size), nn.Tanh(), nn.Linear(mlp_size, kv_size))
        else:
            self.trans = None

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.trans is not None else embedded


class ChatGLM2Model(nn.Module):
    """The `transformer` submodule: embedding, encoder, output layer and the optional prefix encoder."""

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__()
        if config.quantization_bit:
            raise NotImplementedError("quantized ChatGLM2/3 checkpoints are not supported")
        if config.rope_ratio != 1:
            raise NotImplementedError("rope_ratio != 1 (ChatGLM long-context variants) is not supported")
        self.config = config
        self.embedding = Embedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len is not None else None
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        self.gradient_checkpointing = False

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> KVCache:
        """Prefix keys/values per layer, each [B, kv_heads, pre_seq_len, kv_channels]."""
        device = self.embedding.word_embeddings.weight.device
        prefix = torch.arange(self.config.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        kv = self.prefix_encoder(prefix).to(dtype)
        kv = kv.view(batch_size, self.config.pre_seq_len, 2 * self.config.num_layers, self.config.num_kv_heads, -1)
        # unbind rather than kv[2 * i]: in backward, indexing zero-fills and adds a gradient of the whole
        # [2·layers, B, heads, pre_seq_len, head_dim] tensor per key and value; unbind stacks them once.
        kv = self.prefix_dropout(kv).permute(2, 0, 3, 1, 4).unbind(0)
        return tuple(zip(kv[0::2], kv[1::2]))

    def prepare_layer_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        past_key_values: KVCache | None,
        dtype: torch.dtype,
    ) -> tuple[torch.Tensor | None, torch.Tensor, KVCache | None]:
        """The bool mask (or None = plain causal), positions and past every block receives."""
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("ChatGLM2 takes a 2D attention_mask (1 = token, 0 = padding) or None")
        batch_size, seq_length = input_ids.shape
        if self.prefix_encoder is not None:
            if past_key_values is None:
                past_key_values = self.get_prompt(batch_size, dtype)
            if attention_mask is not None:
                prefix_ones = attention_mask.new_ones(batch_size, self.config.pre_seq_len)
                attention_mask = torch.cat((prefix_ones, attention_mask), dim=-1)
        full_mask = None
        if (attention_mask is not None and not attention_mask.all()) or (past_key_values and seq_length != 1):
            past_length = past_key_values[0][0].shape[2] if past_key_values else 0
            full_mask = get_masks(batch_size, seq_length, past_length, attention_mask, input_ids.device)
        if position_ids is None:
            position_ids = torch.arange(seq_length, device=input_ids.device).unsqueeze(0).expand(batch_size, -1)
        return full_mask, position_ids, past_key_values

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, KVCache | None, tuple[torch.Tensor, ...] | None]:
        hidden_states = self.embedding.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        rope_dtype = hidden_states.dtype  # the embeddings' dtype (their weight may be int8 codes)
        if self.config.fp32_residual_connection:
            hidden_states = hidden_states.float()
        full_mask, position_ids, past_key_values = self.prepare_layer_inputs(
            input_ids, attention_mask, position_ids, past_key_values, hidden_states.dtype
        )
        rope = rotary_table(position_ids, self.config.kv_channels, rope_dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        use_cache = use_cache and not checkpointing

        presents = [] if use_cache else None
        all_hidden_states = [] if output_hidden_states else None
        for i, layer in enumerate(self.encoder.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            past_key, past_value = past_key_values[i] if past_key_values else (None, None)
            if checkpointing:
                # Tensors that may need gradients (hidden states, prefix keys/values) go positionally, so
                # reentrant checkpointing propagates to them too.
                hidden_states, present = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, past_key, past_value, full_mask, rope
                )
            else:
                hidden_states, present = layer(
                    hidden_states, past_key, past_value, full_mask, rope, use_cache=use_cache
                )
            if use_cache:
                presents.append(present)
        # Like the original, the recorded last hidden state is taken before the final norm.
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        if self.encoder.final_layernorm is not None:
            hidden_states = self.encoder.final_layernorm(hidden_states)
        return (
            hidden_states,
            tuple(presents) if use_cache else None,
            tuple(all_hidden_states) if output_hidden_states else None,
        )


class ChatGLM2ForConditionalGeneration(ChatGLMGenerationMixin, PreTrainedModel):
    """ChatGLM2/3-6B language model (`transformer` incl. `output_layer`), original parameter names."""

    config_class = ChatGLM2Config
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config: ChatGLM2Config) -> None:
        super().__init__(config)
        self.transformer = ChatGLM2Model(config)
        if config.pre_seq_len is not None:
            for name, param in self.named_parameters():
                param.requires_grad = name.startswith("transformer.prefix_encoder.")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep PyTorch's default initialisation (the original does no custom init)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def add_prefix_encoder(self) -> None:
        """Create a fresh prefix encoder (float32, PyTorch default init) from `config.pre_seq_len` etc."""
        device = self.transformer.embedding.word_embeddings.weight.device
        self.transformer.prefix_encoder = PrefixEncoder(self.config).to(device=device, dtype=torch.float32)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = True,
        logits_to_keep: int | torch.Tensor = 0,
    ) -> ChatGLMOutput | tuple:
        """Inputs as the original: 2D int `attention_mask` (1 = token, 0 = pad) and `position_ids` [B, L]
        (default 0..L-1; pass them when using `past_key_values`). `logits_to_keep=n` computes logits for
        the last n positions only (0 = all), a 1-D tensor for those it lists."""
        if output_attentions:
            raise NotImplementedError("output_attentions is not supported")
        if input_ids is None:
            raise ValueError("ChatGLM2 needs input_ids")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden_states, presents, all_hidden_states = self.transformer(
            input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=bool(output_hidden_states),
        )
        output_layer = self.transformer.output_layer
        logits = output_layer(positions_to_keep(hidden_states, logits_to_keep))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        if return_dict is False:
            return tuple(v for v in (loss, logits, presents, all_hidden_states) if v is not None)
        return ChatGLMOutput(
            loss=loss, logits=logits, past_key_values=presents, hidden_states=all_hidden_states
        )

    def _generation_first_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> dict:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).expand(input_ids.shape[0], -1)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def _generation_next_inputs(self, sequences: torch.Tensor, previous: dict, first: dict) -> dict:
        """The 2D mask grows by a 1, the position by last + 1 (as the original's generate())."""
        mask = previous["attention_mask"]
        if mask is not None:
            mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=-1)
        position_ids = previous["position_ids"][:, -1:] + 1
        return {"input_ids": sequences[:, -1:], "attention_mask": mask, "position_ids": position_ids}


__all__ = ["ChatGLM2Config", "ChatGLM2ForConditionalGeneration", "ChatGLM2Model", "get_masks", "rotary_table"]
