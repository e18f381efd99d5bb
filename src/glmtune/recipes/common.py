"""Steps shared by the recipes: model, tokenizer, template and data from one config."""

from __future__ import annotations

import random
from collections.abc import Callable

from glmtune.config import GlmtuneConfig
from glmtune.data.dataset_info import read_datasets
from glmtune.data.formats import Conversation, FormatOptions, read_conversations
from glmtune.data.preprocess import Example, build_examples, build_prompts
from glmtune.errors import GlmtuneError
from glmtune.methods.loading import ModelBundle


def format_options(config: GlmtuneConfig, require_response: bool = True) -> FormatOptions:
    return FormatOptions(
        dataset_format=config.dataset_format, prompt_column=config.prompt_column,
        response_column=config.response_column, history_column=config.history_column,
        train_on=config.train_on, require_response=require_response,
    )


def read_data(path: str | None, config: GlmtuneConfig, limit: int | None, require_response: bool = True) -> list[Conversation]:
    if not path:
        raise GlmtuneError("no data file given")
    conversations = read_conversations(path, format_options(config, require_response), config.skip_bad_records)
    return conversations[:limit] if limit else conversations


# (a file, or dataset names from dataset_info.json; at most this many records) -> the records
Reader = Callable[[str | None, int | None], list]


def conversation_readers(config: GlmtuneConfig) -> tuple[Reader, Reader]:
    """--stage sft's readers: conversations from a file, and from LLaMA-Factory datasets (``limit`` per dataset)."""
    return (lambda path, limit: read_data(path, config, limit),
            lambda names, limit: read_datasets(names, config.dataset_dir, format_options(config),
                                               config.skip_bad_records, limit))


def training_data(config: GlmtuneConfig, read_file: Reader, read_named: Reader) -> tuple[list, list | None]:
    """Training and validation records from --train_file/--validation_file or LLaMA-Factory's
    --dataset/--eval_dataset; --val_size holds out part of the training data instead."""
    if config.dataset:
        train = read_named(config.dataset, config.max_samples)
    else:
        train = read_file(config.train_file, config.max_train_samples or config.max_samples)
    evaluation = None
    if config.eval_dataset:
        evaluation = read_named(config.eval_dataset, config.max_eval_samples or config.max_samples)
    elif config.validation_file and config.do_eval:
        evaluation = read_file(config.validation_file, config.max_eval_samples)
    if config.val_size:
        if evaluation is not None:
            raise GlmtuneError("--val_size splits the training data; drop it or --validation_file/--eval_dataset")
        held_out = int(config.val_size * len(train)) if config.val_size < 1 else int(config.val_size)
        if not 0 < held_out < len(train):
            raise GlmtuneError(f"--val_size {config.val_size} leaves {held_out} of {len(train)} records for validation")
        order = list(range(len(train)))
        random.Random(config.seed).shuffle(order)
        evaluation = [train[i] for i in sorted(order[:held_out])]
        train = [train[i] for i in sorted(order[held_out:])]
    return train, evaluation


def training_examples(bundle: ModelBundle, conversations: list[Conversation], config: GlmtuneConfig) -> list[Example]:
    return build_examples(conversations, bundle.tokenizer, bundle.template, config.max_source_length, config.max_target_length,
                          cutoff_len=config.cutoff_len)


def prompts_for(bundle: ModelBundle, conversations: list[Conversation], config: GlmtuneConfig) -> list[list[int]]:
    return build_prompts(conversations, bundle.tokenizer, bundle.template, config.cutoff_len or config.max_source_length)


