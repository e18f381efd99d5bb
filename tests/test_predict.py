"""glmtune predict / compare on tiny models: the seed's output files, trained weights from every kind of folder."""

import json
from pathlib import Path

import pytest

from glmtune.config import GlmtuneConfig
from glmtune.eval.metrics import compute_metrics
from glmtune.recipes.predict import run_compare, run_predict
from glmtune.recipes.train import run_train
from tiny_models import DEMO_TRAIN, train_tiny

DEMO_DEV = DEMO_TRAIN.with_name("demo_dev.jsonl")


def predict(output_dir: Path, **overrides) -> list[dict]:
    config = GlmtuneConfig(do_predict=True, test_file=str(DEMO_DEV), output_dir=str(output_dir),
                           max_predict_samples=5, max_new_tokens=8, per_device_eval_batch_size=2, **overrides)
    results = run_predict(config)
    lines = (output_dir / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    saved_results = json.loads((output_dir / "predict_results.json").read_text())
    assert saved_results == results
    return [json.loads(line) for line in lines]


def test_predict_writes_the_seed_files(tiny_llama, tmp_path):
    rows = predict(tmp_path / "base", model_name_or_path=str(tiny_llama))
    assert len(rows) == 5 and all(set(r) == {"labels", "predict"} for r in rows)
    dev = [json.loads(line) for line in DEMO_DEV.read_text(encoding="utf-8").splitlines()[:5]]
    assert [r["labels"] for r in rows] == [d["summary"] for d in dev]
    # labels are written unescaped, as the seed does
    assert "这" in (tmp_path / "base" / "generated_predictions.txt").read_text(encoding="utf-8")
    results = json.loads((tmp_path / "base" / "predict_results.json").read_text())
    assert {"predict_rouge-1", "predict_rouge-2", "predict_rouge-l", "predict_bleu-4", "predict_runtime",
            "predict_samples_per_second"} <= set(results)
    expected = compute_metrics([r["predict"] for r in rows], [r["labels"] for r in rows])
    assert results["predict_bleu-4"] == pytest.approx(expected["bleu-4"])


@pytest.mark.parametrize("method", ["lora", "ptuning", "freeze"])
def test_each_checkpoint_kind_changes_outputs(tiny_llama, tmp_path, method):
    output = train_tiny(tiny_llama, tmp_path / method, method, steps=6, save_steps=3, samples=16)
    base = [r["predict"] for r in predict(tmp_path / "p-base", model_name_or_path=str(tiny_llama))]
    from_adapter_flag = [r["predict"] for r in predict(tmp_path / "p-adapter", model_name_or_path=str(tiny_llama),
                                                        adapter_name_or_path=str(output / "checkpoint-3"))]
    # The ChatGLM-6B seed's way: the checkpoint folder as the model; its base comes from glmtune.json.
    from_checkpoint_as_model = [r["predict"] for r in predict(tmp_path / "p-ckpt", model_name_or_path=str(output / "checkpoint-3"))]
    assert from_adapter_flag != base
    assert from_checkpoint_as_model == from_adapter_flag
    if method == "ptuning":  # the ChatGLM2 seed's flag name
        assert [r["predict"] for r in predict(tmp_path / "p-pt", model_name_or_path=str(tiny_llama),
                                              ptuning_checkpoint=str(output / "checkpoint-3"))] == from_adapter_flag


def test_compare_writes_markdown_and_html(tiny_llama, tmp_path):
    output = train_tiny(tiny_llama, tmp_path / "lora", "lora", steps=6, save_steps=3, samples=16)
    config = GlmtuneConfig(model_name_or_path=str(tiny_llama), test_file=str(DEMO_DEV), output_dir=str(tmp_path / "cmp"),
                           max_predict_samples=3, max_new_tokens=6)
    text = run_compare(config, [str(output)], names=["before", "after"])
    markdown = (tmp_path / "cmp" / "compare.md").read_text(encoding="utf-8")
    html = (tmp_path / "cmp" / "compare.html").read_text(encoding="utf-8")
    first_prompt = json.loads(DEMO_DEV.read_text(encoding="utf-8").splitlines()[0])["content"]
    for document in (markdown, html, text):
        assert "before" in document and "after" in document and "rouge-1" in document
        assert first_prompt in document


def test_eval_during_training_logs_loss_and_metrics(tiny_llama, tmp_path):
    run_train(GlmtuneConfig(
        do_train=True, do_eval=True, model_name_or_path=str(tiny_llama), train_file=str(DEMO_TRAIN),
        validation_file=str(DEMO_DEV), max_eval_samples=6, eval_generate_samples=3, eval_steps=2, max_steps=4,
        save_steps=0, max_new_tokens=4, output_dir=str(tmp_path / "out"), report_to="none",
    ))
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    evaluations = [entry for entry in logged if "eval_loss" in entry]
    assert [e["step"] for e in evaluations] == [2, 4]
    assert all({"eval_rouge-1", "eval_bleu-4"} <= set(e) for e in evaluations)
