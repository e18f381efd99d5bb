"""Each method trains, checkpoints hold only trained tensors, resume is exact, P-Tuning works with checkpointing."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.recipes.train import run_train

REPEATED_BATCH = [
    {"content": "类型#上衣*颜色#白色", "summary": "这款上衣干净百搭"},
    {"content": "类型#裙*风格#复古", "summary": "复古的格调散发怀旧气息"},
    {"content": "类型#裤*版型#宽松", "summary": "宽松的版型遮肉又舒适"},
    {"content": "类型#外套*图案#刺绣", "summary": "精致的刺绣彰显时尚"},
]


@pytest.fixture(scope="module")
def four_records(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "four.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in REPEATED_BATCH), encoding="utf-8")
    return path


def config_for(model: Path, data: Path, output: Path, method: str, **overrides) -> GlmtuneConfig:
    values = dict(
        do_train=True, model_name_or_path=str(model), train_file=str(data), output_dir=str(output),
        finetuning_type=method, pre_seq_len=4, freeze_trainable_layers=1, per_device_train_batch_size=4, max_steps=8, learning_rate=1e-2,
        logging_steps=1, save_steps=4, report_to="none", seed=7, lora_dropout=0.0,
    )
    values.update(overrides)
    return GlmtuneConfig(**values)


EXPECTED_FILES = {
    "lora": {"adapter_model.safetensors", "adapter_config.json"},
    "ptuning": {"prefix_encoder.safetensors"},
    "freeze": {"trainable_params.safetensors"},
    "full": {"model.safetensors", "config.json"},
}


@pytest.mark.parametrize("method", ["lora", "ptuning", "freeze", "full"])
def test_method_trains_and_checkpoints_only_what_it_trains(tiny_model, four_records, tmp_path, method):
    # A prefix moves a random tiny model's logits only a little, so P-Tuning gets a larger step.
    learning_rate = 0.2 if method == "ptuning" else 1e-2
    result = run_train(config_for(tiny_model, four_records, tmp_path / method, method, learning_rate=learning_rate))
    assert len(result.losses) == 8
    assert result.losses[-1] < result.losses[0] - 0.05, result.losses

    checkpoint = tmp_path / method / "checkpoint-4"
    names = {p.name for p in checkpoint.iterdir()}
    assert EXPECTED_FILES[method] <= names
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pt", "trainer_state.json", "glmtune.json"} <= names
    weight_files = {n for n in names if n.endswith(".safetensors")}
    saved = {}
    for name in weight_files:
        saved.update(load_file(str(checkpoint / name)))
    base_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model).parameters())
    saved_parameters = sum(t.numel() for t in saved.values())
    if method == "full":
        assert saved_parameters >= base_parameters - 10_000  # tied embeddings are stored once
    else:
        assert 0 < saved_parameters < base_parameters / 3
    if method == "freeze":
        assert all(".layers.1.mlp." in name for name in saved), sorted(saved)
    if method == "ptuning":
        assert all(name.startswith("prefix_encoder.") for name in saved)


def test_lora_output_loads_through_peft(tiny_llama, four_records, tmp_path):
    from peft import PeftModel

    run_train(config_for(tiny_llama, four_records, tmp_path / "out", "lora", max_steps=5))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    inputs = torch.tensor([[2, 10, 11, 12]])
    before = base(inputs).logits
    tuned = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    assert not torch.allclose(tuned(inputs).logits, before, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_resume_gives_the_same_losses(tiny_llama, four_records, tmp_path, method):
    # Dropout on and micro-batches of 2 from a shuffled order: resume must restore RNG and data position.
    options = dict(max_steps=6, save_steps=3, lora_dropout=0.1, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    uninterrupted = run_train(config_for(tiny_llama, four_records, tmp_path / "a", method, **options))
    # checkpoint-3 is exactly what a run stopped after step 3 leaves behind.
    resumed = run_train(config_for(tiny_llama, four_records, tmp_path / "b", method,
                                   resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3"), **options))
    assert len(resumed.losses) == 3
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], abs=1e-6)
    finished = run_train(config_for(tiny_llama, four_records, tmp_path / "a", method, resume_from_checkpoint="latest", **options))
    assert finished.losses == []


def test_nan_loss_stops_with_the_step(tiny_llama, four_records, tmp_path):
    import shutil

    from safetensors.torch import save_file

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_llama, corrupt)
    weights = load_file(str(corrupt / "model.safetensors"))
    weights["model.norm.weight"][0] = float("nan")
    save_file(weights, str(corrupt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GlmtuneError, match=r"loss is nan at step 1"):
        run_train(config_for(corrupt, four_records, tmp_path / "nan", "lora", max_steps=3))


def test_nonempty_output_dir_needs_overwrite(tiny_llama, four_records, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(GlmtuneError, match="not empty"):
        run_train(config_for(tiny_llama, four_records, tmp_path / "busy", "lora"))
