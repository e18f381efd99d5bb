"""ChatGLM-6B (GLM v1) in plain PyTorch.

Numerically follows THUDM's final `modeling_chatglm.py` for ChatGLM-6B (2D rotary positions, GELU MLP,
LayerNorm, alpha-scaled residual on the normalised input, per-head qkv layout, P-Tuning v2 prefix) and
keeps the original parameter names, so original checkpoint folders load as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .common import ChatGLMGenerationMixin, ChatGLMOutput, KVCache, causal_lm_loss, positions_to_keep

# The original applies this dropout to the prefix keys/values (hard-coded there too).
PREFIX_DROPOUT = 0.1
# The original's GLMBlock takes `num_layers=28` as a default argument that the model never passes, so
# the residual scale is sqrt(2 * 28) whatever config.num_layers says.
RESIDUAL_ALPHA = (2 * 28) ** 0.5


class ChatGLMConfig(PretrainedConfig):
    """Configuration of ChatGLM-6B; the keys are those of the original `config.json`."""

    model_type = "chatglm"

    def __init__(
        self,
        vocab_size: int = 130528,
        hidden_size: int = 4096,
        num_layers: int = 28,
        num_attention_heads: int = 32,
        inner_hidden_size: int = 16384,
        layernorm_epsilon: float = 1e-5,
        max_sequence_length: int = 2048,
        position_encoding_2d: bool = True,
        bos_token_id: int = 130004,
        eos_token_id: int = 130005,
        mask_token_id: int = 130000,
        gmask_token_id: int = 130001,
        pad_token_id: int = 3,
        use_cache: bool = True,
        pre_seq_len: int | None = None,
        prefix_projection: bool = False,
        prefix_hidden_size: int | None = None,
        quantization_bit: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_attention_heads = num_attention_heads
        self.inner_hidden_size = inner_hidden_size
        self.layernorm_epsilon = layernorm_epsilon
        self.max_sequence_length = max_sequence_length
        self.position_encoding_2d = position_encoding_2d
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.mask_token_id = mask_token_id
        self.gmask_token_id = gmask_token_id
        self.pad_token_id = pad_token_id
        self.use_cache = use_cache
        self.pre_seq_len = pre_seq_len
        self.prefix_projection = prefix_projection
        self.prefix_hidden_size = prefix_hidden_size
        self.quantization_bit = quantization_bit
        # The original never ties lm_head to the word embeddings (the loader ties them only when a
        # checkpoint lacks lm_head.weight), whatever the generic HF key in config.json says.
        self.tie_word_embeddings = False


def _first_index(row: list[int], token_id: int, what: str) -> int:
    try:
        return row.index(token_id)
    except ValueError:
        raise ValueError(f"ChatGLM-6B input row has no {what} token (id {token_id}): {row}") from None


def get_masks(input_ids: torch.Tensor, bos_token_id: int) -> torch.Tensor:
    """Bool mask [B, 1, L, L], True = masked: bidirectional before the first bos, causal after."""
    seq_length = input_ids.shape[1]
    context = torch.tensor(
        [_first_index(row, bos_token_id, "bos") for row in input_ids.tolist()], device=input_ids.device
    )
    keys = torch.arange(seq_length, device=input_ids.device)
    visible = (keys[None, :] <= keys[:, None])[None] | (keys[None, None, :] < context[:, None, None])
    return ~visible.unsqueeze(1)


def mask_position(row: list[int], mask_token_id: int, gmask_token_id: int) -> int:
    """Index of the `[gMASK]` token of a row, or of `[MASK]` when there is no `[gMASK]`."""
    token = gmask_token_id if gmask_token_id in row else mask_token_id
    return _first_index(row, token, "[gMASK]/[MASK]")


def get_position_ids(input_ids: torch.Tensor, config: ChatGLMConfig) -> torch.Tensor:
    """2D positions [B, 2, L]: (token position, block position), both frozen/started at the first bos."""
    rows = []
    for row in input_ids.tolist():
        context = _first_index(row, config.bos_token_id, "bos")
        mask_pos = mask_position(row, config.mask_token_id, config.gmask_token_id)
        positions = list(range(context)) + [mask_pos] * (len(row) - context)
        block_positions = [0] * context + list(range(1, len(row) - context + 1))
        rows.append([positions, block_positions])
    return torch.tensor(rows, dtype=torch.long, device=input_ids.device)


def rotary_tables(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [B, 2, L, head_dim/2] for both position channels.

    As in the original, the inverse frequencies are rounded to float16 even for a float32 model. The
    original builds the table in the dtype of that buffer (float16 for the real fp16 model), so an fp16
    model gets an fp16 table here too; any other dtype uses float32.
    """
    rot_dim = head_dim // 2
    device = position_ids.device
    inv_freq = (1.0 / (10000 ** (torch.arange(0, rot_dim, 2, device=device).float() / rot_dim))).half()
    table_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    t = torch.arange(int(position_ids.max()) + 1, device=device, dtype=table_dtype)
    freqs = torch.outer(t, inv_freq.to(table_dtype))
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[position_ids].to(dtype), emb.sin()[position_ids].to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d]: first half of each head rotated by channel 0, second half by channel 1."""
    halves = []
    for channel, part in enumerate(x.chunk(2, dim=-1)):
        c, s = cos[:, channel, None], sin[:, channel, None]
        halves.append(part * c + _rotate_half(part) * s)
    return torch.cat(halves, dim=-1)


def glm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention with the original's masking (True = masked).

    The original scales q by 1/(sqrt(d)*(i+1)), fills masked scores with -10000, multiplies by (i+1) and
    takes a float32 softmax. For a row with any visible key that is exactly a masked softmax; a fully
    masked row (left padding) gets uniform weights, reproduced here by zeroing its query.
    """
    if mask is None or not mask.any():
        return F.scaled_dot_product_attention(q, k, v)
    fully_masked = mask.all(dim=-1, keepdim=True)
    if fully_masked.any():
        q = q.masked_fill(fully_masked, 0.0)
        mask = mask & ~fully_masked
    return F.scaled_dot_product_attention(q, k, v, attn_mask=~mask)


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        inner = self.num_heads * self.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * inner)
        self.dense = nn.Linear(inner, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
        use_cache: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        batch_size, seq_length, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(batch_size, seq_length, self.num_heads, 3 * self.head_dim)
        q, k, v = qkv.transpose(1, 2).chunk(3, dim=-1)  # per head: [q_h | k_h | v_h]
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if past_key is not None:
            k = torch.cat((past_key, k), dim=2)
            v = torch.cat((past_value, v), dim=2)
        context = glm_attention(q, k, v, attention_mask)
        context = context.transpose(1, 2).reshape(batch_size, seq_length, -1)
        return self.dense(context), ((k, v) if use_cache else None)


class GLU(nn.Module):
    """Plain GELU MLP (the original calls it GLU but does not gate)."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


class GLMBlock(nn.Module):
    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        self.alpha = RESIDUAL_ALPHA

    def forward(
        self,
        hidden_states: torch.Tensor,
        past_key: torch.Tensor | None,
        past_value: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        use_cache: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        # The residual carries the normalised input, scaled by alpha (GLM's DeepNorm-style residual).
        attention_input = self.input_layernorm(hidden_states)
        attention_output, present = self.attention(
            attention_input, attention_mask, rotary, past_key, past_value, use_cache
        )
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input), present


class PrefixEncoder(nn.Module):
    """P-Tuning v2 prefix: `pre_seq_len` vectors giving every layer's past keys and values."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        kv_size = config.num_layers * config.hidden_size * 2
        if config.prefix_projection:
            mlp_size = config.prefix_hidden_size or config.hidden_size
            self.embedding = nn.Embedding(config.pre_seq_len, config.hidden_size)
            self.trans = nn.Sequential(
                nn.Linear(config.hidden_size, mlp_size), nn.Tanh(), nn.Linear(mlp_size, kv_size)
            )
        else:
            self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
            self.trans = None

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        embedded = self.embedding(prefix)
        return self.trans(embedded) if self.trans is not None else embedded


class ChatGLMModel(nn.Module):
    """The `transformer` submodule: embeddings, blocks, final LayerNorm and the optional prefix encoder."""

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__()
        if not config.position_encoding_2d:
            raise NotImplementedError("ChatGLM-6B with position_encoding_2d=false is not supported")
        if config.quantization_bit:
            raise NotImplementedError("quantized ChatGLM-6B checkpoints are not supported")
        self.config = config
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len is not None else None
        self.prefix_dropout = nn.Dropout(PREFIX_DROPOUT)
        self.gradient_checkpointing = False

    def get_prompt(self, batch_size: int, dtype: torch.dtype) -> KVCache:
        """Prefix keys/values per layer, each [B, heads, pre_seq_len, head_dim]."""
        device = self.word_embeddings.weight.device
        prefix = torch.arange(self.config.pre_seq_len, device=device).unsqueeze(0).expand(batch_size, -1)
        heads = self.config.num_attention_heads
        kv = self.prefix_encoder(prefix).to(dtype)
        kv = kv.view(batch_size, self.config.pre_seq_len, 2 * self.config.num_layers, heads, -1)
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
        """The mask, 2D positions and past that every block receives, built as the original does."""
        if attention_mask is not None and attention_mask.dim() == 2:
            # A 0/1 padding mask, as generic collators make: right padding (training batches) leaves
            # every real token's attention unchanged, so the original's own mask applies; the seed
            # trains exactly so, passing no mask at all.
            is_right_padding = (attention_mask[:, :-1] >= attention_mask[:, 1:]).all()
            if not is_right_padding:
                raise ValueError("ChatGLM-6B takes a 4D bool attention_mask for left-padded input (see its tokenizer)")
            attention_mask = None
        if attention_mask is not None and attention_mask.dim() != 4:
            raise ValueError("ChatGLM-6B takes a 4D bool attention_mask (True = masked) or None")
        if past_key_values is None:
            if attention_mask is None:
                attention_mask = get_masks(input_ids, self.config.bos_token_id)
            if position_ids is None:
                position_ids = get_position_ids(input_ids, self.config)
            if self.prefix_encoder is not None:
                past_key_values = self.get_prompt(input_ids.shape[0], dtype)
        elif position_ids is None:
            raise ValueError("ChatGLM-6B needs position_ids when past_key_values are given")
        if self.prefix_encoder is not None and attention_mask is not None:
            prefix_columns = attention_mask.new_zeros(*attention_mask.shape[:3], self.config.pre_seq_len)
            attention_mask = torch.cat((prefix_columns, attention_mask), dim=3)
        return attention_mask, position_ids, past_key_values

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
        hidden_states = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        attention_mask, position_ids, past_key_values = self.prepare_layer_inputs(
            input_ids, attention_mask, position_ids, past_key_values, hidden_states.dtype
        )
        if attention_mask is not None:
            attention_mask = attention_mask.to(torch.bool)
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rotary = rotary_tables(position_ids, head_dim, hidden_states.dtype)
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        use_cache = use_cache and not checkpointing

        presents = [] if use_cache else None
        all_hidden_states = [] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            past_key, past_value = past_key_values[i] if past_key_values is not None else (None, None)
            if checkpointing:
                # Tensors that may need gradients (hidden states, prefix keys/values) go positionally, so
                # reentrant checkpointing propagates to them too.
                hidden_states, present = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, past_key, past_value, attention_mask, rotary
                )
            else:
                hidden_states, present = layer(
                    hidden_states, past_key, past_value, attention_mask, rotary, use_cache=use_cache
                )
            if use_cache:
                presents.append(present)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return (
            hidden_states,
            tuple(presents) if use_cache else None,
            tuple(all_hidden_states) if output_hidden_states else None,
        )


class ChatGLMForConditionalGeneration(ChatGLMGenerationMixin, PreTrainedModel):
    """ChatGLM-6B language model (`transformer` + `lm_head`), original parameter names."""

    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]

    def __init__(self, config: ChatGLMConfig) -> None:
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.pre_seq_len is not None:
            for name, param in self.named_parameters():
                param.requires_grad = name.startswith("transformer.prefix_encoder.")
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Keep PyTorch's default initialisation (the original does no custom init)."""

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def add_prefix_encoder(self) -> None:
        """Create a fresh prefix encoder (float32, PyTorch default init) from `config.pre_seq_len` etc."""
        device = self.transformer.word_embeddings.weight.device
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
        """Inputs as the original: bool 4D `attention_mask` (True = masked) and `position_ids` [B, 2, L];
        both are built from `input_ids` when not given (each row needs a bos and a [gMASK]/[MASK]).
        `logits_to_keep=n` computes logits for the last n positions only (0 = all), a 1-D tensor for those it lists."""
        if output_attentions:
            raise NotImplementedError("output_attentions is not supported")
        if input_ids is None:
            raise ValueError("ChatGLM-6B needs input_ids (masks and positions are built from them)")
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
        logits = self.lm_head(positions_to_keep(hidden_states, logits_to_keep))
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        if return_dict is False:
            return tuple(v for v in (loss, logits, presents, all_hidden_states) if v is not None)
        return ChatGLMOutput(
            loss=loss, logits=logits, past_key_values=presents, hidden_states=all_hidden_states
        )

    def _generation_first_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> dict:
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}

    def _generation_next_inputs(self, sequences: torch.Tensor, previous: dict, first: dict) -> dict:
        """Inputs for the newest token, grown like the original's generate().

        A caller's 4D mask grows by a visible column for the new row (the new row copies the last row);
        without a caller mask later steps use none. Positions: [mask index, previous block position + 1],
        recomputed from the sequence when the caller passed no positions.
        """
        mask = previous["attention_mask"]
        if first["attention_mask"] is not None:
            last_row = mask[:, :, -1:]
            mask = torch.cat((last_row, last_row.new_zeros(*last_row.shape[:3], 1)), dim=3)
        if first["position_ids"] is not None:
            last = previous["position_ids"][..., -1:]
            position_ids = torch.cat((last[:, :1], last[:, 1:] + 1), dim=1)
        else:
            seq_length = sequences.shape[1]
            rows = []
            for row in sequences.tolist():
                context = _first_index(row, self.config.bos_token_id, "bos")
                mask_pos = mask_position(row, self.config.mask_token_id, self.config.gmask_token_id)
                rows.append([[mask_pos], [seq_length - context]])
            position_ids = torch.tensor(rows, dtype=torch.long, device=sequences.device)
        return {"input_ids": sequences[:, -1:], "attention_mask": mask, "position_ids": position_ids}


__all__ = [
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "get_masks",
    "get_position_ids",
    "rotary_tables",
]
