"""The decoding core behind predict, compare, chat, web and serve: row slots in a preallocated KV cache.

``SlotDecoder`` holds, for a fixed number of rows ("slots"), keys and values for ``capacity`` token
positions, allocated once. A P-Tuning v2 prefix takes the first ``prefix_length`` positions of every
row, but it is the same for all rows, so it is stored once, not per row: attention reads it once per
step (``decode_attention``), and only a prefill or another attention gets it copied in front of the
rows. All rows write their next token at one shared position, so a decode step is
the same computation every time: on CUDA it is captured once as a CUDA graph per (rows in use, visible
length) and replayed, with no host synchronisation and no per-step allocation. A row's prompt is
written right-aligned to the shared position, which lets a new request join a running batch at the
next step (the serve engine's continuous batching): positions are relative (RoPE), so where a row's
tokens sit in the cache does not change its result.

Why our own loop and not ``model.generate``: the P-Tuning v2 prefix lives in the KV cache, which
``generate`` assumes belongs to tokens of ``input_ids``; ``generate`` cannot admit new rows into a
running batch; and on the H200 its static cache needs a 31 s ``torch.compile`` warm-up per batch
shape. Here the graphs replay eager kernels, so capturing one costs three forward passes, and the whole
predict job still runs 1.07x faster than ``generate`` with its compiled static cache at the same batch size
(1.31x with ``--compile_generation``, which compiles the prefill and the decode step; benchmarks/RESULTS.md,
issue 13 run 3).

The attention mask is built from a preallocated ``valid`` table on the device and handed to the
model as a finished 4D mask (transformers returns such masks as they are). Each query position also
sees itself, so no row is ever fully masked: a padding position then yields finite keys and values
instead of NaNs that a later zero attention weight would still turn into NaN.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from glmtune.methods.ptuning import PrefixTuningModel, cache_argument_name, prefix_positions
from glmtune.models.introspect import attention_shape, text_config

# A decode step attends to the first ``visible`` positions: at least this many, else rounded up to one of
# four sizes per doubling (80, 96, 112, 128, 160, ...), so attention reads little more than it needs
# (it is a third of a decode step at batch 535 on the 7.66B proxy) and a long chat needs few graphs.
MIN_VISIBLE = 64
# Compiled prefills (``--compile_generation``) come in prompt lengths rounded up to a multiple of this, each
# shape compiled once: up to 15 pad tokens a row against a compilation per distinct length.
PREFILL_BUCKET = 16


def innermost(model: nn.Module) -> nn.Module:
    """The transformers model under PEFT and P-Tuning wrappers."""
    while hasattr(model, "get_base_model") or isinstance(model, PrefixTuningModel):
        model = model.base_model if isinstance(model, PrefixTuningModel) else model.get_base_model()
    return model


def kv_bytes_per_position(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes one row's keys and values take per position, over all layers."""
    layers, kv_heads, head_dim, _ = attention_shape(innermost(model))
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def _round_up_visible(length: int, capacity: int) -> int:
    if length <= MIN_VISIBLE:
        return min(MIN_VISIBLE, capacity)
    step = 1 << max(4, (length - 1).bit_length() - 3)
    return min(-(-length // step) * step, capacity)


def prefix_in_front(prefix: tuple[torch.Tensor, torch.Tensor], keys: torch.Tensor,
                    values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's keys and values with the shared prefix (``[1, kv_heads, prefix, head_dim]``) copied in front."""
    return tuple(torch.cat([p.expand(t.shape[0], -1, -1, -1), t], dim=2) for p, t in zip(prefix, (keys, values)))


def decode_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of one new token per row over the masked cache, as two batched matmuls around a float32
    softmax (how transformers' eager attention computes it), the query heads grouped by their KV head.

    Why not SDPA: for one query against a boolean mask SDPA picks cuDNN's (sm80) kernel, which reads the
    cache at about 40% of the H200's bandwidth; these matmuls take 0.23 ms against its 0.43 ms per layer
    at 535 rows x 80 positions (benchmarks/generation_profile.py). Anything else goes to SDPA.
    """
    prefix = getattr(module, SHARED_PREFIX, None)
    if (query.shape[2] != 1 or attention_mask is None or attention_mask.dtype != torch.bool
            or kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None):
        if prefix is not None:  # the rows' caches come without the prefix: put it back in front
            key, value = prefix_in_front(prefix, key, value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped = query.reshape(rows, kv_heads, groups, head_dim)
    scores = torch.matmul(grouped, key.transpose(-1, -2))
    if prefix is not None:
        # The P-Tuning v2 prefix is the same for every row: one matmul over it for all rows' queries (rows
        # folded into the matrix dimension) reads it once per step instead of once per row.
        prefix_keys, prefix_values = (t[0] for t in prefix)  # [kv_heads, prefix, head_dim]
        by_head = grouped.transpose(0, 1).reshape(kv_heads, rows * groups, head_dim)
        prefix_scores = torch.matmul(by_head, prefix_keys.transpose(-1, -2)).view(kv_heads, rows, groups, -1)
        scores = torch.cat([prefix_scores.transpose(0, 1), scores], dim=-1)
    scores = scores.float() * (head_dim**-0.5 if scaling is None else scaling)
    weights = scores.masked_fill_(~attention_mask, float("-inf")).softmax(-1).to(value.dtype)
    if prefix is None:
        return torch.matmul(weights, value).reshape(rows, 1, heads, value.shape[-1]), None
    length = prefix_keys.shape[1]
    output = torch.matmul(weights[..., length:], value)
    prefix_weights = weights[..., :length].transpose(0, 1).reshape(kv_heads, rows * groups, length)
    output += torch.matmul(prefix_weights, prefix_values).view(kv_heads, rows, groups, -1).transpose(0, 1)
    return output.reshape(rows, 1, heads, value.shape[-1]), None


DECODE_ATTENTION = "glmtune_decode"
AttentionInterface.register(DECODE_ATTENTION, decode_attention)
# The attribute of an attention module that holds its layer's P-Tuning v2 prefix ``(keys, values)``,
# ``[1, kv_heads, prefix, head_dim]`` each, while a decode step runs with the prefix kept apart.
SHARED_PREFIX = "_glmtune_shared_prefix"


@contextlib.contextmanager
def _attention_implementation(config, name: str):
    previous = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = previous


@contextlib.contextmanager
def _shared_prefix(modules: list[nn.Module], layers: list[_SlotLayer]):
    for module in modules:
        setattr(module, SHARED_PREFIX, layers[module.layer_idx].prefix)
    try:
        yield
    finally:
        for module in modules:
            delattr(module, SHARED_PREFIX)


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of each layer (transformers' ``…Attention`` classes carry their ``layer_idx``)."""
    return [m for m in model.modules() if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "layer_idx", None), int)]


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """The LM head's input as one dense block. transformers hands it the last position as a strided view of
    the prompt's hidden states, for which cuBLAS picks a kernel about 175x slower on the H200 (535 rows x
    130k vocabulary: 135 ms against 0.77 ms; benchmarks/generation_profile.py)."""
    return (args[0].contiguous(), *args[1:])


class _SlotLayer:
    """One layer's keys and values for every slot: ``[slots, kv_heads, capacity - prefix, head_dim]``, zeroed
    (never NaN), and the layer's P-Tuning v2 prefix once (``prefix``: ``[1, kv_heads, prefix, head_dim]``).

    It holds no reference back to its ``SlotCache`` (which is passed in): without a cycle, a finished
    decoder's cache is freed at once rather than at the next garbage collection.
    """

    def __init__(self, index: int):
        self.index = index
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.prefix: tuple[torch.Tensor, torch.Tensor] | None = None

    def _allocate(self, like: torch.Tensor, cache: SlotCache) -> None:
        shape = (cache.slots, like.shape[1], cache.capacity - cache.prefix_length, like.shape[3])
        self.keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values = torch.zeros(shape, dtype=like.dtype, device=like.device)
        if cache.prefix is not None:
            self.prefix = tuple(t.to(like.dtype).contiguous() for t in cache.prefix[self.index])

    def _with_prefix(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows' keys and values, with the prefix in front (a copy) for an attention that needs them whole."""
        return (keys, values) if self.prefix is None else prefix_in_front(self.prefix, keys, values)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, cache: SlotCache):
        if self.keys is None:
            self._allocate(key_states, cache)
        if cache.rows is None:  # a decode step: the first ``active`` slots write at the shared position
            keys, values = self.keys[: cache.active], self.values[: cache.active]
            keys.index_copy_(2, cache.write_slot, key_states)
            values.index_copy_(2, cache.write_slot, value_states)
            seen = cache.visible - cache.prefix_length
            keys, values = keys[:, :, :seen], values[:, :, :seen]
            return (keys, values) if cache.prefix_apart else self._with_prefix(keys, values)
        seen = cache.visible - cache.prefix_length
        if isinstance(cache.rows, slice):  # a block of rows: plain copies instead of scatter and gather
            self.keys[cache.rows, :, cache.write_slots].copy_(key_states)
            self.values[cache.rows, :, cache.write_slots].copy_(value_states)
            return self._with_prefix(self.keys[cache.rows, :, :seen], self.values[cache.rows, :, :seen])
        rows, slots = cache.rows[:, None], cache.write_slots
        self.keys[rows, :, slots] = key_states.transpose(1, 2)
        self.values[rows, :, slots] = value_states.transpose(1, 2)
        return self._with_prefix(self.keys[cache.rows, :, :seen], self.values[cache.rows, :, :seen])

    def shift(self, start: int, end: int, offset: int) -> None:
        for tensor in (self.keys, self.values):
            if tensor is not None:
                tensor[:, :, start + offset : end + offset] = tensor[:, :, start:end].clone()


class SlotCache:
    """What the model's attention layers see as their cache: ``update(keys, values, layer_idx)`` only.

    Not a ``transformers.Cache``: the model gets finished 4D masks, so nothing else of the cache API is
    used, and the same object works on transformers 5.17 (``past_key_values``) and 5.24 (``cache``).
    """

    def __init__(self, layers: int, slots: int, capacity: int, prefix, device):
        self.slots, self.capacity, self.prefix = slots, capacity, prefix
        self.prefix_length = prefix[0][0].shape[2] if prefix else 0
        self.layers = [_SlotLayer(index) for index in range(layers)]
        # Positions count the prefix; the rows' tensors start after it: ``write_slot = write_at - prefix_length``.
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.write_slot = torch.zeros(1, dtype=torch.long, device=device)
        self.rows: torch.Tensor | slice | None = None
        self.write_slots: torch.Tensor | slice | None = None
        self.active = slots
        self.visible = capacity
        self.prefix_apart = False  # decode steps leave the prefix out of the rows' keys (SHARED_PREFIX reads it)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return self.layers[layer_idx].update(key_states, value_states, self)


class SlotDecoder:
    """A model, its slot cache and the buffers and graphs of its decode step."""

    def __init__(self, model: nn.Module, slots: int, capacity: int, use_graphs: bool | None = None,
                 compile_steps: bool = False, compile_prefill: bool | None = None):
        prefix_model = model if isinstance(model, PrefixTuningModel) else None
        self.runner = prefix_model.base_model if prefix_model else model
        inner = innermost(model)
        self.config = inner.config
        config = text_config(inner)
        self.device = next(model.parameters()).device
        self.prefix_length = prefix_model.pre_seq_len if prefix_model else 0
        self.slots, self.capacity = slots, self.prefix_length + capacity
        self.cache_argument = cache_argument_name(inner)
        self._attention_modules = _attention_modules(inner) if self.prefix_length else []
        layers = attention_shape(inner)[0]
        # The prefix is kept apart in decode steps when every layer's attention module is found to carry it.
        self._prefix_apart = bool(self.prefix_length) and len(self._attention_modules) == layers
        self.head = inner.get_output_embeddings()
        with torch.no_grad():
            prefix = [tuple(t.detach() for t in kv) for kv in prefix_model.prefix_key_values(1)] if prefix_model else None
        self.cache = SlotCache(layers, slots, self.capacity, prefix, self.device)
        self.attention = getattr(config, "_attn_implementation", "sdpa")
        layer_types = getattr(config, "layer_types", None) or []
        window = getattr(config, "sliding_window", None)
        self.sliding_window = window if window and "sliding_attention" in layer_types else None
        if use_graphs is None:  # GLMTUNE_CUDA_GRAPHS=0: eager decode steps, to compare (benchmarks/)
            use_graphs = self.device.type == "cuda" and os.environ.get("GLMTUNE_CUDA_GRAPHS", "1") != "0"
        self.use_graphs = use_graphs
        # Compiled steps fuse the norms, rotary and activations (23 instead of 28 ms a step at 535 rows on the
        # H200) but each new shape costs a compilation (about 26 s): they attend over the whole cache, one shape.
        # The prefill is compiled too, for its unfused elementwise work and copies (0.39 of 1.07 s at 535 x 64
        # tokens, run 2's profile; 14,026 -> 15,095 tokens/s, issue 13 run 3). With static shapes: a compiled
        # prefill fills all the room before ``position``, which ``start_batch`` rounds up to PREFILL_BUCKET, so a
        # run compiles one prefill per bucket (dynamic sizes failed in inductor's CPU SDPA lowering, torch 2.13).
        # Chat leaves its prefills eager (``compile_prefill=False``): every new prompt length would compile.
        self.compiled = compile_steps
        self.compiled_prefill = compile_steps if compile_prefill is None else compile_prefill
        compiled_forward = torch.compile(self._forward, dynamic=False) if compile_steps or compile_prefill else None
        self._step_forward = compiled_forward if compile_steps else self._forward
        self._prefill_forward = compiled_forward if self.compiled_prefill else self._forward
        self.valid = torch.ones(slots, self.capacity, dtype=torch.bool, device=self.device)
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.position = self.prefix_length  # where the next token of every row is written
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = None

    # ---- masks and the forward pass ----

    def _mask(self, query_slots: torch.Tensor, valid: torch.Tensor, visible: int):
        """``[rows, 1, queries, visible]``: valid earlier slots, the prefix, and each query itself."""
        slots = torch.arange(visible, device=self.device)
        earlier = slots[None, :] <= query_slots[:, None]
        itself = slots[None, :] == query_slots[:, None]
        allowed = (valid[:, None, :visible] & earlier[None]) | itself[None]
        masks = {"full_attention": allowed}
        if self.sliding_window:
            near = (query_slots[:, None] - slots[None, :] < self.sliding_window) | (slots[None, :] < self.prefix_length)
            masks["sliding_attention"] = allowed & near[None]
        if self.attention == "eager":  # eager attention adds the mask to the scores
            masks = {k: torch.zeros(m.shape, device=self.device).masked_fill_(~m, float("-inf")) for k, m in masks.items()}
        masks = {k: m[:, None] for k, m in masks.items()}
        return masks if self.sliding_window else masks["full_attention"]

    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask) -> torch.Tensor:
        output = self.runner(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=True,
                             logits_to_keep=1, **{self.cache_argument: self.cache})
        return output.logits[:, -1, :].float()

    # ---- prompts ----

    def start_batch(self, longest_prompt: int, new_tokens: int) -> None:
        """Put the shared write position after the longest prompt of a new batch. Compiled, it is rounded up to
        PREFILL_BUCKET where the room allows, so prefills come in few shapes (each compiled once)."""
        length = longest_prompt
        if self.compiled_prefill:
            room = self.capacity - self.prefix_length - new_tokens
            length = max(length, min(-(-length // PREFILL_BUCKET) * PREFILL_BUCKET, room))
        self.position = self.prefix_length + length

    @torch.no_grad()
    def prefill(self, rows: list[int], prompts: list[list[int]], pad_token_id: int) -> torch.Tensor:
        """Write each prompt right-aligned to ``position`` in its row; the next-token logits ``[rows, vocab]``."""
        end, length = self.position, max(len(p) for p in prompts)
        if self.compiled_prefill:
            length = max(length, end - self.prefix_length)
        if end - length < self.prefix_length:
            raise ValueError(f"a prompt of {length} tokens does not fit before position {end}")
        input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), length), dtype=torch.long)
        for index, (row, prompt) in enumerate(zip(rows, prompts)):
            input_ids[index, length - len(prompt) :] = torch.tensor(prompt)
            attention[index, length - len(prompt) :] = 1
            self.valid[row] = True
            self.valid[row, self.prefix_length : end - len(prompt)] = False
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        row_index = torch.tensor(rows, device=self.device)
        cache = self.cache
        write_slots = torch.arange(end - length, end, device=self.device)
        first, last = end - length - self.prefix_length, end - self.prefix_length  # in the rows' tensors
        if rows == list(range(rows[0], rows[0] + len(rows))):
            cache.rows, cache.write_slots = slice(rows[0], rows[0] + len(rows)), slice(first, last)
        else:
            cache.rows, cache.write_slots = row_index, write_slots - self.prefix_length
        cache.visible = end
        hook = self.head.register_forward_pre_hook(_contiguous_input) if self.head is not None else None
        try:
            logits = self._prefill_forward(input_ids, prefix_positions(attention),
                                           self._mask(write_slots, self.valid[row_index], end))
        finally:
            cache.rows = None
            if hook is not None:
                hook.remove()
        self.positions[row_index] = attention.sum(-1)
        return logits

    def release(self, row: int) -> None:
        """A free row sees every slot, so its (ignored) attention never divides by zero."""
        self.valid[row] = True

    def shift(self, start: int, offset: int) -> None:
        """Move the slots ``[start, position)`` of every row by ``offset``; ``position`` moves with them."""
        end, prefix = self.position, self.prefix_length
        for layer in self.cache.layers:
            layer.shift(start - prefix, end - prefix, offset)
        self.valid[:, start + offset : end + offset] = self.valid[:, start:end].clone()
        if offset < 0:
            self.valid[:, end + offset : end] = True
        else:
            self.valid[:, start : start + offset] = False
        self.position += offset

    # ---- decode steps ----

    def _decode(self, active: int, visible: int) -> torch.Tensor:
        cache = self.cache
        cache.active, cache.visible = active, visible
        mask = self._mask(cache.write_at, self.valid[:active], visible)
        if self.attention != "sdpa":  # eager attention: the model's own, over the whole cache
            return self._step_forward(self.tokens[:active], self.positions[:active, None], mask)
        shared = _shared_prefix(self._attention_modules, cache.layers) if self._prefix_apart else contextlib.nullcontext()
        cache.prefix_apart = self._prefix_apart
        try:
            with _attention_implementation(self.config, DECODE_ATTENTION), shared:
                return self._step_forward(self.tokens[:active], self.positions[:active, None], mask)
        finally:
            cache.prefix_apart = False

    def _graph(self, active: int, visible: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        key = (active, visible)
        if key not in self._graphs:
            # The warm-up run writes the same keys and values the real step will write, so it is harmless.
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self._decode(active, visible)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                logits = self._decode(active, visible)
            self._graphs[key] = (graph, logits)
        return self._graphs[key]

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, active: int | None = None) -> torch.Tensor:
        """Write ``tokens`` (one per row in use) at ``position``; the next logits ``[active, vocab]``."""
        active = self.slots if active is None else active
        if self.position >= self.capacity:
            raise ValueError(f"the cache holds {self.capacity} positions; all are used")
        self.tokens[: tokens.shape[0], 0].copy_(tokens)
        self.cache.write_at.fill_(self.position)
        self.cache.write_slot.fill_(self.position - self.prefix_length)
        visible = self.capacity if self.compiled else _round_up_visible(self.position + 1, self.capacity)
        if self.use_graphs:
            graph, logits = self._graph(active, visible)
            graph.replay()
        else:
            logits = self._decode(active, visible)
        self.positions[:active] += 1
        self.position += 1
        return logits


# ---- choosing tokens ----


class TokenHistory:
    """What repetition penalty and ``no_repeat_ngram_size`` look at: each row's prompt and answer so far.

    Written here rather than with transformers' processors: those read ``input_ids``, where left padding
    would count as tokens (a batched row would differ from the same prompt alone), and the n-gram one
    loops over rows on the host every step.
    """

    def __init__(self, prompts: list[list[int]], vocab_size: int, device, penalty: bool, ngram: int):
        self.ngram = ngram
        self.seen = None
        if penalty:
            self.seen = torch.zeros(len(prompts), vocab_size, dtype=torch.bool, device=device)
            for row, prompt in enumerate(prompts):
                self.seen[row, torch.tensor(prompt, dtype=torch.long, device=device)] = True
        self.tokens = None
        if ngram:
            length = max(len(p) for p in prompts)
            self.tokens = torch.full((len(prompts), length), -1, dtype=torch.long, device=device)
            for row, prompt in enumerate(prompts):
                self.tokens[row, length - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)

    def add(self, tokens: torch.Tensor) -> None:
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.tokens is not None:
            self.tokens = torch.cat([self.tokens, tokens[:, None]], dim=1)

    def banned(self, vocab_size: int) -> torch.Tensor | None:
        """``[rows, vocab]``: tokens that would repeat an n-gram of the row (pads never match)."""
        size, history = self.ngram, self.tokens
        if history is None or history.shape[1] < size:
            return None
        windows = history.unfold(1, size, 1)  # [rows, count, size]
        suffix = history[:, history.shape[1] - size + 1 :]
        matches = (windows[:, :, :-1] == suffix[:, None, :]).all(-1) & (windows >= 0).all(-1)
        counts = torch.zeros(history.shape[0], vocab_size, device=history.device)
        counts.scatter_add_(1, windows[:, :, -1].clamp(min=0), matches.float())
        return counts > 0


def choose_tokens(logits: torch.Tensor, settings, history: TokenHistory | None = None,
                  noise: torch.Tensor | None = None, previous: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens ``[rows]`` on the device: the request's own logits processor (given the ``previous``
    tokens), penalties, then greedy or temperature/top-k/top-p sampling.

    Sampling takes ``argmax(p / E)`` with ``E ~ Exp(1)`` (``noise``), which draws from ``p`` without a
    host round trip (as gpt-fast does).
    """
    if getattr(settings, "logits_processor", None) is not None:
        logits = settings.logits_processor(previous, logits)
    if history is not None and history.seen is not None:
        penalty = settings.repetition_penalty
        logits = torch.where(history.seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if history is not None and (banned := history.banned(logits.shape[-1])) is not None:
        logits = logits.masked_fill(banned, float("-inf"))
    if not settings.do_sample:
        return logits.argmax(-1)
    scores = TemperatureLogitsWarper(settings.temperature)(None, logits)
    if settings.top_k:
        scores = TopKLogitsWarper(settings.top_k)(None, scores)
    if settings.top_p < 1.0:
        scores = TopPLogitsWarper(settings.top_p)(None, scores)
    return (torch.softmax(scores, dim=-1) / noise).argmax(-1)


def needs_history(settings) -> bool:
    return settings.repetition_penalty != 1.0 or settings.no_repeat_ngram_size > 0


def sampling_noise(rows: int, vocab_size: int, generator: torch.Generator, device) -> torch.Tensor:
    return torch.empty(rows, vocab_size, device=device).exponential_(generator=generator)
