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
from glmtune.recipes.common import ModelBundle, load_base, prompts_for, read_data, training_examples
from glmtune.train.distributed import process_group
from glmtune.train.trainer import TrainResult, check_output_dir, train

console = Console(stderr=True)


def run_train(config: GlmtuneConfig) -> TrainResult:
    if not config.train_file:
        raise GlmtuneError("--train_file is required for training")
    group = process_group()
    if group.is_main:
        check_output_dir(config)
    set_seed(config.seed)
    if config.do_eval and not config.validation_file:
        raise GlmtuneError("--do_eval needs --validation_file")
    # Data first: a bad record should fail in a second, not after the model has loaded.
    train_conversations = read_data(config.train_file, config, config.max_train_samples)
    eval_conversations = read_data(config.validation_file, config, config.max_eval_samples) if config.do_eval else None
    bundle = load_base(config, config.model_name_or_path)
    config = with_data_lengths(config, bundle, train_conversations)
    train_examples = training_examples(bundle, train_conversations, config)
    eval_examples = training_examples(bundle, eval_conversations, config) if eval_conversations else None
    method = get_method(config.finetuning_type)
    model = method.apply(bundle.model, config)
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    total = parameter_count(model)
    console.quiet = not group.is_main  # one process talks
    console.print(
        f"[bold cyan]glmtune[/]: {method.name} on {len(train_examples)} examples, "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%)"
    )
    base_model = config.model_name_or_path
    if base_model and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    record = {"base_model": base_model, "template": bundle.template.name}
    generation_metrics = None
    if eval_conversations and config.eval_generate_samples:
        generation_metrics = _generation_metrics(bundle, eval_conversations[: config.eval_generate_samples], config)
    result = train(model, bundle.tokenizer, method, config, train_examples, eval_examples, record, generation_metrics)
    final = f" (final loss {result.losses[-1]:.4f})" if result.losses else " (nothing left to train)"
    console.print(f"[bold cyan]glmtune[/]: saved to {result.output_dir}{final}")
    return result


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
