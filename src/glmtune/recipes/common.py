"""Steps shared by the recipes: model, tokenizer, template and data from one config."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.data.dataset_info import read_datasets
from glmtune.data.formats import Conversation, FormatOptions, read_conversations
from glmtune.data.preprocess import Example, build_examples, build_prompts
from glmtune.data.templates import Template, get_template
from glmtune.errors import GlmtuneError
from glmtune.files import check_model_folder
from glmtune.methods import get_method
from glmtune.models.loading import load_model, load_tokenizer, resolve_model_source
from glmtune.models.vocab import resize_for_tokenizer, tokenizer_for_output
from glmtune.train.checkpoint import read_run_record

logger = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: object
    template: Template
    base_model: str | None  # what the user named (None: the bundled default)
    trained_config: GlmtuneConfig | None = None  # the run whose trained weights are loaded, if any


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


def load_base(config: GlmtuneConfig, base_model: str | None, prefix_checkpoint: str | None = None) -> ModelBundle:
    source = resolve_model_source(base_model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=config.torch_dtype, quantization_bit=config.quantization_bit,
                       prefix_checkpoint=prefix_checkpoint, quantize_embeddings=config.quantize_embeddings)
    return ModelBundle(model, tokenizer, get_template(config.template, tokenizer), base_model)


def training_examples(bundle: ModelBundle, conversations: list[Conversation], config: GlmtuneConfig) -> list[Example]:
    return build_examples(conversations, bundle.tokenizer, bundle.template, config.max_source_length, config.max_target_length,
                          cutoff_len=config.cutoff_len)


def prompts_for(bundle: ModelBundle, conversations: list[Conversation], config: GlmtuneConfig) -> list[list[int]]:
    return build_prompts(conversations, bundle.tokenizer, bundle.template, config.cutoff_len or config.max_source_length)


def trained_weights_folder(config: GlmtuneConfig) -> Path | None:
    """Where trained weights come from: --adapter_name_or_path, --ptuning_checkpoint, or a glmtune folder as the model."""
    for candidate in (config.adapter_name_or_path, config.ptuning_checkpoint, config.model_name_or_path):
        if candidate and read_run_record(candidate):
            return Path(candidate)
    if config.adapter_name_or_path:
        raise GlmtuneError(f"{config.adapter_name_or_path}: not a glmtune output (no glmtune.json)")
    return None


def load_for_inference(config: GlmtuneConfig) -> ModelBundle:
    """The base model, with trained weights on top when the config names a glmtune output or checkpoint."""
    folder = trained_weights_folder(config)
    if folder is None:
        # A seed (THUDM ptuning/main.py) checkpoint: only the prefix encoder, loaded natively.
        return load_base(config, config.model_name_or_path, prefix_checkpoint=config.ptuning_checkpoint)
    record = read_run_record(folder)
    check_model_folder(folder, needs_config=False)  # a truncated adapter: one line naming it, not a loader's traceback
    trained_config = GlmtuneConfig(**{**record["config"], "output_dir": str(folder)})
    named_base = config.model_name_or_path and Path(config.model_name_or_path) != folder
    base = config.model_name_or_path if named_base else record.get("base_model")
    method = get_method(record["finetuning_type"])
    bundle = load_base(config, base)
    if record.get("vocabulary"):  # trained with an extended vocabulary: that tokenizer, and rows for its tokens
        tokenizer = tokenizer_for_output(folder, bundle.tokenizer, record["vocabulary"])
        resize_for_tokenizer(bundle.model, bundle.tokenizer, tokenizer)
        bundle.tokenizer = tokenizer
    bundle.model = method.load(bundle.model, folder, trained_config)
    bundle.template = get_template(trained_config.template, bundle.tokenizer)
    bundle.base_model = base
    bundle.trained_config = trained_config
    logger.info("loaded %s weights from %s", method.name, folder)
    return bundle
