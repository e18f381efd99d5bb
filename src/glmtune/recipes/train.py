"""The train recipe: load, read data, apply the method, run the loop, save."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.console import Console
from transformers import set_seed

from glmtune.config import AUTO, GlmtuneConfig
from glmtune.data.preprocess import percentile_lengths
from glmtune.errors import GlmtuneError
from glmtune.methods import get_method
from glmtune.models.quantization import parameter_count
from glmtune.data.formats import Conversation
from glmtune.data.preference import PreferencePair
from glmtune.data.templates import get_template
from glmtune.models.vocab import extended_tokenizer, resize_for_tokenizer, vocabulary_record
from glmtune.methods.loading import ModelBundle, load_base
from glmtune.recipes.common import prompts_for
from glmtune.recipes.stages import stage_data, stage_eval_metrics, stage_examples, stage_objective
from glmtune.train.distributed import process_group
from glmtune.train.trackers import tracker_names
from glmtune.train.trainer import TrainResult, check_output_dir, train

console = Console(stderr=True)


def run_train(config: GlmtuneConfig) -> TrainResult:
    if not (config.train_file or config.dataset):
        raise GlmtuneError("training needs --train_file FILE or --dataset NAMES (with dataset_info.json in --dataset_dir)")
    tracker_names(config.report_to)  # a missing tracker package fails now, not after the model has loaded
    group = process_group()
    if group.is_main:
        check_output_dir(config)
    set_seed(config.seed)
    if config.do_eval and not (config.validation_file or config.eval_dataset or config.val_size):
        raise GlmtuneError("--do_eval needs --validation_file, --eval_dataset or --val_size")
    # Data first: a bad record should fail in a second, not after the model has loaded.
    train_records, eval_records = stage_data(config)
    if eval_records:
        config.do_eval = True
    bundle = load_base(config, config.model_name_or_path)
    vocabulary = _extend_vocabulary(bundle, config)
    if config.stage != "pt":  # pt packs blocks of --cutoff_len instead
        config = with_data_lengths(config, bundle, _sized_conversations(train_records))
    train_examples = stage_examples(bundle, train_records, config)
    eval_examples = stage_examples(bundle, eval_records, config) if eval_records else None
    method = get_method(config.finetuning_type)
    model = method.apply(bundle.model, config)
    objective = stage_objective(config, method, model, bundle, train_examples, eval_examples)
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    total = parameter_count(model)
    console.quiet = not group.is_main  # one process talks
    console.print(
        f"[bold cyan]glmtune[/]: {config.stage} with {method.name} on {len(train_examples)} {_UNITS[config.stage]}, "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%)"
    )
    base_model = config.model_name_or_path
    if base_model and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    record = {"base_model": base_model, "template": bundle.template.name}
    if vocabulary:
        record["vocabulary"] = vocabulary
    generation_metrics = stage_eval_metrics(config, objective, bundle, eval_examples)
    if config.stage == "sft" and eval_records and config.eval_generate_samples:
        generation_metrics = _generation_metrics(bundle, eval_records[: config.eval_generate_samples], config)
    result = train(model, bundle.tokenizer, method, config, train_examples, eval_examples, record, generation_metrics,
                   objective=objective)
    if vocabulary and group.is_main:
        bundle.tokenizer.save_pretrained(str(result.output_dir))  # the output loads with the tokenizer it trained with
    final = f" (final loss {result.losses[-1]:.4f})" if result.losses else " (nothing left to train)"
    console.print(f"[bold cyan]glmtune[/]: saved to {result.output_dir}{final}")
    return result


_UNITS = {"sft": "examples", "pt": "blocks", "dpo": "preference pairs"}


def _extend_vocabulary(bundle: ModelBundle, config: GlmtuneConfig) -> dict | None:
    """--add_tokens / --new_tokenizer / --resize_vocab: a larger tokenizer and embeddings, before tokenizing the data."""
    if not (config.resize_vocab or config.add_tokens or config.new_tokenizer):
        return None
    tokenizer = extended_tokenizer(bundle.tokenizer, config.add_tokens, config.new_tokenizer)
    resize_for_tokenizer(bundle.model, bundle.tokenizer, tokenizer)
    record = vocabulary_record(bundle.tokenizer, tokenizer, config.add_tokens, config.new_tokenizer)
    bundle.tokenizer, bundle.template = tokenizer, get_template(config.template, tokenizer)
    return record


def with_data_lengths(config: GlmtuneConfig, bundle: ModelBundle, conversations: list[Conversation]) -> GlmtuneConfig:
    """--max_source_length/--max_target_length auto: the 99th percentile of the tokenized training data."""
    wanted = [name for name in ("max_source_length", "max_target_length") if getattr(config, name) == AUTO]
    if not wanted:
        return config
    sized = dict(zip(("max_source_length", "max_target_length"),
                     percentile_lengths(conversations, bundle.tokenizer, bundle.template)))
    console.print("[bold cyan]glmtune[/]: " + ", ".join(f"--{name} auto = {sized[name]}" for name in wanted)
                  + " tokens (99th percentile of the training data)")
    return dataclasses.replace(config, **{name: sized[name] for name in wanted})


def _sized_conversations(records: list) -> list[Conversation]:
    """What --max_source_length/--max_target_length auto are sized from: the conversations, or both sides of each pair."""
    if records and isinstance(records[0], PreferencePair):
        return [c for pair in records for c in (pair.chosen, pair.rejected)]
    return records


def _generation_metrics(bundle: ModelBundle, conversations: list[Conversation], config: GlmtuneConfig):
    from glmtune.eval.generation import generate_texts
    from glmtune.eval.metrics import compute_metrics
    from glmtune.recipes.predict import generation_settings

    prompts = prompts_for(bundle, conversations, config)
    labels = [c.turns[-1].answer for c in conversations]

    def measure(model) -> dict[str, float]:
        predictions, _ = generate_texts(model, bundle.tokenizer, prompts, generation_settings(config),
                                        config.per_device_eval_batch_size, show_progress=False)
        return compute_metrics(predictions, labels)

    return measure
