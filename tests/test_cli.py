"""The glmtune command as users run it: the seed's scripts, YAML configs, one-line errors."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from glmtune.config import parse_config
from glmtune.errors import GlmtuneError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "src" / "glmtune" / "demo_data"


def glmtune(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_seed_flags_parse_verbatim():
    seed_flags = ("--do_train --train_file AdvertiseGen/train.json --validation_file AdvertiseGen/dev.json "
                  "--prompt_column content --response_column summary --overwrite_cache --model_name_or_path THUDM/chatglm-6b "
                  "--output_dir output/adgen-chatglm-6b-pt-8-1e-2 --overwrite_output_dir --max_source_length 64 "
                  "--max_target_length 64 --per_device_train_batch_size 1 --per_device_eval_batch_size 1 "
                  "--gradient_accumulation_steps 16 --predict_with_generate --max_steps 3000 --logging_steps 10 "
                  "--save_steps 1000 --learning_rate 1e-2 --pre_seq_len 8 --quantization_bit 4").split()
    config = parse_config(seed_flags)
    assert config.finetuning_type == "ptuning" and config.pre_seq_len == 8 and config.quantization_bit == 4
    assert config.gradient_accumulation_steps == 16 and config.learning_rate == 1e-2 and config.overwrite_output_dir
    assert parse_config(["--do_train"]).finetuning_type == "lora"


def test_yaml_config_with_flag_override():
    config = parse_config(["--config", str(REPO / "examples" / "ptuning.yaml"), "--max_steps", "5"])
    assert config.finetuning_type == "ptuning" and config.pre_seq_len == 128 and config.max_steps == 5
    assert config.learning_rate == 5e-2 and config.max_source_length == "auto"
    with pytest.raises(GlmtuneError, match="unknown arguments: --bogus"):
        parse_config(["--bogus", "1"])


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_broken_json_line_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "a", "summary": "b"}\n{"content": "a", "summary": \n', encoding="utf-8")
    line = one_error_line(glmtune("train", "--train_file", bad, "--output_dir", tmp_path / "out"))
    assert line.startswith("error: ") and "bad.jsonl:2: not valid JSON" in line


def test_missing_column_is_one_line_error(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"content": "a", "summary": "b"}, {"content": "a"}]), encoding="utf-8")
    line = one_error_line(glmtune("train", "--train_file", bad, "--output_dir", tmp_path / "out"))
    assert "bad.json:record 2: missing key 'summary'" in line


def test_seed_train_and_evaluate_scripts_run(tiny_llama, tmp_path):
    data = tmp_path / "AdvertiseGen"
    data.mkdir()
    shutil.copy(DEMO / "demo_train.jsonl", data / "train.json")
    shutil.copy(DEMO / "demo_dev.jsonl", data / "dev.json")
    env = {**os.environ, "DATA": str(data), "MODEL": str(tiny_llama)}
    train = subprocess.run(["bash", str(REPO / "examples" / "train.sh"), "--max_steps", "2", "--save_steps", "1",
                            "--output_dir", str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (tmp_path / "out" / "checkpoint-2" / "prefix_encoder.safetensors").is_file()
    evaluate = subprocess.run(["bash", str(REPO / "examples" / "evaluate.sh"), "--model_name_or_path", str(tmp_path / "out" / "checkpoint-2"),
                               "--output_dir", str(tmp_path / "out"), "--max_predict_samples", "3", "--max_new_tokens", "4"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    predictions = (tmp_path / "out" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()
    assert len(predictions) == 3 and set(json.loads(predictions[0])) == {"labels", "predict"}
