"""Batched generation for predict and compare: left-padded, sorted by length, through ``SlotDecoder``.

Greedy and sampling go through glmtune's decoding core (``eval/decoding.py``: a preallocated KV cache
with the P-Tuning v2 prefix in its first slots, CUDA-graph decode steps, tokens chosen on the device);
beam search goes to ``model.generate`` for models without a prefix.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from glmtune.errors import GlmtuneError
from glmtune.eval.decoding import (SlotDecoder, TokenHistory, choose_tokens, innermost, kv_bytes_per_position,
                                   needs_history, sampling_noise)
from glmtune.methods.ptuning import PrefixTuningModel
from glmtune.models.introspect import attention_shape, text_config

# Stop tokens are checked on the host every this many steps (a check synchronises with the device).
STOP_CHECK_EVERY = 8


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    num_beams: int = 1
    seed: int = 42
    repetition_penalty: float = 1.0
    top_k: int = 0
    no_repeat_ngram_size: int = 0
    #: Per-request constrained decoding (serve's tool calls / JSON): called each step with the tokens
    #: picked at the previous step (None at the first) and the next-token logits; returns the logits to pick from.
    logits_processor: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None
    #: Prefill and decode steps through torch.compile (predict/compare ``--compile_generation``): faster after a
    #: one-time compilation, for long prediction runs on a GPU.
    compile_steps: bool = False


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS of the tokenizer plus any the model's generation config lists (e.g. Gemma's <end_of_turn>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(innermost(model), "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def left_pad(prompts: list[list[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, length - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, length - len(prompt) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def decoder_for(model: nn.Module, rows: int, longest_prompt: int, settings: GenerationSettings) -> SlotDecoder:
    """A decoder with ``rows`` slots, room for the longest prompt plus ``max_new_tokens``."""
    return SlotDecoder(model, rows, longest_prompt + settings.max_new_tokens, compile_steps=settings.compile_steps)


@torch.no_grad()
def decode(decoder: SlotDecoder, prompts: list[list[int]], pad_token_id: int, stop_ids: list[int],
           settings: GenerationSettings, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[rows, steps]`` new tokens of each prompt (``pad_token_id`` after a row's stop token)."""
    device, rows = decoder.device, len(prompts)
    decoder.start_batch(max(len(p) for p in prompts), settings.max_new_tokens)
    for row in range(rows, decoder.slots):
        decoder.release(row)
    logits = decoder.prefill(list(range(rows)), prompts, pad_token_id)
    vocab = logits.shape[-1]
    history = TokenHistory(prompts, vocab, device, settings.repetition_penalty != 1.0,
                           settings.no_repeat_ngram_size) if needs_history(settings) else None
    stop = torch.tensor(stop_ids, dtype=torch.long, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = []
    previous = None
    for step in range(settings.max_new_tokens):
        noise = sampling_noise(rows, vocab, generator, device) if settings.do_sample else None
        token = previous = choose_tokens(logits, settings, history, noise, previous)
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        steps.append(token)
        finished |= torch.isin(token, stop)
        if step + 1 == settings.max_new_tokens or ((step + 1) % STOP_CHECK_EVERY == 0 and bool(finished.all())):
            break
        if history is not None:
            history.add(token)
        logits = decoder.step(token)[:rows]
    return torch.stack(steps, dim=1)


def sampling_generator(settings: GenerationSettings, device) -> torch.Generator | None:
    return torch.Generator(device).manual_seed(settings.seed) if settings.do_sample else None


def generate_batch(
    model: nn.Module, prompts: list[list[int]], pad_token_id: int, stop_ids: list[int], settings: GenerationSettings,
    generator: torch.Generator | None = None, decoder: SlotDecoder | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, cut before the first stop token."""
    device = next(model.parameters()).device
    if settings.num_beams > 1:
        return _beam_search(model, *left_pad(prompts, pad_token_id, device), pad_token_id, stop_ids, settings)
    decoder = decoder or decoder_for(model, len(prompts), max(len(p) for p in prompts), settings)
    generator = generator or sampling_generator(settings, device)
    return _cut_at_stop(decode(decoder, prompts, pad_token_id, stop_ids, settings, generator).tolist(), stop_ids)


def _beam_search(model, input_ids, attention_mask, pad_token_id, stop_ids, settings) -> list[list[int]]:
    if isinstance(model, PrefixTuningModel):
        raise GlmtuneError("--num_beams > 1 is not supported with P-Tuning v2; use greedy or sampling")
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad_token_id, eos_token_id=stop_ids,
        repetition_penalty=settings.repetition_penalty, no_repeat_ngram_size=settings.no_repeat_ngram_size,
    )
    return _cut_at_stop(output[:, input_ids.shape[1] :].tolist(), stop_ids)


def _cut_at_stop(rows: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    stops = set(stop_ids)
    result = []
    for row in rows:
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        result.append(row[:end])
    return result


class _StepProcessor:
    """``GenerationSettings.logits_processor`` in Hugging Face's ``LogitsProcessor`` shape ``(input_ids, scores)``:
    the token picked last is the newest column of ``input_ids``, none before the first new token."""

    def __init__(self, processor: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor], prompt_length: int):
        self.processor, self.prompt_length = processor, prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return self.processor(input_ids[:, -1] if input_ids.shape[1] > self.prompt_length else None, scores)


@torch.no_grad()
def generate_chatglm(model: nn.Module, tokenizer, prompts: list[list[int]], stop_ids: list[int],
                     settings: GenerationSettings, generator: torch.Generator | None) -> list[list[int]]:
    """Native ChatGLM models take the original's masks and positions, which their tokenizer builds."""
    if settings.num_beams > 1:
        raise GlmtuneError("--num_beams > 1 is not supported for native ChatGLM models")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in tokenizer.pad_ids(prompts).items()}
    processors = [_StepProcessor(settings.logits_processor, inputs["input_ids"].shape[1])] \
        if settings.logits_processor is not None else None
    output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                            top_p=settings.top_p, temperature=settings.temperature, eos_token_id=stop_ids,
                            top_k=settings.top_k, repetition_penalty=settings.repetition_penalty,
                            no_repeat_ngram_size=settings.no_repeat_ngram_size,
                            pad_token_id=tokenizer.pad_token_id, generator=generator if device.type == "cpu" else None,
                            logits_processor=processors)
    return _cut_at_stop(output[:, inputs["input_ids"].shape[1] :].tolist(), stop_ids)


def auto_batch_size(model: nn.Module, prompt_length: int, max_new_tokens: int, prompts: int) -> int:
    """A batch size that fits: the KV cache and last-step logits per sample against half the free memory,
    then evened out so that the last batch is not a small remainder (each batch costs as many decode steps)."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return min(8, prompts)
    inner = innermost(model)
    element = next(model.parameters()).element_size()
    hidden = text_config(inner).hidden_size
    per_position = kv_bytes_per_position(model, next(model.parameters()).dtype)
    per_sample = per_position * (prompt_length + max_new_tokens)  # a P-Tuning v2 prefix is stored once, not per row
    per_sample += 8 * text_config(inner).vocab_size + 16 * hidden * prompt_length * element  # logits, prefill activations
    # A prefill attends over the prefix copied in front of each row's keys and values, one layer at a time.
    per_sample += per_position // attention_shape(inner)[0] * (getattr(model, "pre_seq_len", 0) + prompt_length)
    free, _ = torch.cuda.mem_get_info(device)
    largest = int(max(1, min(1024, free * 0.5 // per_sample)))
    return math.ceil(prompts / math.ceil(prompts / largest))


def generate_texts(
    model: nn.Module, tokenizer, prompts: list[list[int]], settings: GenerationSettings,
    batch_size: int | None = None, show_progress: bool = True,
) -> tuple[list[str], float]:
    """Decoded answers in prompt order, and the wall time. Prompts are batched longest first."""
    model.eval()
    from glmtune.data.preprocess import pad_id

    longest = max(len(p) for p in prompts)
    if batch_size is None:
        batch_size = auto_batch_size(model, longest, settings.max_new_tokens, len(prompts))
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    if getattr(getattr(model, "config", None), "model_type", None) == "chatglm":
        generator = torch.Generator().manual_seed(settings.seed)

        def generate_rows(rows):
            return generate_chatglm(model, tokenizer, rows, stops, settings, generator)
    else:
        generator = sampling_generator(settings, device)
        # One decoder for every batch: its cache and graphs are made once.
        decoder = None if settings.num_beams > 1 else decoder_for(model, min(batch_size, len(prompts)), longest, settings)

        def generate_rows(rows):
            return generate_batch(model, rows, pad_id(tokenizer), stops, settings, generator, decoder)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers: list[str] = [""] * len(prompts)
    started = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="sample", disable=not show_progress) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            outputs = generate_rows([prompts[i] for i in batch])
            for index, tokens in zip(batch, outputs):
                answers[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            progress.update(len(batch))
            progress.set_postfix(samples_per_s=f"{progress.n / (time.perf_counter() - started):.2f}")
    return answers, time.perf_counter() - started
