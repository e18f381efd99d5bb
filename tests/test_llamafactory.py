"""Coming from LLaMA-Factory: its YAML keys and command form, dataset_info.json folders, trackers and the loss plot.

The data folders here are small fixtures written by the tests in LLaMA-Factory's formats, not its data."""

import csv
import json
import logging

import pytest

from glmtune.config import INFERENCE_FLAGS, parse_config
from glmtune.data.dataset_info import read_dataset_documents, read_dataset_pairs, read_datasets
from glmtune.data.formats import FormatOptions
from glmtune.data.preprocess import shared_lengths
from glmtune.data.templates import ChatTemplate, get_template
from glmtune.errors import GlmtuneError
from glmtune.recipes.train import run_train
from glmtune.train import trackers

LF_YAML = """\
### model
model_name_or_path: MODEL
trust_remote_code: true
### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
### dataset
dataset: qa,chat
template: qwen3_nothink
cutoff_len: 256
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4
### output
output_dir: OUT
logging_steps: 1
save_steps: 2
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: [wandb, mlflow]
### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 1.0e-2
num_train_epochs: 1.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
val_size: 0.25
"""


def write_yaml(tmp_path, model="/nowhere", output="out", text=LF_YAML):
    path = tmp_path / "lf.yaml"
    path.write_text(text.replace("MODEL", str(model)).replace("OUT", str(output)), encoding="utf-8")
    return path


def test_yaml_positional_with_overrides_and_flags(tmp_path, caplog):
    path = write_yaml(tmp_path)
    with caplog.at_level(logging.INFO, logger="glmtune"):
        config = parse_config([str(path), "learning_rate=5e-4", "cutoff_len=128", "--lora_rank", "16"])
    assert (config.dataset, config.template, config.lora_target, config.stage) == ("qa,chat", "qwen3_nothink", "all", "sft")
    assert config.learning_rate == 5e-4 and config.cutoff_len == 128 and config.lora_rank == 16
    assert config.report_to == "wandb,mlflow" and config.warmup_ratio == 0.1 and config.val_size == 0.25
    assert config.resume_from_checkpoint is None
    noted = [r.getMessage() for r in caplog.records]
    for key in ("trust_remote_code", "preprocessing_num_workers", "dataloader_num_workers", "ddp_timeout", "save_only_model"):
        assert sum(key in message for message in noted) == 1, noted
    # --config still works, and a flag beats the file.
    assert parse_config(["--config", str(path), "--max_samples", "3"]).max_samples == 3


def test_unknown_keys_are_named(tmp_path):
    path = write_yaml(tmp_path, text=LF_YAML + "packing_mode: fancy\n")
    with pytest.raises(GlmtuneError, match="lf.yaml: unknown keys packing_mode"):
        parse_config([str(path)])
    with pytest.raises(GlmtuneError, match="key=value overrides: unknown keys bogus"):
        parse_config(["bogus=1"])


def test_help_is_grouped_and_chat_has_no_training_flags(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--help"], command="glmtune train")
    train_help = capsys.readouterr().out
    groups = ["what to do:", "model:", "data:", "method:", "training and output:", "evaluation and generation:"]
    positions = [train_help.index(f"\n{group}\n") for group in groups]
    assert positions == sorted(positions)
    assert train_help.index("--learning_rate") > positions[4] and train_help.index("--lora_rank") > positions[3]
    with pytest.raises(SystemExit):
        parse_config(["--help"], INFERENCE_FLAGS, "glmtune chat")
    chat_help = capsys.readouterr().out
    assert "--model_name_or_path" in chat_help and "--max_new_tokens" in chat_help and "--adapter_name_or_path" in chat_help
    for training_flag in ("--learning_rate", "--lora_rank", "--train_file", "--output_dir", "--do_train", "training and output:"):
        assert training_flag not in chat_help
    with pytest.raises(GlmtuneError, match="glmtune chat does not take --learning_rate"):
        parse_config(["--learning_rate", "1"], INFERENCE_FLAGS, "glmtune chat")


def make_data_folder(folder):
    """Four datasets in LLaMA-Factory's layouts: alpaca json, renamed alpaca csv, sharegpt jsonl with its own
    tags and a system column, and alpaca parquet; plus a hub entry and a ranking entry."""
    folder.mkdir(parents=True, exist_ok=True)
    qa = [{"instruction": f"what is {i} plus one", "input": "", "output": f"{i + 1}"} for i in range(6)]
    qa[0]["input"] = "answer in digits"
    (folder / "qa.json").write_text(json.dumps(qa), encoding="utf-8")
    with open(folder / "renamed.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["question", "answer", "sys"])
        writer.writeheader()
        writer.writerows([{"question": "ping", "answer": "pong", "sys": "be terse"},
                          {"question": "multi\nline", "answer": "ok", "sys": ""}])
    chat = [{"dialog": [{"speaker": "me", "text": f"hi {i}"}, {"speaker": "bot", "text": f"hello {i}"}], "persona": "kind"}
            for i in range(4)]
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in chat) + "\n", encoding="utf-8")
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(qa[:3]), folder / "qa.parquet")
    info = {
        "qa": {"file_name": "qa.json"},
        "renamed": {"file_name": "renamed.csv", "columns": {"prompt": "question", "response": "answer", "system": "sys"}},
        "chat": {"file_name": "chat.jsonl", "formatting": "sharegpt", "columns": {"messages": "dialog", "system": "persona"},
                 "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "qa_parquet": {"file_name": "qa.parquet", "num_samples": 2},
        "hub": {"hf_hub_url": "someone/data"},
        "prefs": {"file_name": "qa.json", "ranking": True},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def test_dataset_info_layouts(tmp_path):
    folder = make_data_folder(tmp_path / "data")
    options = FormatOptions()
    qa = read_datasets("qa", folder, options)
    assert len(qa) == 6 and qa[0].turns[0].query == "what is 0 plus one\nanswer in digits" and qa[0].turns[0].answer == "1"
    renamed = read_datasets("renamed", folder, options)
    assert [(c.turns[0].query, c.turns[0].answer, c.system) for c in renamed] == [
        ("ping", "pong", "be terse"), ("multi\nline", "ok", None)]
    chat = read_datasets("chat", folder, options)
    assert chat[2].system == "kind" and (chat[2].turns[0].query, chat[2].turns[0].answer) == ("hi 2", "hello 2")
    assert len(read_datasets("qa_parquet", folder, options)) == 2  # num_samples
    both = read_datasets("qa, chat", folder, options, max_samples=3)  # max_samples: per dataset
    assert [c.turns[0].answer for c in both] == ["1", "2", "3", "hello 0", "hello 1", "hello 2"]


def test_dataset_info_errors_name_the_entry(tmp_path):
    folder = make_data_folder(tmp_path / "data")
    options = FormatOptions()
    with pytest.raises(GlmtuneError, match="no dataset named 'nope'"):
        read_datasets("nope", folder, options)
    with pytest.raises(GlmtuneError, match="dataset 'hub' is on a hub \\(hf_hub_url\\)"):
        read_datasets("hub", folder, options)
    with pytest.raises(GlmtuneError, match="'prefs' is a ranking .* stage: dpo"):
        read_datasets("prefs", folder, options)
    with pytest.raises(GlmtuneError, match="needs .*dataset_info.json"):
        read_datasets("qa", tmp_path, options)
    (folder / "chat.jsonl").write_text(json.dumps({"dialog": [{"speaker": "you", "text": "x"}]}) + "\n", encoding="utf-8")
    with pytest.raises(GlmtuneError, match="chat.jsonl:1: key 'dialog' item 0: role 'you'"):
        read_datasets("chat", folder, options)


def test_cutoff_len_splits_as_llamafactory():
    assert shared_lengths(100, 10, 50) == (40, 10)  # short answer kept whole
    assert shared_lengths(10, 100, 50) == (10, 40)  # short prompt kept whole
    assert shared_lengths(100, 100, 50) == (25, 25)  # both long: in proportion
    assert shared_lengths(5, 5, 50) == (5, 5)


THINKING_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% if enable_thinking is defined and not enable_thinking %}"
                     "<nothink>{% endif %}{% endif %}")


def test_llamafactory_template_names_use_the_chat_template(tiny_llama):
    from transformers import AutoTokenizer

    from glmtune.data.formats import Conversation, Turn

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    with pytest.raises(GlmtuneError, match="--template qwen3: .* has none"):
        get_template("qwen3", tokenizer)
    tokenizer.chat_template = THINKING_TEMPLATE
    conversation = Conversation([Turn("hi", "")])
    nothink, plain = get_template("qwen3_nothink", tokenizer), get_template("llama3", tokenizer)
    assert isinstance(nothink, ChatTemplate) and isinstance(plain, ChatTemplate)
    assert nothink.generation_prompt(conversation) == "<|user|>hi<|assistant|><nothink>"
    assert plain.generation_prompt(conversation) == "<|user|>hi<|assistant|>"


# Qwen3's way: only the last answer shows its (empty) thinking block; past answers are rendered without it.
QWEN3_LIKE_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' and loop.last %}"
                       "<think></think>{% endif %}{{ m['content'] }}<eos>{% endfor %}"
                       "{% if add_generation_prompt %}<|assistant|><think></think>{% endif %}")


def test_template_that_rewrites_past_turns_trains_the_last_answer(tiny_llama):
    """dpo_en_demo's multi-turn prompts under a Qwen3-style template: the prompt is the history as the template
    renders it before the last answer, the same text generation continues from."""
    from transformers import AutoTokenizer

    from glmtune.data.formats import Conversation, Turn

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.chat_template = QWEN3_LIKE_TEMPLATE
    template = get_template("qwen3_nothink", tokenizer)
    conversation = Conversation([Turn("q1", "a1", trains=False), Turn("q2", "a2")])
    (segment,) = template.segments(conversation)
    assert segment.prompt == "<|user|>q1<eos><|assistant|>a1<eos><|user|>q2<eos><|assistant|><think></think>"
    assert segment.prompt == template.generation_prompt(conversation) and segment.answer == "a2<eos>"
    every = Conversation([Turn("q1", "a1"), Turn("q2", "a2")])  # training on a1 as rendered, then rendered otherwise
    with pytest.raises(GlmtuneError, match="does not render turns incrementally"):
        template.segments(every)


def test_missing_tracker_names_the_extra(monkeypatch):
    assert trackers.tracker_names("none") == []
    monkeypatch.setattr(trackers.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GlmtuneError, match=r"--report_to swanlab needs the swanlab package: pip install 'glmtune\[swanlab\]'"):
        trackers.tracker_names("swanlab")
    with pytest.raises(GlmtuneError, match="--report_to neptune: not one of"):
        trackers.tracker_names("neptune")


def chat_model(tiny_llama, folder):
    """The tiny Llama with a chat template that renders turns incrementally, the thinking switch on the answer as on
    the generation prompt (as Qwen3's does)."""
    import shutil

    from transformers import AutoTokenizer

    model = shutil.copytree(tiny_llama, folder)
    tokenizer = AutoTokenizer.from_pretrained(model)
    nothink = "{% if enable_thinking is defined and not enable_thinking %}<nothink>{% endif %}"
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{% if m['role'] == 'assistant' %}" + nothink + "{% endif %}"
        "{{ m['content'] }}<eos>{% endfor %}{% if add_generation_prompt %}<|assistant|>" + nothink + "{% endif %}")
    tokenizer.save_pretrained(model)
    return model


def test_llamafactory_run_records_loss_in_wandb_mlflow_and_plot(tiny_llama, tmp_path, monkeypatch):
    """An LLaMA-Factory style YAML + dataset_info.json folder trains: PEFT adapter, training_loss.png, the loss in
    W&B (offline) and MLflow (a local file: store), HF-schema trainer_state.json; resume still works."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    model = chat_model(tiny_llama, tmp_path / "model")
    make_data_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)  # dataset_dir defaults to ./data, as in LLaMA-Factory
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file: store behind this switch
    output = tmp_path / "out"
    result = run_train(parse_config([str(write_yaml(tmp_path, model, output))]))

    assert {"adapter_model.safetensors", "adapter_config.json", "training_loss.png"} <= {p.name for p in output.iterdir()}
    assert (output / "training_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in logged if "loss" in e]
    assert len(losses) == result.steps == 4  # 10 records, 1/4 held out -> 8 / batch 2
    assert any("eval_loss" in e for e in logged)  # val_size turned evaluation on

    # An offline run is one protobuf log; wandb ships no reader for it, but each history value is stored as JSON text.
    (run_file,) = (output / "wandb").glob("offline-run-*/run-*.wandb")
    recorded = run_file.read_bytes()
    assert all(json.dumps(loss).encode() in recorded for loss in losses)

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [m.value for m in history] == pytest.approx(losses)
    assert run.data.params["template"] == "qwen3_nothink"

    state = json.loads((output / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and [e["loss"] for e in state["log_history"] if "loss" in e] == pytest.approx(losses[:2])
    resumed = run_train(parse_config([str(write_yaml(tmp_path, model, output)), "report_to=none",
                                      f"resume_from_checkpoint={output / 'checkpoint-2'}"]))
    assert resumed.losses == pytest.approx(losses[2:], abs=1e-5)


def test_missing_extra_is_one_line_naming_it():
    from glmtune.extras import require_extra

    with pytest.raises(GlmtuneError, match=r"^glmtune serve needs no_such_module_x: pip install 'glmtune\[serve\]'$"):
        require_extra("serve", "json", "no_such_module_x", needed_for="glmtune serve")


# LLaMA-Factory's examples/train_lora/qwen3_lora_pretrain.yaml and qwen3_lora_dpo.yaml, shortened.
PT_YAML = """\
model_name_or_path: MODEL
trust_remote_code: true
stage: pt
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
dataset: c4,wiki
cutoff_len: 16
max_samples: 1000
preprocessing_num_workers: 16
output_dir: OUT
logging_steps: 1
overwrite_output_dir: true
report_to: none
per_device_train_batch_size: 2
learning_rate: 1.0e-2
num_train_epochs: 1.0
"""
DPO_YAML = PT_YAML.replace("stage: pt", "stage: dpo\npref_beta: 0.1\npref_loss: sigmoid").replace(
    "dataset: c4,wiki", "dataset: prefs\ntemplate: qwen3_nothink").replace("cutoff_len: 16", "cutoff_len: 64").replace(
    "num_train_epochs: 1.0", "num_train_epochs: 4.0")
DOCUMENTS = [f"document {i} is about the number {i} and nothing else" for i in range(6)]


def make_stage_folder(folder):
    """LLaMA-Factory's pt and dpo layouts: c4_demo-style JSONL with columns {"prompt": "text"}, wiki_demo-style .txt,
    and a dpo_en_demo-style sharegpt ranking dataset with its own role tags; plus an alpaca (non-ranking) entry."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c4.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS), encoding="utf-8")
    (folder / "wiki.txt").write_text("a wiki line\n\nanother wiki line\n", encoding="utf-8")
    prefs = [{"chat": [{"speaker": "me", "text": f"what is {i} plus one"}],
              "better": {"speaker": "bot", "text": f"{i + 1}"}, "worse": {"speaker": "bot", "text": f"{i + 7} or so"}}
             for i in range(4)]
    (folder / "prefs.json").write_text(json.dumps(prefs), encoding="utf-8")
    (folder / "qa.json").write_text(json.dumps([{"instruction": "q", "output": "a"}]), encoding="utf-8")
    info = {
        "c4": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}},
        "wiki": {"file_name": "wiki.txt", "columns": {"prompt": "text"}},
        "prefs": {"file_name": "prefs.json", "ranking": True, "formatting": "sharegpt",
                  "columns": {"messages": "chat", "chosen": "better", "rejected": "worse"},
                  "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"}},
        "qa": {"file_name": "qa.json"},
    }
    (folder / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


def test_stage_datasets_read_through_dataset_info(tmp_path):
    folder = make_stage_folder(tmp_path / "data")
    assert read_dataset_documents("c4, wiki", folder) == DOCUMENTS + ["a wiki line", "another wiki line"]
    assert read_dataset_documents("c4", folder, max_samples=2) == DOCUMENTS[:2]
    pairs = read_dataset_pairs("prefs", folder)
    assert [(p.chosen.turns[-1].query, p.chosen.turns[-1].answer, p.rejected.turns[-1].answer) for p in pairs[:2]] == [
        ("what is 0 plus one", "1", "7 or so"), ("what is 1 plus one", "2", "8 or so")]


def test_stage_dataset_errors_name_the_entry_and_record(tmp_path):
    folder = make_stage_folder(tmp_path / "data")
    with pytest.raises(GlmtuneError, match="dataset 'qa' is not a ranking dataset; stage: dpo needs ranking: true"):
        read_dataset_pairs("qa", folder)
    with pytest.raises(GlmtuneError, match="dataset 'prefs' is a ranking .* stage: dpo, not pt"):
        read_dataset_documents("prefs", folder)
    with pytest.raises(GlmtuneError, match="dataset 'wiki': wiki.txt is raw text, for stage: pt, not sft"):
        read_datasets("wiki", folder, FormatOptions())
    (folder / "c4.jsonl").write_text('{"text": "fine"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"c4.jsonl:2: missing key 'text' \(columns.prompt of 'c4' in dataset_info.json\)"):
        read_dataset_documents("c4", folder)
    assert read_dataset_documents("c4", folder, skip_bad_records=True) == ["fine"]
    prefs = json.loads((folder / "prefs.json").read_text())
    del prefs[1]["worse"]
    (folder / "prefs.json").write_text(json.dumps(prefs), encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"prefs.json:record 2: missing key 'worse' \(columns.rejected in dataset_info.json\)"):
        read_dataset_pairs("prefs", folder)
    assert len(read_dataset_pairs("prefs", folder, skip_bad_records=True)) == 3


def test_llamafactory_pt_yaml_with_dataset_trains(tiny_llama, tmp_path, monkeypatch):
    make_stage_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    result = run_train(parse_config([str(write_yaml(tmp_path, tiny_llama, output, PT_YAML))]))
    logged = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    assert result.steps >= 3 and len([e for e in logged if "loss" in e]) == result.steps
    assert (output / "adapter_model.safetensors").is_file()
    # Blocks of cutoff_len tokens from the eight documents of both datasets (the 6-document c4 alone packs fewer).
    c4_only = run_train(parse_config([str(write_yaml(tmp_path, tiny_llama, tmp_path / "c4", PT_YAML)), "dataset=c4",
                                      "val_size=2"]))
    assert c4_only.steps < result.steps
    held_out = [json.loads(line) for line in (tmp_path / "c4" / "train_log.jsonl").read_text().splitlines()]
    assert any("eval_loss" in e for e in held_out)  # val_size: two documents held out, evaluation on


def test_llamafactory_dpo_yaml_with_ranking_dataset_trains_and_logs_rewards(tiny_llama, tmp_path, monkeypatch):
    model = chat_model(tiny_llama, tmp_path / "model")
    make_stage_folder(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    output = tmp_path / "out"
    result = run_train(parse_config([str(write_yaml(tmp_path, model, output, DPO_YAML)), "eval_dataset=prefs",
                                     "eval_steps=4"]))
    logged = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in logged if "loss" in e]
    evaluations = [e for e in logged if "eval_loss" in e]  # eval_dataset: held-out pairs' rewards too
    assert len(evaluations) == 2 and all("eval_rewards/accuracies" in e for e in evaluations)
    assert result.steps == len(steps) == 8  # 4 pairs / batch 2 * 4 epochs
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(key in e for e in steps), key
    assert steps[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # the adapter starts as the reference
    assert steps[-1]["rewards/margins"] > 0
