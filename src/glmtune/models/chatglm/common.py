"""Output type, loss and a small generation loop shared by the ChatGLM v1 and v2 models.

The loop reproduces what the originals' Hugging Face `generate()` does for greedy search (one prompt
pass, then one token per step with the KV cache; finished rows are filled with the pad id) and adds
plain temperature / top-k / top-p sampling. It does not depend on transformers' GenerationMixin, so it
behaves the same on every transformers version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# One (keys, values) pair per layer, each [batch, kv_heads, length, head_dim].
KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]


class ChatGLMOutput(dict):
    """Model output with `loss`, `logits`, `past_key_values`, `hidden_states` (None when absent).

    Like transformers' ModelOutput it is a dict of the fields that are set and indexes like a tuple of
    them; it is our own class because ModelOutput renames `past_key_values` in newer transformers.
    """

    fields = ("loss", "logits", "past_key_values", "hidden_states")

    def __init__(
        self,
        loss: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
        past_key_values: KVCache | None = None,
        hidden_states: tuple[torch.Tensor, ...] | None = None,
    ) -> None:
        values = (loss, logits, past_key_values, hidden_states)
        super().__init__((name, value) for name, value in zip(self.fields, values) if value is not None)

    def __getattr__(self, name: str):
        if name in self.fields:
            return self.get(name)
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return tuple(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(self.values())


def positions_to_keep(hidden_states: torch.Tensor, logits_to_keep: int | torch.Tensor) -> torch.Tensor:
    """The [B, L, H] hidden states the LM head runs on, as transformers reads ``logits_to_keep``: an int keeps
    the last n positions (0 = all), a 1-D tensor the positions it lists (empty: none, as glmtune's training loss,
    which runs the head itself, asks for)."""
    if isinstance(logits_to_keep, torch.Tensor):
        return hidden_states[:, logits_to_keep]
    return hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean float32 cross-entropy of logits[:, :-1] against labels[:, 1:], ignoring -100."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100)


@dataclass
class GenerationOutput:
    """`sequences` = prompt + new tokens; `logits[t]` = the [B, V] logits used to pick new token t."""

    sequences: torch.Tensor
    logits: tuple[torch.Tensor, ...] | None = None


def sample_next_token(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Greedy argmax, or sampling after temperature, top-k and top-p (Hugging Face semantics and order)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.size(-1)), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[..., -1] = False  # always keep the most likely token
        scores = scores.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)


class ChatGLMGenerationMixin:
    """`generate()` for the ChatGLM models; they provide the first and the per-step model inputs."""

    def _generation_first_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None
    ) -> dict:
        raise NotImplementedError

    def _generation_next_inputs(self, sequences: torch.Tensor, previous: dict, first: dict) -> dict:
        raise NotImplementedError

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, **kwargs) -> dict:
        """Present for PEFT (its CAUSAL_LM wrapper requires the attribute); `generate` does not use it."""
        return {"input_ids": input_ids, **kwargs}

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        num_beams: int = 1,
        generator: torch.Generator | None = None,
        output_logits: bool = False,
        return_dict_in_generate: bool = False,
        logits_processor: list | None = None,
        **ignored,
    ) -> torch.Tensor | GenerationOutput:
        """Generate like the original's HF `generate()` (greedy or sampling; no beam search).

        Masks/positions are passed in the model's own format (see `forward`); `logits_processor` items are
        called as Hugging Face's `LogitsProcessor`s before each pick; other Hugging Face
        generation arguments are ignored. Without `max_new_tokens`, `max_length` (prompt included) or
        else 20 new tokens is the limit. A row that emits an eos id is
        finished and gets `pad_token_id` afterwards; generation stops when every row is finished.
        Returns prompt + new tokens, or a `GenerationOutput` with the step logits when
        `return_dict_in_generate` is set.
        """
        if num_beams != 1:
            raise NotImplementedError("beam search is not supported")
        if max_new_tokens is None:
            max_new_tokens = max_length - input_ids.shape[1] if max_length is not None else 20
        if eos_token_id is None:
            eos_token_id = self.config.eos_token_id
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if pad_token_id is None:
            pad_token_id = self.config.pad_token_id if self.config.pad_token_id is not None else eos_ids[0]
        eos = torch.tensor(eos_ids, dtype=torch.long, device=input_ids.device)

        first = self._generation_first_inputs(input_ids, attention_mask, position_ids)
        inputs, past, sequences = first, None, input_ids
        unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        step_logits = []
        for _ in range(max_new_tokens):
            out = self(**inputs, past_key_values=past, use_cache=True, return_dict=True, logits_to_keep=1)
            logits = out.logits[:, -1, :]
            if output_logits:
                step_logits.append(logits)
            for process in logits_processor or []:  # Hugging Face's LogitsProcessor call: (input_ids, scores)
                logits = process(sequences, logits)
            next_tokens = sample_next_token(logits, do_sample, temperature, top_k, top_p, generator)
            if eos_ids:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad_token_id))
                unfinished &= ~torch.isin(next_tokens, eos)
            sequences = torch.cat((sequences, next_tokens[:, None]), dim=1)
            if not unfinished.any():
                break
            past = out.past_key_values
            inputs = self._generation_next_inputs(sequences, inputs, first)
        if return_dict_in_generate:
            return GenerationOutput(sequences=sequences, logits=tuple(step_logits) if output_logits else None)
        return sequences
