"""ChatGLM folders through glmtune's own jobs: train every method with the seed's flags, then predict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from _chatglm_reference import reference, requires_reference, write_model_folder
from glmtune.config import parse_config
from glmtune.recipes.predict import run_predict
from glmtune.recipes.train import run_train

pytestmark = requires_reference
TOKENIZER_FILE = {"v1": "ice_text.model", "v2": "tokenizer.model"}
RECORDS = [
    {"content": "类型#上衣*颜色#白色", "summary": "这款上衣干净百搭"},
    {"content": "hello world", "summary": "the quick brown fox"},
    {"content": "类型#裙*风格#复古", "summary": "复古的格调"},
    {"content": "a b c", "summary": "d e f g"},
]


def original_folder(root: Path, version: str) -> Path:
    """A folder laid out like THUDM/chatglm-6b or chatglm2-6b: config, weights, sentencepiece model."""
    folder = write_model_folder(root / f"chatglm-{version}", version, prefix=None)
    shutil.copy(reference(version).sp_model, folder / TOKENIZER_FILE[version])
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("adgen") / "train.json"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
    return path


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("method", ["ptuning", "lora", "freeze", "full"])
def test_seed_flags_train_and_predict(tmp_path, data_file, version, method):
    folder = original_folder(tmp_path, version)
    output = tmp_path / "out"
    flags = (f"--do_train --train_file {data_file} --validation_file {data_file} --prompt_column content "
             f"--response_column summary --overwrite_cache --model_name_or_path {folder} --output_dir {output} "
             "--overwrite_output_dir --max_source_length 16 --max_target_length 16 --per_device_train_batch_size 4 "
             "--per_device_eval_batch_size 2 --gradient_accumulation_steps 1 --predict_with_generate --max_steps 6 "
             f"--logging_steps 1 --save_steps 3 --learning_rate 5e-2 --pre_seq_len 4 --finetuning_type {method} "
             "--freeze_trainable_layers 1 --gradient_checkpointing --report_to none").split()
    result = run_train(parse_config(flags))
    assert result.losses[-1] < result.losses[0], result.losses
    assert (output / "checkpoint-3" / "glmtune.json").is_file()

    predict_flags = (f"--do_predict --test_file {data_file} --model_name_or_path {output / 'checkpoint-6'} "
                     f"--output_dir {output} --max_source_length 16 --max_target_length 6 "
                     "--per_device_eval_batch_size 2 --predict_with_generate --pre_seq_len 4").split()
    results = run_predict(parse_config(predict_flags))
    lines = (output / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(RECORDS) and results["predict_samples"] == len(RECORDS)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_seed_prefix_checkpoint_loads_as_ptuning_checkpoint(tmp_path, data_file, version):
    """A seed run's checkpoint-3000/pytorch_model.bin holds only the prefix encoder; --ptuning_checkpoint loads it."""
    from safetensors.torch import load_file

    folder = original_folder(tmp_path, version)
    seed_checkpoint = tmp_path / "checkpoint-3000"
    seed_checkpoint.mkdir()
    prefix = load_file(str(reference(version).directory / "prefix_encoder_noproj.safetensors"))
    torch.save(prefix, seed_checkpoint / "pytorch_model.bin")
    flags = (f"--do_predict --test_file {data_file} --model_name_or_path {folder} --ptuning_checkpoint {seed_checkpoint} "
             f"--output_dir {tmp_path / 'pred'} --max_source_length 16 --max_target_length 6 --pre_seq_len 4").split()
    with_prefix = run_predict(parse_config(flags))
    base_flags = (f"--do_predict --test_file {data_file} --model_name_or_path {folder} "
                  f"--output_dir {tmp_path / 'base'} --max_source_length 16 --max_target_length 6").split()
    run_predict(parse_config(base_flags))
    prefixed = (tmp_path / "pred" / "generated_predictions.txt").read_text(encoding="utf-8")
    base = (tmp_path / "base" / "generated_predictions.txt").read_text(encoding="utf-8")
    assert with_prefix["predict_samples"] == len(RECORDS)
    assert prefixed != base
