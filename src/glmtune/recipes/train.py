"""The train recipe: load, read data, apply the method, run the loop, save."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from transformers import set_seed

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods import get_method
from glmtune.recipes.common import load_base, read_data, training_examples
from glmtune.train.trainer import TrainResult, check_output_dir, train

console = Console(stderr=True)


def run_train(config: GlmtuneConfig) -> TrainResult:
    if not config.train_file:
        raise GlmtuneError("--train_file is required for training")
    check_output_dir(config)
    set_seed(config.seed)
    bundle = load_base(config, config.model_name_or_path)
    train_examples = training_examples(bundle, read_data(config.train_file, config, config.max_train_samples), config)
    eval_examples = None
    if config.do_eval:
        if not config.validation_file:
            raise GlmtuneError("--do_eval needs --validation_file")
        eval_examples = training_examples(bundle, read_data(config.validation_file, config, config.max_eval_samples), config)
    method = get_method(config.finetuning_type)
    model = method.apply(bundle.model, config)
    trainable = sum(p.numel() for p in method.trainable_parameters(model).values())
    total = sum(p.numel() for p in model.parameters())
    console.print(
        f"[bold cyan]glmtune[/]: {method.name} on {len(train_examples)} examples, "
        f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.3f}%)"
    )
    base_model = config.model_name_or_path
    if base_model and Path(base_model).exists():
        base_model = str(Path(base_model).resolve())
    record = {"base_model": base_model, "template": bundle.template.name}
    result = train(model, bundle.tokenizer, method, config, train_examples, eval_examples, record)
    final = f" (final loss {result.losses[-1]:.4f})" if result.losses else " (nothing left to train)"
    console.print(f"[bold cyan]glmtune[/]: saved to {result.output_dir}{final}")
    return result
