"""Issue #19: every bad input gives one line naming the flag/file/line, or the right result; checkpoints run no
code, never cross runs, and a kill -9 anywhere leaves a complete output or one a rerun repairs.

CPU, tiny models. The API cases live with the API's tests.
"""

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from glmtune.cli import known_failure
from glmtune.config import GlmtuneConfig, parse_config
from glmtune.data.formats import FormatOptions, read_conversations
from glmtune.errors import GlmtuneError
from glmtune.recipes.predict import run_predict
from glmtune.recipes.train import run_train
from glmtune.files import OUTPUT_TEMPORARY, read_run_record

TESTS = Path(__file__).resolve().parent
RECORDS = [
    {"content": "类型#上衣*颜色#白色", "summary": "这款上衣干净百搭"},
    {"content": "类型#裙*风格#复古", "summary": "复古的格调散发怀旧气息"},
    {"content": "类型#裤*版型#宽松", "summary": "宽松的版型遮肉又舒适"},
    {"content": "类型#外套*图案#刺绣", "summary": "精致的刺绣彰显时尚"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "four.jsonl", RECORDS)


def config(model: Path, data: Path, output: Path, **overrides) -> GlmtuneConfig:
    values = dict(do_train=True, model_name_or_path=str(model), train_file=str(data), output_dir=str(output),
                  finetuning_type="lora", per_device_train_batch_size=2, max_steps=2, save_steps=0, logging_steps=1,
                  learning_rate=1e-2, lora_dropout=0.0, report_to="none", seed=3)
    return GlmtuneConfig(**{**values, **overrides})


# ---- flags: one line naming the flag and the allowed range, at parse time ----

BAD_FLAGS = [
    ("--learning_rate -1", "--learning_rate must be > 0"),
    ("--learning_rate nan", "--learning_rate must be > 0"),
    ("--per_device_train_batch_size 0", "--per_device_train_batch_size must be >= 1"),
    ("--per_device_train_batch_size -1", "--per_device_train_batch_size must be >= 1"),
    ("--per_device_eval_batch_size 0", "--per_device_eval_batch_size must be >= 1"),
    ("--lora_rank 0", "--lora_rank must be >= 1"),
    ("--pre_seq_len -1", "--pre_seq_len must be >= 1"),
    ("--logging_steps 0", "--logging_steps must be >= 1"),
    ("--seed -1", r"--seed must be in \[0, 2\*\*32\)"),
    ("--lr_scheduler_type bogus", "--lr_scheduler_type must be one of linear, cosine"),
    ("--lr_scheduler_type reduce_lr_on_plateau", "--lr_scheduler_type must be one of"),
    ("--lora_dropout 1.5", r"--lora_dropout must be in \[0, 1\)"),
    ("--lora_dropout 1", r"--lora_dropout must be in \[0, 1\)"),
    ("--gradient_accumulation_steps 0", "--gradient_accumulation_steps must be >= 1"),
    ("--max_grad_norm -1", "--max_grad_norm must be >= 0"),
    ("--save_steps -1", "--save_steps must be >= 0"),
    ("--save_total_limit -1", "--save_total_limit must be >= 1"),
    ("--save_total_limit 0", "--save_total_limit must be >= 1"),
    ("--max_steps 0", "--max_steps must be >= 1, or -1"),
    ("--num_train_epochs 0", "--num_train_epochs must be > 0"),
    ("--warmup_steps -3", "--warmup_steps must be >= 0"),
    ("--top_p 1.5", r"--top_p must be in \(0, 1\]"),
    ("--num_beams 0", "--num_beams must be >= 1"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[f for f, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_naming_it(flags, message):
    with pytest.raises(GlmtuneError, match=message) as caught:
        parse_config(flags.split())
    assert "\n" not in str(caught.value)


def test_good_edge_values_parse():
    config = parse_config("--max_grad_norm 0 --save_steps 0 --lora_dropout 0 --seed 0 --max_steps -1".split())
    assert (config.max_grad_norm, config.save_steps, config.lora_dropout, config.seed) == (0, 0, 0, 0)


def test_yaml_value_of_the_wrong_type_is_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lora_rank: [8]\n")
    with pytest.raises(GlmtuneError, match="--lora_rank must be >= 1, got"):
        parse_config(["--config", str(path)])


def glmtune(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "glmtune", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def test_cli_prints_one_line_and_debug_shows_the_traceback():
    plain = glmtune("train", "--learning_rate", "-1")
    assert plain.returncode == 2 and plain.stderr.strip() == "error: --learning_rate must be > 0, got -1.0"
    for debug in (glmtune("train", "--learning_rate", "-1", "--debug"), glmtune("--debug", "train", "--learning_rate", "-1"),
                  glmtune("train", "--learning_rate", "-1", env={"GLMTUNE_DEBUG": "1"})):
        assert debug.returncode != 0 and "Traceback" in debug.stderr and "must be > 0" in debug.stderr


def test_known_failures_are_one_line_and_bugs_are_not():
    assert known_failure(PermissionError(13, "Permission denied", "/out/x")) == "/out/x: Permission denied"
    assert known_failure(OSError(28, "No space left on device", "/out/ckpt")) == "/out/ckpt: No space left on device"
    assert known_failure(KeyError("a bug")) is None
    assert known_failure(OSError("no filename: a bug")) is None


# ---- data files ----


def test_line_separators_inside_a_record_are_data(tmp_path):
    text = "line\u2028separator, next\u0085line, paragraph\u2029end"
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": text, "summary": "ok\u2028"}, RECORDS[0]])
    conversations = read_conversations(path, FormatOptions())
    assert [c.turns[-1].query for c in conversations] == [text, RECORDS[0]["content"]]
    assert conversations[0].turns[-1].answer == "ok\u2028"


@pytest.mark.parametrize("layout", ["jsonl", "array"])
def test_latin1_file_names_file_and_line(tmp_path, layout):
    good = json.dumps(RECORDS[0], ensure_ascii=False).encode()
    bad = '{"content": "café", "summary": "x"}'.encode("latin-1")
    body = good + b"\n" + bad + b"\n" if layout == "jsonl" else b"[" + good + b",\n" + bad + b"]"
    path = tmp_path / "latin.json"
    path.write_bytes(body)
    with pytest.raises(GlmtuneError, match=re.escape(f"{path}:2: not UTF-8 (byte 0xe9")):
        read_conversations(path, FormatOptions())


def test_latin1_lines_are_counted_with_skip_bad_records(tmp_path, caplog):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(RECORDS[0]).encode() + b"\n" + '{"content": "é", "summary": "x"}'.encode("latin-1") + b"\n")
    with caplog.at_level(logging.WARNING):
        conversations = read_conversations(path, FormatOptions(), skip_bad_records=True)
    assert len(conversations) == 1 and "skipped 1 bad record" in caplog.text


def test_every_answer_empty_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "q", "summary": ""}, {"content": "q2", "summary": "  "}])
    with pytest.raises(GlmtuneError, match=r"every answer is empty \(key 'summary'\)"):
        read_conversations(path, FormatOptions())
    assert len(read_conversations(path, FormatOptions(require_response=False))) == 2  # predict: prompts alone are fine


def test_train_with_every_answer_empty_stops_before_the_model(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "q", "summary": ""}])
    with pytest.raises(GlmtuneError, match="every answer is empty"):
        run_train(config(tmp_path / "no-model-needed", path, tmp_path / "out"))


def test_predict_without_answers_writes_predictions_but_no_scores(tiny_llama, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"content": "类型#裙"}, {"content": "类型#裤", "summary": ""}])
    results = run_predict(GlmtuneConfig(model_name_or_path=str(tiny_llama), test_file=str(path), output_dir=str(tmp_path / "p"),
                                        max_new_tokens=3))
    assert not any(key.startswith("predict_rouge") or key.startswith("predict_bleu") for key in results)
    assert len((tmp_path / "p" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()) == 2


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
                           max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(st.binary(max_size=40) | JSON_VALUES.map(json.dumps), max_size=6),
       skip=st.booleans(), dataset_format=st.sampled_from(["columns", "alpaca", "sharegpt"]))
def test_any_bytes_give_records_or_one_line_error(tmp_path, lines, skip, dataset_format):
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines))
    try:
        conversations = read_conversations(path, FormatOptions(dataset_format=dataset_format), skip_bad_records=skip)
    except GlmtuneError as error:
        assert "\n" not in str(error) and str(path) in str(error)
    else:
        assert conversations and all(isinstance(t.query, str) and isinstance(t.answer, str) for c in conversations for t in c.turns)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(st.fixed_dictionaries({"content": st.text(), "summary": st.text(min_size=1).filter(str.strip)}),
                        min_size=1, max_size=5),
       ensure_ascii=st.booleans())
def test_valid_records_read_back_exactly(tmp_path, records, ensure_ascii):
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=ensure_ascii) + "\n" for r in records), encoding="utf-8")
    conversations = read_conversations(path, FormatOptions())
    assert [(c.turns[-1].query, c.turns[-1].answer) for c in conversations] == [(r["content"], r["summary"]) for r in records]


# ---- model folders and output folders ----


def broken_copy(tiny_llama: Path, tmp_path: Path, name: str, damage) -> Path:
    folder = tmp_path / name
    shutil.copytree(tiny_llama, folder)
    damage(folder)
    return folder


MODEL_DAMAGE = {
    "empty-config": (lambda f: (f / "config.json").write_text(""), "config.json: the file is empty"),
    "corrupt-config": (lambda f: (f / "config.json").write_text("{\"model_type\": "), r"config.json:1: not valid JSON"),
    "truncated-weights": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
                          "model.safetensors: corrupt or truncated safetensors file"),
    "empty-weights": (lambda f: (f / "model.safetensors").write_bytes(b""), "model.safetensors: corrupt or truncated"),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGE)
def test_broken_model_folder_names_the_file(tiny_llama, data, tmp_path, damage):
    change, message = MODEL_DAMAGE[damage]
    folder = broken_copy(tiny_llama, tmp_path, damage, change)
    with pytest.raises(GlmtuneError, match=message):
        run_train(config(folder, data, tmp_path / "out"))
    with pytest.raises(GlmtuneError, match=message):
        run_predict(GlmtuneConfig(model_name_or_path=str(folder), test_file=str(data), output_dir=str(tmp_path / "p")))


def test_truncated_adapter_names_the_file(tiny_llama, data, tmp_path, run_with_checkpoints):
    folder = tmp_path / "a"
    shutil.copytree(run_with_checkpoints, folder)
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(GlmtuneError, match="adapter_model.safetensors: corrupt or truncated safetensors file"):
        run_predict(GlmtuneConfig(model_name_or_path=str(folder), test_file=str(data), output_dir=str(tmp_path / "p")))


@pytest.mark.parametrize("recipe", ["train", "predict"])
def test_output_dir_that_is_a_file_or_unwritable(tiny_llama, data, tmp_path, recipe):
    afile = tmp_path / "afile"
    afile.write_text("x")
    cases = [(afile, "is a file, not a folder"), (afile / "sub", "cannot write there")]
    for output, message in cases:
        with pytest.raises(GlmtuneError, match=f"--output_dir {re.escape(str(output))}.*{message}"):
            if recipe == "train":
                run_train(config(tiny_llama, data, output, overwrite_output_dir=True))
            else:
                run_predict(GlmtuneConfig(model_name_or_path=str(tiny_llama), test_file=str(data), output_dir=str(output)))


# ---- checkpoints: no code, no crossing runs, right logs, no broken weights ----


class WritesAFile:
    """A pickle that, if unpickled with weights_only=False, creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


@pytest.fixture(scope="module")
def run_with_checkpoints(tiny_llama, data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs") / "a"
    run_train(config(tiny_llama, data, output, max_steps=4, save_steps=2, logging_steps=3))
    return output


# .metadata: the index of a sharded (FSDP, torch.distributed.checkpoint) checkpoint, which DCP itself unpickles.
@pytest.mark.parametrize("state_file", ["optimizer.pt", "scheduler.pt", "rng_state.pt", ".metadata"])
def test_crafted_pickle_in_a_checkpoint_runs_nothing(tiny_llama, data, tmp_path, run_with_checkpoints, state_file):
    checkpoint = tmp_path / "checkpoint-2"
    shutil.copytree(run_with_checkpoints / "checkpoint-2", checkpoint)
    marker = tmp_path / "marker"
    with open(checkpoint / state_file, "wb") as handle:
        pickle.dump({"state": WritesAFile(marker)}, handle)
    what = "index" if state_file == ".metadata" else "state"
    with pytest.raises(GlmtuneError, match=f"{state_file}: not a loadable checkpoint {what}"):
        run_train(config(tiny_llama, data, tmp_path / "b", max_steps=4, resume_from_checkpoint=str(checkpoint)))
    assert not marker.exists()


def test_a_real_sharded_index_is_accepted(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from glmtune.train.checkpoint import check_sharded_index

    model = torch.nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp_path / "dcp"))
    check_sharded_index(tmp_path / "dcp")


def test_latest_never_resumes_another_runs_checkpoint(tiny_llama, data, tmp_path, run_with_checkpoints, caplog):
    shared = tmp_path / "shared"
    shutil.copytree(run_with_checkpoints, shared)
    other_data = write_jsonl(tmp_path / "other.jsonl", RECORDS[::-1][:3])
    with caplog.at_level(logging.WARNING):  # run B reuses the folder: A's checkpoints stay, named
        run_train(config(tiny_llama, other_data, shared, overwrite_output_dir=True, max_steps=1))
    assert "2 checkpoint(s) of another run" in caplog.text
    with pytest.raises(GlmtuneError, match="no checkpoint of this run .*checkpoint-4 is another run's"):
        run_train(config(tiny_llama, other_data, shared, max_steps=6, resume_from_checkpoint="latest"))
    # An explicit path overrides, with a warning that the data differ.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        result = run_train(config(tiny_llama, other_data, shared, max_steps=5, resume_from_checkpoint=str(shared / "checkpoint-4")))
    assert len(result.losses) == 1 and "from a run with other data" in caplog.text


def test_latest_with_changed_data_is_an_error(tiny_llama, data, tmp_path, run_with_checkpoints):
    folder = tmp_path / "a"
    shutil.copytree(run_with_checkpoints, folder)
    other_data = write_jsonl(tmp_path / "other.jsonl", RECORDS[:3])
    with pytest.raises(GlmtuneError, match="latest: .*checkpoint-4 is from a run with other data; pass its path"):
        run_train(config(tiny_llama, other_data, folder, max_steps=6, resume_from_checkpoint="latest"))


def test_different_lora_rank_on_resume_is_one_line(tiny_llama, data, tmp_path, run_with_checkpoints):
    with pytest.raises(GlmtuneError, match=r"trained other tensors than this run \(--lora_rank 8 -> 4\): .*\[8, \d+\] there, \[4, \d+\] here"):
        run_train(config(tiny_llama, data, tmp_path / "b", max_steps=6, lora_rank=4,
                         resume_from_checkpoint=str(run_with_checkpoints / "checkpoint-2")))


def test_checkpoint_past_max_steps_is_an_error(tiny_llama, data, tmp_path, run_with_checkpoints):
    with pytest.raises(GlmtuneError, match="checkpoint-4 is at step 4, past this run's 3 steps"):
        run_train(config(tiny_llama, data, tmp_path / "b", max_steps=3, resume_from_checkpoint=str(run_with_checkpoints / "checkpoint-4")))


def test_changed_settings_on_resume_are_named_and_applied(tiny_llama, data, tmp_path, run_with_checkpoints, caplog):
    with caplog.at_level(logging.WARNING):
        run_train(config(tiny_llama, data, tmp_path / "b", max_steps=6, learning_rate=3e-2, logging_steps=1,
                         resume_from_checkpoint=str(run_with_checkpoints / "checkpoint-4")))
    assert "--learning_rate 0.01 -> 0.03" in caplog.text and "--max_steps 4 -> 6" in caplog.text
    logged = {row["step"]: row for row in map(json.loads, (tmp_path / "b" / "train_log.jsonl").read_text().splitlines())}
    # Linear decay over the new 6 steps from the new peak: after step 5, 3e-2 * 1/6 (the old peak would give 1e-2 / 6).
    assert logged[5]["learning_rate"] == pytest.approx(3e-2 / 6)


def test_resumed_log_has_the_uninterrupted_rows_once(tiny_llama, data, tmp_path, run_with_checkpoints):
    folder = tmp_path / "a"
    shutil.copytree(run_with_checkpoints, folder)
    before = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in before] == [3, 4]
    # As after a kill at step 4: resume from checkpoint-2; the window 1-3 is half before, half after it.
    run_train(config(tiny_llama, data, folder, max_steps=4, save_steps=2, logging_steps=3,
                     resume_from_checkpoint=str(folder / "checkpoint-2")))
    after = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in after] == [3, 4]
    assert [row["loss"] for row in after] == pytest.approx([row["loss"] for row in before], abs=1e-6)


def test_save_total_limit_keeps_the_newest_of_this_run_only(tiny_llama, data, tmp_path):
    output = tmp_path / "out"
    run_train(config(tiny_llama, data, output, max_steps=3, save_steps=1, save_total_limit=1))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-3"]
    run_train(config(tiny_llama, data, output, max_steps=2, save_steps=1, save_total_limit=1, overwrite_output_dir=True))
    assert sorted(p.name for p in output.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]  # 3 is the earlier run's


@pytest.mark.parametrize("save_steps", [0, 1])
def test_exploding_weights_are_never_saved(tiny_llama, data, tmp_path, save_steps):
    output = tmp_path / "out"
    with pytest.raises(GlmtuneError, match="step 1: the trained weights give a non-finite loss; nothing saved"):
        run_train(config(tiny_llama, data, output, max_steps=3 if save_steps else 1, save_steps=save_steps, learning_rate=1e30))
    assert not list(output.glob("checkpoint-*")) and not (output / "glmtune.json").exists()
    assert not (output / "adapter_model.safetensors").exists()


def test_empty_run_record_is_one_line_and_interrupted_save_is_completed(tiny_llama, data, tmp_path, run_with_checkpoints):
    folder = tmp_path / "a"
    shutil.copytree(run_with_checkpoints, folder)
    (folder / "glmtune.json").write_text("")  # what a kill during a plain write_text left
    with pytest.raises(GlmtuneError, match="glmtune.json: the file is empty; the run was interrupted while saving"):
        run_predict(GlmtuneConfig(model_name_or_path=str(folder), test_file=str(data), output_dir=str(tmp_path / "p")))
    # A save killed while moving its files in: the record waits in the temp folder, and the next reader finishes.
    shutil.copytree(run_with_checkpoints, folder, dirs_exist_ok=True)
    temporary = folder / OUTPUT_TEMPORARY
    temporary.mkdir()
    for name in ("glmtune.json", "adapter_model.safetensors"):
        os.replace(folder / name, temporary / name)
    assert read_run_record(folder)["finetuning_type"] == "lora"
    assert not temporary.exists() and (folder / "adapter_model.safetensors").is_file()


# ---- kill -9 anywhere: a complete output, or one that a rerun detects and repairs ----

KILL_ARGS = ["--max_steps", "3", "--save_steps", "2", "--per_device_train_batch_size", "2", "--logging_steps", "1",
             "--learning_rate", "1e-2", "--lora_dropout", "0", "--report_to", "none", "--seed", "3"]
# Events (tests/kill_at.py): 1 run file, 2-3 steps 1-2, 4-5 checkpoint-2 (record, rename), 6 step 3,
# 7 output record, 8-12 moving the output in (glmtune.json last). Every point: GLMTUNE_KILL_POINTS=all.
KILL_POINTS = list(range(1, 13)) if os.environ.get("GLMTUNE_KILL_POINTS") == "all" else [3, 5, 6, 9, 12]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, data, tmp_path_factory) -> dict:
    output = tmp_path_factory.mktemp("kill") / "reference"
    run = subprocess.run([sys.executable, str(TESTS / "kill_at.py"), "0", "train", "--model_name_or_path", str(tiny_llama),
                          "--train_file", str(data), "--output_dir", str(output), *KILL_ARGS],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "events=12" in run.stderr
    return load_file(str(output / "adapter_model.safetensors"))


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_anywhere_leaves_a_complete_or_repairable_output(tiny_llama, data, tmp_path, uninterrupted, point):
    output = tmp_path / "out"
    command = ["train", "--model_name_or_path", str(tiny_llama), "--train_file", str(data), "--output_dir", str(output), *KILL_ARGS]
    killed = subprocess.run([sys.executable, str(TESTS / "kill_at.py"), str(point), *command],
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr
    if read_run_record(output) is None:  # not complete: what a user reruns
        rerun = ["--resume_from_checkpoint", "latest"] if list(output.glob("checkpoint-*")) else ["--overwrite_output_dir"]
        repaired = glmtune(*command, *rerun)
        assert repaired.returncode == 0, repaired.stderr
    assert read_run_record(output)["steps"] == 3
    assert not (output / OUTPUT_TEMPORARY).exists()
    final = load_file(str(output / "adapter_model.safetensors"))
    assert final.keys() == uninterrupted.keys()
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(final[name], tensor, rtol=0, atol=1e-6)
