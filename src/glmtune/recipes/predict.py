"""Predict and compare recipes: generate for a data file, score like THUDM's compute_metrics, report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.eval.generation import GenerationSettings, generate_texts
from glmtune.eval.metrics import compute_metrics
from glmtune.eval.report import ComparisonExample, RunResult, format_comparison_text, write_comparison
from glmtune.recipes.common import ModelBundle, load_for_inference, prompts_for, read_data

console = Console(stderr=True)


def generation_settings(config: GlmtuneConfig) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens or config.max_target_length, do_sample=config.do_sample,
        top_p=config.top_p, temperature=config.temperature, num_beams=config.num_beams, seed=config.seed,
        repetition_penalty=config.repetition_penalty, top_k=config.top_k, no_repeat_ngram_size=config.no_repeat_ngram_size,
    )


def _predict_with(bundle: ModelBundle, conversations, config: GlmtuneConfig) -> tuple[list[str], float]:
    prompts = prompts_for(bundle, conversations, config)
    return generate_texts(bundle.model, bundle.tokenizer, prompts, generation_settings(config), config.per_device_eval_batch_size)


def run_predict(config: GlmtuneConfig) -> dict:
    """Write generated_predictions.txt (the seed's format) and predict_results.json to --output_dir."""
    data_file = config.test_file or config.validation_file
    if not data_file:
        raise GlmtuneError("predict needs --test_file (or --validation_file)")
    conversations = read_data(data_file, config, config.max_predict_samples, require_response=False)
    bundle = load_for_inference(config)
    predictions, seconds = _predict_with(bundle, conversations, config)
    labels = [c.turns[-1].answer for c in conversations]
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"labels": l, "predict": p}, ensure_ascii=False) + "\n" for l, p in zip(labels, predictions))
    (output_dir / "generated_predictions.txt").write_text(lines, encoding="utf-8")
    results = {f"predict_{k}": v for k, v in compute_metrics(predictions, labels).items()}
    results.update(predict_runtime=round(seconds, 4), predict_samples=len(predictions),
                   predict_samples_per_second=round(len(predictions) / seconds, 3))
    (output_dir / "predict_results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    console.print(f"[bold cyan]glmtune[/]: {json.dumps(results, ensure_ascii=False)}")
    return results


def run_compare(config: GlmtuneConfig, tuned: list[str], names: list[str] | None = None) -> str:
    """Base model and each tuned output on the same prompts; writes compare.md/.html, returns the text table."""
    data_file = config.test_file or config.validation_file
    if not data_file:
        raise GlmtuneError("compare needs --test_file (or --validation_file)")
    conversations = read_data(data_file, config, config.max_predict_samples)
    labels = [c.turns[-1].answer for c in conversations]
    names = names or ["base"] + [Path(t).name for t in tuned]
    runs = []
    for name, adapter in zip(names, [None] + tuned):
        run_config = dataclasses.replace(config, adapter_name_or_path=adapter, ptuning_checkpoint=None)
        console.print(f"[bold cyan]glmtune[/]: generating with {name}")
        bundle = load_for_inference(run_config)
        predictions, seconds = _predict_with(bundle, conversations, run_config)
        runs.append(RunResult(name, compute_metrics(predictions, labels), predictions, len(predictions) / seconds))
    examples = [ComparisonExample(c.turns[-1].query, label) for c, label in zip(conversations, labels)]
    markdown, html = write_comparison(config.output_dir, runs, examples)
    console.print(f"[bold cyan]glmtune[/]: wrote {markdown} and {html}")
    return format_comparison_text(runs, examples)
