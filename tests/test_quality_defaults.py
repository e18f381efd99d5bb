"""Defaults from issue #18: lengths sized from the data, the plain template for base models, per-method
learning rates, and --load_best_model_at_end."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glmtune.config import GlmtuneConfig, parse_config
from glmtune.data.formats import Conversation, Turn
from glmtune.data.preprocess import percentile_lengths
from glmtune.data.templates import get_template
from glmtune.errors import GlmtuneError
from glmtune.recipes.predict import UNCUT, UNTUNED_MAX_NEW_TOKENS, generation_lengths
from glmtune.recipes.train import run_train
from glmtune.train.best import BestWeights
from glmtune.train.checkpoint import read_run_record
from tiny_models import build_tokenizer, corpus_texts


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_texts())


def write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_length_flags_parse_auto_or_a_number():
    config = parse_config(["--max_target_length", "96"])
    assert (config.max_source_length, config.max_target_length) == ("auto", 96)
    with pytest.raises(GlmtuneError, match="--max_source_length must be a number of tokens or auto"):
        parse_config(["--max_source_length", "long"])
    with pytest.raises(GlmtuneError, match="--max_target_length must be at least 1"):
        GlmtuneConfig(max_target_length=0)


def test_learning_rate_and_prefix_length_default_per_method():
    assert GlmtuneConfig().learning_rate == 2e-3
    assert GlmtuneConfig(finetuning_type="ptuning").learning_rate == 5e-2
    assert GlmtuneConfig(finetuning_type="ptuning").pre_seq_len == 128
    assert GlmtuneConfig(finetuning_type="full").learning_rate == 5e-5
    assert GlmtuneConfig(finetuning_type="freeze").learning_rate == 2e-4
    # The seed's flags keep their meaning.
    seed = parse_config(["--pre_seq_len", "8", "--learning_rate", "2e-2", "--max_source_length", "64"])
    assert (seed.finetuning_type, seed.pre_seq_len, seed.learning_rate, seed.max_source_length) == ("ptuning", 8, 2e-2, 64)


def test_auto_template_is_plain_for_a_base_tokenizer_and_chat_with_a_chat_template(tokenizer):
    assert get_template("auto", tokenizer).name == "plain"
    with_chat = build_tokenizer(corpus_texts())
    with_chat.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert get_template("auto", with_chat).name == "chat"
    assert get_template("chatglm", tokenizer).name == "chatglm"


def test_percentile_lengths_count_prompt_with_bos_and_answer_with_eos(tokenizer):
    # plain template: "<bos>" + content + "\n" | summary + "<eos>"; one token per character.
    conversations = [Conversation([Turn("a" * n, "b" * (2 * n))]) for n in range(1, 201)]
    source, target = percentile_lengths(conversations, tokenizer, get_template("plain", tokenizer))
    # 99th percentile of 200 values, rounded up to a value present: the second longest (n = 199).
    assert (source, target) == (199 + 2, 2 * 199 + 1)
    assert percentile_lengths(conversations, tokenizer, get_template("plain", tokenizer), 100.0) == (202, 401)


def test_train_sizes_auto_lengths_from_the_data_and_predict_uses_them(tiny_llama, tmp_path, tokenizer):
    records = [{"content": "类型#裙" * (1 + i % 3), "summary": "复古的格调" * (1 + i % 4)} for i in range(12)]
    data = write(tmp_path / "train.jsonl", records)
    output = tmp_path / "run"
    run_train(GlmtuneConfig(do_train=True, model_name_or_path=str(tiny_llama), train_file=str(data), output_dir=str(output),
                            max_steps=1, save_steps=0, report_to="none"))
    trained = GlmtuneConfig(**read_run_record(output)["config"])
    # longest prompt: <bos> + 12 characters + "\n"; longest answer: 20 characters + <eos> (99th percentile of 12 = the max)
    assert (trained.max_source_length, trained.max_target_length) == (14, 21)
    assert trained.template == "auto" and read_run_record(output)["template"] == "plain"

    resolved = generation_lengths(GlmtuneConfig(), trained)
    assert (resolved.max_source_length, resolved.max_target_length) == (UNCUT, 21)
    assert generation_lengths(GlmtuneConfig(), None).max_target_length == UNTUNED_MAX_NEW_TOKENS
    assert generation_lengths(GlmtuneConfig(max_target_length=7), trained).max_target_length == 7


def test_best_weights_restores_the_lowest_loss_copy():
    layer = torch.nn.Linear(2, 2)
    trainable = dict(layer.named_parameters())
    best = BestWeights()
    best.observe(1, 0.5, trainable)
    kept = {name: p.detach().clone() for name, p in trainable.items()}
    with torch.no_grad():
        layer.weight.add_(1.0)
    best.observe(2, 0.7, trainable)  # worse: not kept
    assert best.restore(trainable, last_step=2)
    assert all(torch.equal(p, kept[name]) for name, p in trainable.items())
    assert not best.restore(trainable, last_step=1)  # the last step was the best: nothing to do


def test_load_best_model_at_end_keeps_the_lowest_validation_loss(tiny_llama, tmp_path):
    # Train answers and validation answers disagree, so validation loss rises once the model learns the training set.
    train = write(tmp_path / "train.jsonl", [{"content": f"类型#裙{i}", "summary": "复古复古复古"} for i in range(4)])
    dev = write(tmp_path / "dev.jsonl", [{"content": f"类型#裙{i}", "summary": "格调格调格调"} for i in range(4)])
    output = tmp_path / "run"
    result = run_train(GlmtuneConfig(
        do_train=True, do_eval=True, model_name_or_path=str(tiny_llama), train_file=str(train), validation_file=str(dev),
        output_dir=str(output), max_steps=6, eval_steps=2, save_steps=2, learning_rate=5e-2, lora_dropout=0.0,
        report_to="none",
    ))
    steps, losses = zip(*result.eval_losses)
    assert steps == (2, 4, 6)
    best_step = steps[losses.index(min(losses))]
    assert best_step < 6, result.eval_losses  # the data makes the last evaluation not the best
    final = load_file(str(output / "adapter_model.safetensors"))
    at_best = load_file(str(output / f"checkpoint-{best_step}" / "adapter_model.safetensors"))
    assert final.keys() == at_best.keys() and all(torch.equal(final[k], at_best[k]) for k in final)
    assert read_run_record(output)["best_step"] == best_step


def test_estimate_memory_asks_for_lengths_instead_of_guessing_auto():
    from glmtune.memory import estimate_for

    with pytest.raises(GlmtuneError, match="estimate-memory needs --max_source_length N and --max_target_length N"):
        estimate_for(GlmtuneConfig(max_source_length=64))


def test_predict_bans_repeated_4grams_by_default_and_chat_does_not():
    from glmtune.recipes.predict import generation_settings

    assert generation_settings(GlmtuneConfig(max_target_length=8)).no_repeat_ngram_size == 4
    assert generation_settings(GlmtuneConfig(max_target_length=8, no_repeat_ngram_size=0)).no_repeat_ngram_size == 0
    assert parse_config(["--no_repeat_ngram_size", "3"]).no_repeat_ngram_size == 3
    with pytest.raises(GlmtuneError, match="--no_repeat_ngram_size must be >= 0"):
        GlmtuneConfig(no_repeat_ngram_size=-1)
    with pytest.raises(GlmtuneError, match="--repetition_penalty must be"):
        parse_config(["--repetition_penalty", "0"])
    with pytest.raises(GlmtuneError, match="--top_k must be"):
        parse_config(["--top_k", "-1"])
