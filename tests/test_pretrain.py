"""--stage pt: raw documents packed into blocks, loss on every token; vocabulary extension, then chat with it."""

import json
import os
import sys
from pathlib import Path

import pexpect
import pytest
import torch
from safetensors.torch import load_file

from glmtune.config import GlmtuneConfig
from glmtune.data.pretrain import pack_documents, pretrain_examples, read_documents
from glmtune.errors import GlmtuneError
from glmtune.models.loading import load_model, load_tokenizer
from glmtune.methods.loading import load_for_inference
from glmtune.recipes.train import run_train
from glmtune.train.objectives import PretrainObjective

DOCUMENTS = ["复古的格调散发怀旧气息，宽松的版型遮肉又舒适。", "精致的刺绣彰显时尚", "这款上衣干净百搭，白色的设计很显气质。"] * 3
NEW_TOKENS = ["复古", "刺绣彰显", "气质"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pt") / "c4_like.jsonl"
    path.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCUMENTS), encoding="utf-8")
    return path


def test_reads_txt_lines_and_text_records(tmp_path, corpus):
    text_file = tmp_path / "raw.txt"
    text_file.write_text("第一篇\n\n第二篇\n", encoding="utf-8")
    assert read_documents(text_file) == ["第一篇", "第二篇"]
    assert read_documents(corpus) == DOCUMENTS
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a"}\n{"content": "b"}\n', encoding="utf-8")
    with pytest.raises(GlmtuneError, match=r"bad.jsonl:2: missing key 'text' \(set --text_column\)"):
        read_documents(bad)
    assert read_documents(bad, "content", skip_bad_records=True) == ["b"]


def test_documents_are_joined_by_eos_and_cut_into_blocks():
    blocks = pack_documents([[5, 6, 7], [8], [9, 10]], eos_id=1, block_size=4)
    assert [b.input_ids for b in blocks] == [[5, 6, 7, 1], [8, 1, 9, 10], [1]][:2]  # a 1-token tail teaches nothing
    assert all(b.labels == b.input_ids for b in blocks)


def test_blocks_label_every_token(tiny_llama):
    tokenizer = load_tokenizer(str(tiny_llama))
    examples = pretrain_examples(DOCUMENTS, tokenizer, block_size=16)
    assert all(len(e.input_ids) <= 16 for e in examples)
    stream = [t for e in examples for t in e.input_ids]
    assert stream.count(tokenizer.eos_token_id) == len(DOCUMENTS)
    assert stream.count(tokenizer.bos_token_id) == len(DOCUMENTS)  # each document starts as the tokenizer starts a text
    objective = PretrainObjective()
    batch = objective.collate(examples[:2], tokenizer.pad_token_id)
    assert objective.units(batch) == sum(len(e.input_ids) - 1 for e in examples[:2])


def pt_config(model: Path, data: Path, output: Path, method: str = "lora", **overrides) -> GlmtuneConfig:
    values = dict(do_train=True, model_name_or_path=str(model), train_file=str(data), output_dir=str(output), stage="pt",
                  finetuning_type=method, pre_seq_len=4, freeze_trainable_layers=1, max_source_length=16,
                  max_target_length=16, per_device_train_batch_size=4, max_steps=6, learning_rate=2e-2,
                  logging_steps=1, save_steps=3, report_to="none", lora_dropout=0.0)
    values.update(overrides)
    return GlmtuneConfig(**values)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_pretraining_lowers_the_loss(tiny_llama, corpus, tmp_path, method):
    lr = 0.2 if method == "ptuning" else 2e-2
    result = run_train(pt_config(tiny_llama, corpus, tmp_path / method, method, learning_rate=lr))
    assert result.losses[-1] < result.losses[0] - 0.05


def test_pretraining_resumes_exactly(tiny_llama, corpus, tmp_path):
    uninterrupted = run_train(pt_config(tiny_llama, corpus, tmp_path / "a"))
    resumed = run_train(pt_config(tiny_llama, corpus, tmp_path / "b", resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-3")))
    assert resumed.losses == pytest.approx(uninterrupted.losses[3:], abs=1e-6)


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "new_tokens.txt"
    path.write_text("\n".join(NEW_TOKENS) + "\n", encoding="utf-8")
    return path


def test_new_rows_start_as_the_mean_of_their_sub_tokens(tiny_model, token_file):
    from glmtune.models.vocab import extended_tokenizer, resize_for_tokenizer

    model, tokenizer = load_model(str(tiny_model)), load_tokenizer(str(tiny_model))
    before = model.get_input_embeddings().weight.detach().clone()
    extended = extended_tokenizer(tokenizer, str(token_file), None)
    new_ids = resize_for_tokenizer(model, tokenizer, extended)
    assert new_ids == list(range(len(tokenizer), len(tokenizer) + len(NEW_TOKENS)))
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == len(extended) and model.config.vocab_size == len(extended)
    for token, index in zip(NEW_TOKENS, new_ids):
        pieces = tokenizer(token, add_special_tokens=False)["input_ids"]
        assert len(pieces) == len(token) > 1
        torch.testing.assert_close(weight[index], before[pieces].mean(0))
        assert extended(token, add_special_tokens=False)["input_ids"] == [index]
    torch.testing.assert_close(weight[: len(tokenizer)], before)
    head = model.get_output_embeddings().weight
    torch.testing.assert_close(head[new_ids[0]], head[tokenizer(NEW_TOKENS[0], add_special_tokens=False)["input_ids"]].mean(0))


def test_new_tokenizer_must_extend_the_models(tiny_llama, tmp_path):
    from tiny_models import build_tokenizer

    build_tokenizer(["完全不同"]).save_pretrained(tmp_path / "other")
    (tmp_path / "x.txt").write_text("一段文字\n", encoding="utf-8")
    with pytest.raises(GlmtuneError, match="does not extend the model's tokenizer"):
        run_train(pt_config(tiny_llama, tmp_path / "x.txt", tmp_path / "out", new_tokenizer=str(tmp_path / "other")))


def spawn_chat(*flags: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    return pexpect.spawn(sys.executable, ["-m", "glmtune", "chat", *flags], env=env, encoding="utf-8", timeout=300,
                         dimensions=(40, 300))


def trained_embedding(folder: Path) -> torch.Tensor:
    """The trained input embedding a folder holds: PEFT's trained copy (LoRA's modules_to_save), or freeze's tensor."""
    saved = {}
    for file in folder.glob("*.safetensors"):
        saved.update(load_file(str(file)))
    names = sorted((n for n in saved if "embed_tokens" in n and "original_module" not in n),
                   key=lambda n: "modules_to_save" not in n)
    return saved[names[0]]


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_extended_vocabulary_trains_saves_and_chats(tiny_model, corpus, token_file, tmp_path, method):
    output = tmp_path / "out"
    run_train(pt_config(tiny_model, corpus, output, method, add_tokens=str(token_file),
                        additional_target="embed_tokens,lm_head" if "llama" in tiny_model.name else "embed_tokens"))
    tokenizer = load_tokenizer(str(output))  # the output holds its tokenizer
    base_tokenizer = load_tokenizer(str(tiny_model))
    new_ids = [tokenizer.convert_tokens_to_ids(t) for t in NEW_TOKENS]
    assert len(tokenizer) == len(base_tokenizer) + len(NEW_TOKENS) and min(new_ids) == len(base_tokenizer)
    for folder in (output, output / "checkpoint-3"):  # the output and a checkpoint both load with the extended vocabulary
        trained = trained_embedding(folder)
        assert trained.shape[0] == len(tokenizer)
        bundle = load_for_inference(GlmtuneConfig(model_name_or_path=str(folder)))
        assert len(bundle.tokenizer) == len(tokenizer)
        rows = bundle.model.get_input_embeddings().weight[new_ids]  # PEFT's wrapper: the active (trained) copy
        torch.testing.assert_close(rows.float(), trained[new_ids].float())  # the trained rows, not a re-initialisation

    child = spawn_chat("--model_name_or_path", str(output), "--max_new_tokens", "6")
    child.expect_exact("You: ")
    child.sendline("复古气质")
    child.expect_exact("Model: ")
    child.expect_exact("\r\nYou: ")
    assert child.before.strip()
    child.sendline("exit")
    child.expect(pexpect.EOF)
    child.wait()
    assert child.exitstatus == 0
