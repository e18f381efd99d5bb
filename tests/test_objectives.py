"""The training loop runs any objective, reads losses only at logging steps, and still stops on a NaN."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glmtune.config import GlmtuneConfig
from glmtune.data.preprocess import Example
from glmtune.errors import GlmtuneError
from glmtune.methods import get_method
from glmtune.train.objectives import SFTObjective, get_objective
from glmtune.train.trainer import DataOrder, train

EXAMPLES = [Example([2, 10 + i, 11 + i, 12, 13, 1][: 4 + i % 3], [-100, -100, 11 + i, 12, 13, 1][: 4 + i % 3]) for i in range(8)]


def setup(tiny_llama, tmp_path, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), finetuning_type="lora", lora_dropout=0.0, per_device_train_batch_size=2,
                  gradient_accumulation_steps=2, max_steps=4, learning_rate=1e-2, logging_steps=2, save_steps=0,
                  report_to="none", seed=3)
    config = GlmtuneConfig(**{**values, **overrides})
    torch.manual_seed(0)
    model = get_method("lora").apply(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32), config)
    return model, AutoTokenizer.from_pretrained(tiny_llama), config


def test_step_loss_is_the_token_weighted_mean_over_its_micro_batches(tiny_llama, tmp_path):
    model, tokenizer, config = setup(tiny_llama, tmp_path)
    objective = SFTObjective()
    order = DataOrder(len(EXAMPLES), 2, config.seed)
    micro_batches = [objective.collate([EXAMPLES[i] for i in order.batch(m)], tokenizer.pad_token_id) for m in (0, 1)]
    with torch.no_grad():
        sums = [objective.loss(model, batch)[0] for batch in micro_batches]
    units = [objective.units(batch) for batch in micro_batches]
    assert units[0] != units[1]  # otherwise a mean of means would pass too
    expected = float(sum(sums)) / sum(units)

    result = train(model, tokenizer, get_method("lora"), config, EXAMPLES)
    assert result.losses[0] == pytest.approx(expected, abs=1e-6)
    assert len(result.losses) == 4 and result.losses[-1] < result.losses[0]
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert logged[0]["loss"] == pytest.approx(sum(result.losses[:2]) / 2, abs=1e-6)


class CountingObjective:
    """SFT plus a metric (the number of label tokens, summed), and a NaN loss from a given call on."""

    name = "counting"

    def __init__(self, nan_from_call: int | None = None):
        self.sft, self.nan_from_call, self.calls = SFTObjective(), nan_from_call, []
        self.length, self.collate, self.units = self.sft.length, self.sft.collate, self.sft.units

    def loss(self, model, batch):
        loss, _ = self.sft.loss(model, batch)
        self.calls.append(1)
        if self.nan_from_call is not None and len(self.calls) >= self.nan_from_call:
            loss = loss * float("nan")
        return loss, {"ones": (batch["labels"][:, 1:] != -100).sum().float()}


def test_the_loop_logs_an_objectives_metrics_per_unit(tiny_llama, tmp_path):
    model, tokenizer, config = setup(tiny_llama, tmp_path)
    objective = CountingObjective()
    train(model, tokenizer, get_method("lora"), config, EXAMPLES, objective=objective)
    assert len(objective.calls) == 8  # 4 steps × 2 micro-batches
    logged = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [entry["ones"] for entry in logged] == pytest.approx([1.0, 1.0])  # summed over units, divided by units


def test_a_nan_between_logging_steps_stops_before_the_save_naming_its_step(tiny_llama, tmp_path):
    model, tokenizer, config = setup(tiny_llama, tmp_path, logging_steps=10, save_steps=3)
    objective = CountingObjective(nan_from_call=3)  # step 2's first micro-batch
    with pytest.raises(GlmtuneError, match=r"loss is nan at step 2;"):
        train(model, tokenizer, get_method("lora"), config, EXAMPLES, objective=objective)
    assert len(objective.calls) == 6  # found at step 3's save, not later
    assert not list((tmp_path / "out").glob("*checkpoint-*"))


def test_unknown_stage_is_a_one_line_error():
    assert get_objective("sft").name == "sft"
    with pytest.raises(GlmtuneError, match="--stage nonsense"):
        get_objective("nonsense")


class BackendRecordingObjective(SFTObjective):
    """SFT that records, at each step, whether PyTorch may pick cuDNN's attention kernel."""

    def __init__(self):
        super().__init__()
        self.cudnn_allowed = []

    def loss(self, model, batch):
        self.cudnn_allowed.append(torch.backends.cuda.cudnn_sdp_enabled())
        return super().loss(model, batch)


def test_training_steps_run_without_cudnn_attention_and_restore_the_flag(tiny_llama, tmp_path):
    model, tokenizer, config = setup(tiny_llama, tmp_path)
    objective = BackendRecordingObjective()
    torch.backends.cuda.enable_cudnn_sdp(True)
    train(model, tokenizer, get_method("lora"), config, EXAMPLES, objective=objective)
    assert objective.cudnn_allowed and not any(objective.cudnn_allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()
