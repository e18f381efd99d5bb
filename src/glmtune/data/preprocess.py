"""Tokenize conversations into training examples and generation prompts, and pad them into batches.

Prompt and answer are truncated separately, as the seed does: each prompt to ``max_source_length``
tokens, each answer to ``max_target_length`` tokens (the EOS token included). With ``cutoff_len`` (LLaMA-Factory's
key) prompt and answer share one budget instead, split as LLaMA-Factory splits it. Labels are -100 on
prompts and padding, so the loss covers answers only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from glmtune.data.formats import Conversation
from glmtune.data.templates import NativeChatGLMTemplate, Template
from glmtune.data.tools_chatglm import chatglm3_ids, uses_tools
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _encode(tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def encode_prompt(tokenizer, template: Template, text: str, max_length: int, first: bool) -> list[int]:
    """Prompt ids, BOS included for the first segment when the tokenizer adds one, cut to ``max_length``."""
    return _encode(tokenizer, text, add_special_tokens=first and not template.prompt_has_bos)[:max_length]


def shared_lengths(source_length: int, target_length: int, cutoff_len: int) -> tuple[int, int]:
    """How many prompt and answer tokens fit in ``cutoff_len`` (LLaMA-Factory's ``infer_seqlen``): a short side keeps
    all it has, the other gets the rest; both long: shared in proportion to their lengths."""
    if target_length * 2 < cutoff_len:
        target_budget = cutoff_len
    elif source_length * 2 < cutoff_len:
        target_budget = cutoff_len - source_length
    else:
        target_budget = int(cutoff_len * target_length / (source_length + target_length))
    kept_target = min(target_budget, target_length)
    return min(max(cutoff_len - kept_target, 0), source_length), kept_target


def encode_conversation(
    conversation: Conversation, tokenizer, template: Template, max_source_length: int, max_target_length: int,
    cutoff_len: int | None = None,
) -> Example:
    if isinstance(template, NativeChatGLMTemplate):
        if cutoff_len:  # THUDM's builder cuts prompt and answer separately: give each half
            max_source_length = max_target_length = cutoff_len // 2
        return Example(*template.encode_example(conversation, max_source_length, max_target_length))
    input_ids: list[int] = []
    labels: list[int] = []
    for index, segment in enumerate(template.segments(conversation)):
        if cutoff_len and len(input_ids) >= cutoff_len:
            break
        prompt_ids = encode_prompt(tokenizer, template, segment.prompt, cutoff_len or max_source_length, first=index == 0)
        answer_ids = _encode(tokenizer, segment.answer, add_special_tokens=False)
        if cutoff_len:
            answer_ids += [] if template.answer_has_end_marker else [tokenizer.eos_token_id]
            kept_prompt, kept_answer = shared_lengths(len(prompt_ids), len(answer_ids), cutoff_len - len(input_ids))
            prompt_ids, answer_ids = prompt_ids[:kept_prompt], answer_ids[:kept_answer]
        elif template.answer_has_end_marker:
            answer_ids = answer_ids[:max_target_length]
        else:
            answer_ids = answer_ids[: max_target_length - 1] + [tokenizer.eos_token_id]
        input_ids += prompt_ids + answer_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + (answer_ids if segment.trains else [IGNORE_INDEX] * len(answer_ids))
    return Example(input_ids, labels)


def build_examples(
    conversations: list[Conversation], tokenizer, template: Template, max_source_length: int, max_target_length: int,
    cutoff_len: int | None = None,
) -> list[Example]:
    """Training examples; an example whose answer is cut away entirely is dropped, and no examples at all is an error."""
    if tokenizer.eos_token_id is None and not template.answer_has_end_marker:
        raise GlmtuneError("the tokenizer has no EOS token; set one or use a chat template")
    examples = [encode_conversation(c, tokenizer, template, max_source_length, max_target_length, cutoff_len)
                for c in conversations]
    kept = [e for e in examples if e.answer_tokens >= template.minimum_answer_labels]
    if not kept:
        raise GlmtuneError(
            f"no example has answer tokens left after truncation (max_target_length={max_target_length}); "
            "check --response_column and --max_target_length"
        )
    if len(kept) < len(examples):
        logger.warning("dropped %d example(s) with no answer tokens", len(examples) - len(kept))
    return kept


def segment_lengths(conversation: Conversation, tokenizer, template: Template) -> list[tuple[int, int]]:
    """Untruncated (prompt, answer) token counts of each segment that carries loss, EOS in the answer."""
    if isinstance(template, NativeChatGLMTemplate) and uses_tools(conversation):
        _, labels = chatglm3_ids(tokenizer, conversation, with_last_answer=True)
        answer = sum(label != IGNORE_INDEX for label in labels)
        return [(len(labels) - answer, answer)]
    if isinstance(template, NativeChatGLMTemplate):
        # Upper bounds: the prompt with its special tokens; the answer with its two (<sop>/<eop> or eos).
        last = conversation.turns[-1]
        prompt = tokenizer.build_prompt(last.query, template.history(conversation))
        return [(len(_encode(tokenizer, prompt, True)), len(_encode(tokenizer, last.answer, False)) + 2)]
    end_tokens = 0 if template.answer_has_end_marker else 1
    return [
        (len(encode_prompt(tokenizer, template, s.prompt, 1 << 30, first=index == 0)),
         len(_encode(tokenizer, s.answer, add_special_tokens=False)) + end_tokens)
        for index, s in enumerate(template.segments(conversation)) if s.trains
    ]


def percentile_lengths(conversations: list[Conversation], tokenizer, template: Template, percentile: float = 99.0) -> tuple[int, int]:
    """(max_source_length, max_target_length) that leave ``percentile``% of prompts and of answers uncut.

    A percentile rather than the maximum: one very long record should not set the padding (and memory) of
    every batch; the seed's fixed 64 tokens were sized for ChatGLM's tokenizer, which needs fewer tokens per
    Chinese character than most (the bundled Gemma cut most ADGEN answers at 64).
    """
    lengths = [pair for c in conversations for pair in segment_lengths(c, tokenizer, template)]
    if not lengths:
        raise GlmtuneError("no answers to size --max_source_length/--max_target_length auto from")
    sources, targets = zip(*lengths)
    return (math.ceil(np.percentile(sources, percentile, method="higher")),
            math.ceil(np.percentile(targets, percentile, method="higher")))


def build_prompts(conversations: list[Conversation], tokenizer, template: Template, max_source_length: int) -> list[list[int]]:
    """Prompt ids for generation: everything before the last answer."""
    if isinstance(template, NativeChatGLMTemplate):
        return [template.encode_prompt(c, max_source_length) for c in conversations]
    return [
        encode_prompt(tokenizer, template, template.generation_prompt(c), max_source_length, first=True)
        for c in conversations
    ]


def pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id


def _rounded_up(length: int, multiple_of: int) -> int:
    return -(-length // multiple_of) * multiple_of


def pack(examples: list[Example], padding_value: int, multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """The examples end to end in one row (``--packing``), padded only at its end, up to ``multiple_of``.

    ``position_ids`` restart at 0 for each example; from them transformers masks attention across examples
    (its packed-sequence mask). Each example's first label is dropped: in a padded row no position predicts
    it, here the previous example's last token would. So the loss is the padded batch's, token for token.
    """
    input_ids, labels, position_ids = [], [], []
    for example in examples:
        input_ids += example.input_ids
        labels += [IGNORE_INDEX, *example.labels[1:]]
        position_ids += range(len(example.input_ids))
    real = len(input_ids)
    tail = _rounded_up(real, multiple_of) - real
    return {"input_ids": torch.tensor([input_ids + [padding_value] * tail]),
            "labels": torch.tensor([labels + [IGNORE_INDEX] * tail]),
            "position_ids": torch.tensor([position_ids + list(range(tail))]),
            "attention_mask": torch.tensor([[1] * real + [0] * tail])}


def collate(examples: list[Example], padding_value: int, multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example in the batch, rounded up to ``multiple_of``.

    Rounding keeps the number of distinct batch shapes small: GPU kernels (and torch.compile) are
    chosen per shape, and a new shape every step costs more than a few pad tokens.
    """
    length = _rounded_up(max(len(e.input_ids) for e in examples), multiple_of)
    input_ids = torch.full((len(examples), length), padding_value, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
