"""What differs between training stages in the train recipe: the data, the examples and the objective.

``sft`` reads conversations, ``pt`` raw documents packed into blocks, ``dpo`` preference pairs, from files or
LLaMA-Factory's dataset_info.json datasets; each is read before the model loads, so a bad record fails in a second.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from rich.console import Console
from torch import nn

from glmtune.config import AUTO, GlmtuneConfig
from glmtune.data.dataset_info import read_dataset_documents, read_dataset_pairs
from glmtune.data.pretrain import pretrain_examples, read_documents
from glmtune.data.preference import preference_examples, read_preference_pairs
from glmtune.data.preprocess import pad_id
from glmtune.errors import GlmtuneError
from glmtune.methods import Method
from glmtune.models.loading import resolve_dtype
from glmtune.models.quantization import is_quantized
from glmtune.methods.loading import ModelBundle
from glmtune.recipes.common import Reader, conversation_readers, training_data, training_examples
from glmtune.train.objectives import DPOObjective, Objective, PretrainObjective, SFTObjective
from glmtune.train.objectives.dpo import adapter_off_reference, frozen_copy_reference, policy_reference, preference_metrics
from glmtune.train.trainer import compute_dtype

console = Console(stderr=True)


def block_size(config: GlmtuneConfig) -> int:
    """``--stage pt`` packs blocks of ``--cutoff_len`` tokens, else ``--max_source_length + --max_target_length``
    when both are numbers, else LLaMA-Factory's default cutoff_len, 2048."""
    if config.cutoff_len:
        return config.cutoff_len
    if AUTO in (config.max_source_length, config.max_target_length):
        return 2048
    return config.max_source_length + config.max_target_length


def stage_data(config: GlmtuneConfig) -> tuple[list, list | None]:
    """Training and validation records of the stage's kind (conversations, documents or preference pairs), from
    files or LLaMA-Factory datasets (--dataset, --eval_dataset, --val_size), cut to --max_samples and the like."""
    return training_data(config, *_stage_readers(config))


def _stage_readers(config: GlmtuneConfig) -> tuple[Reader, Reader]:
    skip = config.skip_bad_records
    if config.stage == "pt":
        return (lambda path, limit: _first(read_documents(path, config.text_column, skip), limit),
                lambda names, limit: read_dataset_documents(names, config.dataset_dir, skip, limit))
    if config.stage == "dpo":
        return (lambda path, limit: _first(read_preference_pairs(path, skip), limit),
                lambda names, limit: read_dataset_pairs(names, config.dataset_dir, skip, limit))
    return conversation_readers(config)


def _first(records: list, limit: int | None) -> list:
    return records[:limit] if limit else records


def stage_examples(bundle: ModelBundle, records: list, config: GlmtuneConfig) -> list:
    if config.stage == "pt":
        return pretrain_examples(records, bundle.tokenizer, block_size(config))
    if config.stage == "dpo":
        return preference_examples(records, bundle.tokenizer, bundle.template, config.max_source_length,
                                   config.max_target_length, config.cutoff_len)
    return training_examples(bundle, records, config)


def stage_objective(config: GlmtuneConfig, method: Method, model: nn.Module, bundle: ModelBundle,
                    train_examples: list, eval_examples: list | None) -> Objective:
    """The objective for ``config.stage``; ``model`` is what ``method.apply`` returned, not yet trained."""
    if config.stage == "pt":
        return PretrainObjective()
    if config.stage != "dpo":
        return SFTObjective(packing=config.packing)
    objective = DPOObjective(config.pref_loss, config.pref_beta, config.simpo_gamma)
    if not objective.needs_reference:
        return objective
    with method.base_view(model) as base:
        has_base_view = base is not None
    if config.precompute_ref_logps:
        # Before the first step the trained model is its own reference (freeze, full), or its base view is.
        objective.reference = adapter_off_reference(method.base_view) if has_base_view else policy_reference()
        device = next(model.parameters()).device
        dtype = compute_dtype(model, config)
        autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        for examples in (train_examples, eval_examples or []):
            objective.precompute_reference(model, examples, pad_id(bundle.tokenizer),
                                           config.per_device_eval_batch_size or config.per_device_train_batch_size, autocast)
        objective.reference = None  # every batch now carries its reference log-probabilities
    elif has_base_view:
        objective.reference = adapter_off_reference(method.base_view)
    else:
        console.print("[bold cyan]glmtune[/]: DPO reference: a frozen copy of the base model "
                      "(twice the weights' memory; --precompute_ref_logps avoids it)")
        frozen = copy.deepcopy(model)
        if not is_quantized(frozen):  # the trained weights were upcast to float32; the reference keeps the base's dtype
            frozen = frozen.to(resolve_dtype(config.torch_dtype, next(model.parameters()).device))
        objective.reference = frozen_copy_reference(frozen)
    return objective


def stage_eval_metrics(config: GlmtuneConfig, objective: Objective, bundle: ModelBundle,
                       eval_examples: list | None) -> Callable[[nn.Module], dict[str, float]] | None:
    """``--stage dpo --do_eval``: the held-out pairs' rewards (accuracies, margins), logged as eval_rewards/..."""
    if config.eval_generate_samples and config.stage != "sft":
        raise GlmtuneError("--eval_generate_samples generates answers, for --stage sft; drop it for pt/dpo")
    if not (eval_examples and isinstance(objective, DPOObjective)):
        return None
    padding = pad_id(bundle.tokenizer)
    batch_size = config.per_device_eval_batch_size or 8
    return lambda model: {k: v for k, v in preference_metrics(model, objective, eval_examples, padding, batch_size).items()
                          if k != "loss"}
