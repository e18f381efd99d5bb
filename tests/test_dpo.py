"""--stage dpo: preference data, the losses against TRL's published formulas, and training through the loop."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmtune.data.preference import preference_examples, read_preference_pairs
from glmtune.data.templates import Template
from glmtune.errors import GlmtuneError
from glmtune.models.loading import load_tokenizer
from glmtune.train.objectives.dpo import DPOObjective, answer_logps, frozen_copy_reference

PAIRS = [
    {"prompt": "类型#裙*风格#复古", "chosen": "复古的格调散发怀旧气息", "rejected": "这款上衣干净百搭"},
    {"conversations": [{"from": "human", "value": "类型#裤*版型#宽松"}],
     "chosen": {"from": "gpt", "value": "宽松的版型遮肉又舒适"}, "rejected": {"from": "gpt", "value": "精致的刺绣"}},
    {"instruction": "写一句广告", "input": "类型#外套*图案#刺绣", "chosen": "精致的刺绣彰显时尚", "rejected": "宽松"},
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def test_reads_prompt_sharegpt_ranking_and_alpaca_ranking_records(tmp_path):
    pairs = read_preference_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIRS))
    assert [p.chosen.turns[-1].query for p in pairs] == ["类型#裙*风格#复古", "类型#裤*版型#宽松", "写一句广告\n类型#外套*图案#刺绣"]
    assert [p.rejected.turns[-1].answer for p in pairs] == ["这款上衣干净百搭", "精致的刺绣", "宽松"]
    assert all(p.chosen.turns[-1].query == p.rejected.turns[-1].query for p in pairs)


@pytest.mark.parametrize("record, message", [
    ({"prompt": "q", "chosen": "a"}, "missing key 'rejected'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "chosen": "a", "rejected": "b"},
     "must end with the human turn"),
    ({"chosen": "a", "rejected": "b"}, "needs 'prompt'"),
    ({"prompt": "q", "chosen": {"from": "human", "value": "a"}, "rejected": "b"}, "gpt/assistant message"),
])
def test_bad_preference_records_name_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [PAIRS[0], record])
    with pytest.raises(GlmtuneError, match=rf"bad.jsonl:2: .*{message}"):
        read_preference_pairs(path)
    assert len(read_preference_pairs(path, skip_bad_records=True)) == 1


@pytest.fixture(scope="module")
def tiny_batch(tiny_llama, tmp_path_factory):
    tokenizer = load_tokenizer(str(tiny_llama))
    pairs = read_preference_pairs(write_jsonl(tmp_path_factory.mktemp("pairs") / "p.jsonl", PAIRS))
    examples = preference_examples(pairs, tokenizer, Template("chatglm"), 32, 32)
    return examples, tokenizer.pad_token_id


def naive_logps(model, input_ids, labels):
    """Every position's logits, then the labelled next tokens' log-probabilities summed per row."""
    logits = model(input_ids=input_ids).logits.float().log_softmax(-1)[:, :-1]
    targets = labels[:, 1:]
    mask = targets != -100
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def test_answer_logps_match_full_logits_and_carry_gradients(tiny_llama, tiny_batch):
    examples, pad = tiny_batch
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    batch = DPOObjective().collate(examples, pad)
    fast, counts = answer_logps(model, batch["input_ids"], batch["labels"], chunk_rows=5)
    slow, slow_counts = naive_logps(model, batch["input_ids"], batch["labels"])
    assert torch.equal(counts, slow_counts) and counts.min() > 0
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-5)
    fast.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def trl_formula(loss_type, beta, gamma, pc, pr, rc, rr):
    """TRL's published per-pair losses (DPOTrainer.dpo_loss, CPOTrainer simpo, ORPOTrainer odds_ratio_loss
    plus the chosen NLL), in plain Python; pc/pr/rc/rr are sums for sigmoid, per-token means otherwise."""
    if loss_type == "sigmoid":
        return -log_sigmoid(beta * ((pc - pr) - (rc - rr))), beta * (pc - rc), beta * (pr - rr)
    if loss_type == "ipo":
        return ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)
    if loss_type == "simpo":
        return -log_sigmoid(beta * (pc - pr) - gamma), beta * pc, beta * pr
    log_odds = (pc - pr) - (math.log(1 - math.exp(pc)) - math.log(1 - math.exp(pr)))
    return -pc - beta * log_sigmoid(log_odds), beta * pc, beta * pr


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "orpo", "simpo"])
def test_loss_and_rewards_equal_trl_formulas(tiny_llama, tiny_batch, loss_type):
    examples, pad = tiny_batch
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    reference = copy.deepcopy(policy)
    with torch.no_grad():  # a policy that has moved away from its reference
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    beta, gamma = 0.3, 0.7
    objective = DPOObjective(loss_type, beta, gamma, frozen_copy_reference(reference))
    batch = objective.collate(examples, pad)
    loss, metrics = objective.loss(policy, batch)

    with torch.no_grad():
        policy_logps, counts = naive_logps(policy, batch["input_ids"], batch["labels"])
        reference_logps, _ = naive_logps(reference, batch["input_ids"], batch["labels"])
    if loss_type != "sigmoid":
        policy_logps, reference_logps = policy_logps / counts, reference_logps / counts
    n = len(examples)
    expected = [trl_formula(loss_type, beta, gamma, float(policy_logps[i]), float(policy_logps[n + i]),
                            float(reference_logps[i]), float(reference_logps[n + i])) for i in range(n)]
    assert objective.units(batch) == n
    assert loss.item() == pytest.approx(sum(e[0] for e in expected), rel=1e-4)
    assert metrics["rewards/chosen"].item() == pytest.approx(sum(e[1] for e in expected), rel=1e-4, abs=1e-5)
    assert metrics["rewards/rejected"].item() == pytest.approx(sum(e[2] for e in expected), rel=1e-4, abs=1e-5)
    assert metrics["rewards/margins"].item() == pytest.approx(sum(e[1] - e[2] for e in expected), rel=1e-4, abs=1e-5)
    assert metrics["rewards/accuracies"].item() == sum(e[1] > e[2] for e in expected)
    loss.backward()
    assert all(p.grad is None for p in reference.parameters())


def test_precomputed_reference_gives_the_same_loss(tiny_llama, tiny_batch):
    examples, pad = tiny_batch
    examples = copy.deepcopy(examples)
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama)
    reference = copy.deepcopy(policy)
    objective = DPOObjective("sigmoid", 0.1, reference=frozen_copy_reference(reference))
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    live, _ = objective.loss(policy, objective.collate(examples, pad))
    objective.precompute_reference(policy, examples, pad, batch_size=2, autocast=torch.autocast("cpu", enabled=False))
    assert all(e.reference_logps is not None for e in examples)
    batch = objective.collate(examples, pad)
    assert "reference_logps" in batch
    stored, _ = DPOObjective("sigmoid", 0.1).loss(policy, batch)  # no reference model at all
    assert stored.item() == pytest.approx(live.item(), rel=1e-5)


def dpo_config(model: Path, data: Path, output: Path, method: str, **overrides):
    from glmtune.config import GlmtuneConfig

    values = dict(do_train=True, model_name_or_path=str(model), train_file=str(data), output_dir=str(output), stage="dpo",
                  finetuning_type=method, pre_seq_len=4, freeze_trainable_layers=1, per_device_train_batch_size=2,
                  max_steps=6, learning_rate=1e-2, logging_steps=1, save_steps=3, report_to="none", seed=3,
                  lora_dropout=0.0, max_source_length=32, max_target_length=32)
    values.update(overrides)
    return GlmtuneConfig(**values)


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo") / "pairs.jsonl", PAIRS + PAIRS[:1])


def read_log(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, options", [
    ("lora", {}),                                   # reference: the adapter switched off
    ("ptuning", {"learning_rate": 0.2}),            # reference: the model without its prefix
    ("freeze", {}),                                 # reference: a frozen copy
    ("full", {"precompute_ref_logps": True}),       # reference: log-probs computed before training
    ("lora", {"pref_loss": "simpo"}),               # reference-free
    ("lora", {"pref_loss": "orpo"}),
    ("lora", {"pref_loss": "ipo"}),
])
def test_dpo_trains_each_method_and_logs_rewards(tiny_llama, pair_file, tmp_path, method, options):
    from glmtune.recipes.train import run_train

    result = run_train(dpo_config(tiny_llama, pair_file, tmp_path / "out", method, **options))
    log = read_log(tmp_path / "out")
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"} <= set(log[0])
    if options.get("pref_loss", "sigmoid") == "sigmoid" and method != "ptuning":
        # Before the first update the policy is its reference: DPO's loss is log 2 and every reward 0.
        assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
        assert log[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert result.losses[-1] < result.losses[0]
    assert log[-1]["rewards/margins"] > log[0]["rewards/margins"]
    assert log[-1]["rewards/accuracies"] > 0.5


def test_dpo_resume_gives_the_same_losses(tiny_llama, pair_file, tmp_path):
    from glmtune.recipes.train import run_train

    uninterrupted = run_train(dpo_config(tiny_llama, pair_file, tmp_path / "a", "lora"))
    resumed = run_train(dpo_config(tiny_llama, pair_file, tmp_path / "b", "lora",
                                   resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3")))
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], abs=1e-6)


def test_dpo_eval_logs_held_out_rewards(tiny_llama, pair_file, tmp_path):
    from glmtune.recipes.train import run_train

    run_train(dpo_config(tiny_llama, pair_file, tmp_path / "out", "lora", do_eval=True, validation_file=str(pair_file),
                         eval_steps=3))
    evaluations = [entry for entry in read_log(tmp_path / "out") if "eval_loss" in entry]
    assert len(evaluations) == 2
    assert evaluations[-1]["eval_rewards/accuracies"] >= 0.5
    assert evaluations[-1]["eval_rewards/margins"] > evaluations[0]["eval_rewards/margins"]
