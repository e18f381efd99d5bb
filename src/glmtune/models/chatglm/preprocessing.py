"""Training / generation inputs built like THUDM's P-Tuning scripts (`ptuning/main.py`).

The prompt text goes through the same template as in those scripts: ChatGLM-6B uses the query as is
(or its `[Round i]` history format), ChatGLM2/3-6B wraps it with `build_prompt`.
"""

from __future__ import annotations

import torch

from .tokenization import ChatGLMTokenizer, ChatGLMTokenizerType


def build_train_example(
    tokenizer: ChatGLMTokenizerType,
    prompt: str,
    answer: str,
    max_source_length: int,
    max_target_length: int,
    history: list[tuple[str, str]] | None = None,
) -> tuple[list[int], list[int]]:
    """Unpadded (input_ids, labels) for one (prompt, answer) pair; labels are -100 on the prompt.

    ChatGLM-6B: `a[:max_source_length-1] + [gMASK, <sop>] + b[:max_target_length-2] + [<eop>]`, targets
    from `<sop>` on. ChatGLM2/3: `[gMASK, sop] + a` cut to `max_source_length`, `b` cut to
    `max_target_length`, then eos; targets `b + [eos]`. As in the scripts, labels equal to the pad id
    become -100 (for ChatGLM2/3 this also hides `<unk>` answer tokens, since unk = pad there). Pad the
    input ids with `tokenizer.pad_token_id` and the labels with -100 on the right.
    """
    if isinstance(tokenizer, ChatGLMTokenizer):
        source = tokenizer.encode(tokenizer.build_prompt(prompt, history), add_special_tokens=False)
        target = tokenizer.encode(answer, add_special_tokens=False)
        input_ids = tokenizer.build_inputs_with_special_tokens(
            source[: max_source_length - 1], target[: max_target_length - 2]
        )
        context = input_ids.index(tokenizer.bos_token_id)
        labels = [-100] * context + input_ids[context:]
    else:
        source = tokenizer.encode(
            tokenizer.build_prompt(prompt, history),
            add_special_tokens=True,
            truncation=True,
            max_length=max_source_length,
        )
        target = tokenizer.encode(answer, add_special_tokens=False, truncation=True, max_length=max_target_length)
        input_ids = source + target + [tokenizer.eos_token_id]
        labels = [-100] * len(source) + target + [tokenizer.eos_token_id]
    labels = [-100 if label == tokenizer.pad_token_id else label for label in labels]
    return input_ids, labels


def build_generation_inputs(
    tokenizer: ChatGLMTokenizerType,
    prompts: list[str],
    max_source_length: int | None = None,
) -> dict[str, torch.Tensor]:
    """Left-padded `input_ids`, `attention_mask`, `position_ids` for `generate`, in the model's formats
    (ChatGLM-6B: bool mask [B, 1, L, L] and positions [B, 2, L]; ChatGLM2/3: 0/1 mask and positions
    [B, L]). Prompts are templated as in `build_train_example`; `max_source_length` truncates the text."""
    texts = [tokenizer.build_prompt(prompt) for prompt in prompts]
    encoded = tokenizer(
        texts,
        padding=True,
        return_tensors="pt",
        truncation=max_source_length is not None,
        max_length=max_source_length,
    )
    return dict(encoded)
