"""Batched generation: left-padded, sorted by length, with the KV cache.

Our own decoding loop rather than ``model.generate`` because the P-Tuning v2 prefix lives in the KV
cache, which ``generate`` assumes belongs to tokens of ``input_ids``. Greedy and top-p sampling are
handled here; beam search goes to ``generate`` for models without a prefix.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from glmtune.errors import GlmtuneError
from glmtune.methods.ptuning import PrefixTuningModel, cache_argument_name, prefix_positions


@dataclass
class GenerationSettings:
    max_new_tokens: int = 64
    do_sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    num_beams: int = 1
    seed: int = 42
    #: Per-request constrained decoding (serve's tool calls / JSON): called each step with the tokens
    #: picked at the previous step (None at the first) and the next-token logits; returns the logits to pick from.
    logits_processor: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor] | None = None


def _innermost(model: nn.Module) -> nn.Module:
    while hasattr(model, "get_base_model") or isinstance(model, PrefixTuningModel):
        model = model.base_model if isinstance(model, PrefixTuningModel) else model.get_base_model()
    return model


def stop_token_ids(model: nn.Module, tokenizer) -> list[int]:
    """EOS of the tokenizer plus any the model's generation config lists (e.g. Gemma's <end_of_turn>)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(_innermost(model), "generation_config", None), "eos_token_id", None)
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


def _pick(logits: torch.Tensor, settings: GenerationSettings, generator: torch.Generator | None) -> torch.Tensor:
    if not settings.do_sample:
        return logits.argmax(-1)
    scores = TemperatureLogitsWarper(settings.temperature)(None, logits)
    scores = TopPLogitsWarper(settings.top_p)(None, scores)
    probabilities = torch.softmax(scores, dim=-1)
    return torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def iter_generate(
    model: nn.Module, prompts: list[list[int]], pad_token_id: int, stop_ids: list[int], settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, step by step (finished rows get ``pad_token_id``).

    Stops after ``max_new_tokens`` or once every row has produced a stop token. Greedy or sampling.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = left_pad(prompts, pad_token_id, device)
    prefix_model = model if isinstance(model, PrefixTuningModel) else None
    runner = prefix_model.base_model if prefix_model else model
    cache = prefix_model.prefix_cache(len(prompts), for_generation=True) if prefix_model else DynamicCache()
    full_mask = prefix_model.extend_mask(attention_mask) if prefix_model else attention_mask
    positions = prefix_positions(attention_mask)
    stop = torch.tensor(stop_ids, device=device)
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    cache_kwargs = {cache_argument_name(_innermost(model)): cache}
    step_input = input_ids
    previous = None
    for _ in range(settings.max_new_tokens):
        logits = runner(
            input_ids=step_input, attention_mask=full_mask, position_ids=positions, use_cache=True, logits_to_keep=1,
            **cache_kwargs,
        ).logits[:, -1, :].float()
        if settings.logits_processor is not None:
            logits = settings.logits_processor(previous, logits)
        token = _pick(logits, settings, generator)
        previous = token
        token = torch.where(finished, torch.full_like(token, pad_token_id), token)
        yield token
        finished |= torch.isin(token, stop)
        if finished.all():
            return
        step_input = token[:, None]
        full_mask = torch.cat([full_mask, full_mask.new_ones(len(prompts), 1)], dim=1)
        positions = positions[:, -1:] + 1


def generate_batch(
    model: nn.Module, prompts: list[list[int]], pad_token_id: int, stop_ids: list[int], settings: GenerationSettings,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, cut before the first stop token."""
    if settings.num_beams > 1:
        device = next(model.parameters()).device
        return _beam_search(model, *left_pad(prompts, pad_token_id, device), pad_token_id, stop_ids, settings)
    steps = list(iter_generate(model, prompts, pad_token_id, stop_ids, settings, generator))
    return _cut_at_stop(torch.stack(steps, dim=1).tolist(), stop_ids)


def _beam_search(model, input_ids, attention_mask, pad_token_id, stop_ids, settings) -> list[list[int]]:
    if isinstance(model, PrefixTuningModel):
        raise GlmtuneError("--num_beams > 1 is not supported with P-Tuning v2; use greedy or sampling")
    output = model.generate(
        input_ids=input_ids, attention_mask=attention_mask, num_beams=settings.num_beams,
        max_new_tokens=settings.max_new_tokens, do_sample=False, pad_token_id=pad_token_id, eos_token_id=stop_ids,
    )
    return _cut_at_stop(output[:, input_ids.shape[1] :].tolist(), stop_ids)


def _cut_at_stop(rows: list[list[int]], stop_ids: list[int]) -> list[list[int]]:
    stops = set(stop_ids)
    result = []
    for row in rows:
        end = next((i for i, token in enumerate(row) if token in stops), len(row))
        result.append(row[:end])
    return result


@torch.no_grad()
def _generate_chatglm(model, tokenizer, prompts, stop_ids, settings: GenerationSettings, generator) -> list[list[int]]:
    """Native ChatGLM models take the original's masks and positions, which their tokenizer builds."""
    if settings.num_beams > 1:
        raise GlmtuneError("--num_beams > 1 is not supported for native ChatGLM models")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in tokenizer.pad_ids(prompts).items()}
    output = model.generate(**inputs, max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                            top_p=settings.top_p, temperature=settings.temperature, eos_token_id=stop_ids,
                            pad_token_id=tokenizer.pad_token_id, generator=generator if device.type == "cpu" else None)
    return _cut_at_stop(output[:, inputs["input_ids"].shape[1] :].tolist(), stop_ids)


def auto_batch_size(model: nn.Module, prompt_length: int, max_new_tokens: int) -> int:
    """A batch size that fits: the KV cache and last-step logits per sample against half the free memory."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return 8
    from glmtune.models.introspect import attention_shape, text_config

    layers, kv_heads, head_dim, hidden = attention_shape(_innermost(model))
    element = next(model.parameters()).element_size()
    tokens = prompt_length + max_new_tokens
    per_sample = 2 * layers * kv_heads * head_dim * element * tokens + 8 * text_config(_innermost(model)).vocab_size
    per_sample += 16 * hidden * prompt_length * element  # prefill activations
    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(512, free * 0.5 // per_sample)))


def generate_texts(
    model: nn.Module, tokenizer, prompts: list[list[int]], settings: GenerationSettings,
    batch_size: int | None = None, show_progress: bool = True,
) -> tuple[list[str], float]:
    """Decoded answers in prompt order, and the wall time. Prompts are batched longest first."""
    model.eval()
    from glmtune.data.preprocess import pad_id

    if batch_size is None:
        batch_size = auto_batch_size(model, max(len(p) for p in prompts), settings.max_new_tokens)
    if getattr(getattr(model, "config", None), "model_type", None) == "chatglm":
        def generate_rows(rows, generator):
            return _generate_chatglm(model, tokenizer, rows, stops, settings, generator)
    else:
        def generate_rows(rows, generator):
            return generate_batch(model, rows, pad_id(tokenizer), stops, settings, generator)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    stops = stop_token_ids(model, tokenizer)
    generator = torch.Generator().manual_seed(settings.seed)
    answers: list[str] = [""] * len(prompts)
    started = time.perf_counter()
    with tqdm(total=len(prompts), desc="generating", unit="sample", disable=not show_progress) as progress:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            outputs = generate_rows([prompts[i] for i in batch], generator)
            for index, tokens in zip(batch, outputs):
                answers[index] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
            progress.update(len(batch))
            progress.set_postfix(samples_per_s=f"{progress.n / (time.perf_counter() - started):.2f}")
    return answers, time.perf_counter() - started
