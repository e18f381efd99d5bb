"""Predict and compare recipes: generate for a data file, score like THUDM's compute_metrics, report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.console import Console

from glmtune.config import AUTO, GlmtuneConfig
from glmtune.data.formats import has_answer
from glmtune.errors import GlmtuneError
from glmtune.eval.generation import GenerationSettings, generate_texts
from glmtune.eval.metrics import compute_metrics
from glmtune.eval.report import ComparisonExample, RunResult, format_comparison_text, write_comparison
from glmtune.files import prepare_output_dir, read_run_record
from glmtune.methods.loading import ModelBundle, load_for_inference
from glmtune.recipes.common import prompts_for, read_data

console = Console(stderr=True)


# Generation budget without a trained run to take the answer length from (an untuned base model).
UNTUNED_MAX_NEW_TOKENS = 128
UNCUT = 1 << 30


def generation_lengths(config: GlmtuneConfig, trained: GlmtuneConfig | None) -> GlmtuneConfig:
    """Resolve auto lengths for generation: prompts are not cut; answers get the trained run's
    --max_target_length (what the model learned to stop within), else UNTUNED_MAX_NEW_TOKENS."""
    source = UNCUT if config.max_source_length == AUTO else config.max_source_length
    target = config.max_target_length
    if target == AUTO:
        learned = trained.max_target_length if trained else AUTO
        target = UNTUNED_MAX_NEW_TOKENS if learned == AUTO else learned
    return dataclasses.replace(config, max_source_length=source, max_target_length=target)


PREDICT_NO_REPEAT_NGRAM_SIZE = 4
"""predict/compare's default --no_repeat_ngram_size: on ADGEN dev it lifted P-Tuning v2 by 1-4 points on every metric
and kept LoRA within noise (benchmarks/QUALITY.md); chat and serve leave it off."""


def generation_settings(config: GlmtuneConfig) -> GenerationSettings:
    ngram = PREDICT_NO_REPEAT_NGRAM_SIZE if config.no_repeat_ngram_size is None else config.no_repeat_ngram_size
    return GenerationSettings(
        max_new_tokens=config.max_new_tokens or config.max_target_length, do_sample=config.do_sample,
        top_p=config.top_p, temperature=config.temperature, num_beams=config.num_beams, seed=config.seed,
        repetition_penalty=config.repetition_penalty, top_k=config.top_k, no_repeat_ngram_size=ngram,
        compile_steps=config.compile_generation,
    )


def _predict_with(bundle: ModelBundle, conversations, config: GlmtuneConfig) -> tuple[list[str], float]:
    config = generation_lengths(config, bundle.trained_config)
    prompts = prompts_for(bundle, conversations, config)
    return generate_texts(bundle.model, bundle.tokenizer, prompts, generation_settings(config), config.per_device_eval_batch_size)


def run_predict(config: GlmtuneConfig) -> dict:
    """Write generated_predictions.txt (the seed's format) and predict_results.json to --output_dir."""
    data_file = config.test_file or config.validation_file
    if not data_file:
        raise GlmtuneError("predict needs --test_file (or --validation_file)")
    conversations = read_data(data_file, config, config.max_predict_samples, require_response=False)
    output_dir = prepare_output_dir(config.output_dir)  # before generating, which may take hours
    bundle = load_for_inference(config)
    predictions, seconds = _predict_with(bundle, conversations, config)
    labels = [c.turns[-1].answer for c in conversations]
    lines = "".join(json.dumps({"labels": l, "predict": p}, ensure_ascii=False) + "\n" for l, p in zip(labels, predictions))
    (output_dir / "generated_predictions.txt").write_text(lines, encoding="utf-8")
    if any(has_answer(c) for c in conversations):
        results = {f"predict_{k}": v for k, v in compute_metrics(predictions, labels).items()}
    else:  # prompts without answers: nothing to score against, and scores of 0 would be a wrong result
        console.print(f"[bold yellow]glmtune[/]: {data_file} has no answers; predictions written, not scored")
        results = {}
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
    if config.max_target_length == AUTO and tuned and read_run_record(tuned[0]):
        # The base model gets the same answer budget as the first tuned run, so the rows compare like for like.
        first = GlmtuneConfig(**read_run_record(tuned[0])["config"])
        config = dataclasses.replace(config, max_target_length=first.max_target_length)
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
