"""Tokenizers and seed-style preprocessing against the original tokenizer outputs (stand-in sp models)."""

from __future__ import annotations

import shutil

import pytest
import torch

from _chatglm_reference import AVAILABLE, SKIP_REASON, case_params, reference, requires_reference
from glmtune.models.chatglm import (
    ChatGLM2Tokenizer,
    ChatGLMTokenizer,
    build_generation_inputs,
    build_train_example,
    load_chatglm_tokenizer,
)


def _tokenizer(version: str):
    return load_chatglm_tokenizer(reference(version).sp_model)


def _string_params() -> list:
    if not AVAILABLE:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=SKIP_REASON), id="no-reference")]
    return [
        pytest.param(v, i, id=f"{v}:{i}:{c['text'][:16]!r}")
        for v in ("v1", "v2")
        for i, c in enumerate(reference(v).tokenizer_cases["cases"])
    ]


@pytest.mark.parametrize(("version", "index"), _string_params())
def test_tokenizer_string_case(version, index):
    case = reference(version).tokenizer_cases["cases"][index]
    tok = _tokenizer(version)
    text = case["text"]
    assert tok.tokenize(text) == case["tokenize"]
    assert tok.encode(text, add_special_tokens=False) == case["encode_no_special"]
    assert tok(text)["input_ids"] == case["call_input_ids"]
    assert tok.decode(case["encode_no_special"]) == case["decode_no_special"]
    assert tok.decode(case["call_input_ids"]) == case["decode_call_ids"]
    skipped = tok.decode(torch.tensor(case["call_input_ids"]), skip_special_tokens=True)
    assert skipped == case["decode_call_ids_skip_special"]
    if "build_prompt_with_history" in case:
        prompt = tok.build_prompt(text, history=[("你好", "你好，我是一个模型。")])
        assert prompt == case["build_prompt_with_history"]
        encoded = tok(prompt)
        assert encoded["input_ids"] == case["build_prompt_input_ids"]
        assert encoded["attention_mask"] == case["build_prompt_attention_mask"]
        assert encoded["position_ids"] == case["build_prompt_position_ids"]


@requires_reference
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pairs_and_batch_padding(version):
    data = reference(version).tokenizer_cases
    tok = _tokenizer(version)
    for pair in data["pairs"]:
        assert tok.encode(pair["a"], add_special_tokens=False) == pair["a_ids"]
        assert tok.encode(pair["b"], add_special_tokens=False) == pair["b_ids"]
        expected = pair["build_inputs_with_special_tokens"]
        assert tok.build_inputs_with_special_tokens(pair["a_ids"], pair["b_ids"]) == expected
    batch = data["batch_padding"]
    encoded = tok(batch["texts"], padding=True)
    for key in ("input_ids", "attention_mask", "position_ids"):
        assert encoded[key] == batch[key], key
    tensors = tok(batch["texts"], padding=True, return_tensors="pt")
    assert tensors["input_ids"].tolist() == batch["input_ids"]
    assert tensors["attention_mask"].tolist() == batch["attention_mask"]
    assert tok.padding_side == "left"


@requires_reference
def test_special_ids():
    v1 = _tokenizer("v1")
    ids = reference("v1").tokenizer_cases["special_ids"]
    assert isinstance(v1, ChatGLMTokenizer)
    assert (v1.bos_token_id, v1.eos_token_id, v1.pad_token_id) == (
        ids["bos(<sop>)"], ids["eos(<eop>)"], ids["pad(<pad>)"]
    )
    assert (v1.mask_token_id, v1.gmask_token_id, v1.unk_token_id) == (
        ids["mask([MASK])"], ids["gmask([gMASK])"], ids["unk(<unk>)"]
    )
    for piece in ("<n>", "<|tab|>", "<|blank_2|>", "<|blank_80|>"):
        assert v1.convert_tokens_to_ids(piece) == ids[piece]
    config = reference("v1").config
    assert (v1.bos_token_id, v1.eos_token_id, v1.gmask_token_id) == (
        config["bos_token_id"], config["eos_token_id"], config["gmask_token_id"]
    )

    v2 = _tokenizer("v2")
    data = reference("v2").tokenizer_cases
    ids = data["special_ids"]
    assert isinstance(v2, ChatGLM2Tokenizer)
    assert (v2.bos_token_id, v2.eos_token_id, v2.pad_token_id) == (ids["<bos>"], ids["<eos>"], ids["<pad>"])
    for token in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"):
        assert v2.convert_tokens_to_ids(token) == ids[token]
    assert v2.vocab_size == data["vocab_size(tokenizer.vocab_size)"]


@requires_reference
@pytest.mark.parametrize(("version", "file_name"), [("v1", "ice_text.model"), ("v2", "tokenizer.model")])
def test_tokenizer_folders_and_save_pretrained(tmp_path, version, file_name):
    """Real folders name the model ice_text.model / tokenizer.model; save_pretrained reloads."""
    shutil.copyfile(reference(version).sp_model, tmp_path / file_name)
    tok = load_chatglm_tokenizer(tmp_path)
    case = reference(version).tokenizer_cases["cases"][0]
    assert tok(case["text"])["input_ids"] == case["call_input_ids"]
    tok.save_pretrained(tmp_path / "saved")
    assert (tmp_path / "saved" / file_name).is_file()
    again = load_chatglm_tokenizer(tmp_path / "saved")
    assert type(again) is type(tok)
    assert again(case["text"])["input_ids"] == case["call_input_ids"]


@requires_reference
def test_prompt_templates():
    v1 = _tokenizer("v1")
    assert v1.build_prompt("你好") == "你好"
    assert v1.build_prompt("q2", [("q0", "r0"), ("q1", "r1")]) == (
        "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答：r1\n[Round 2]\n问：q2\n答："
    )
    v2 = _tokenizer("v2")
    assert v2.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："


@requires_reference
def test_v3_chat_input():
    """ChatGLM3 layout: [gMASK] sop, then per message <|role|> + encode(metadata + '\\n') + encode(text)."""
    tok = _tokenizer("v2")
    specials = tok.special_token_ids
    assert [specials[t] for t in ChatGLM2Tokenizer.ROLE_TOKENS] == [tok.sp.vocab_size() + 5 + i for i in range(4)]
    history = [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "ok"},
    ]
    encoded = tok.build_chat_input("hello", history=history)
    newline = tok.sp.encode("\n")
    expected = [specials["[gMASK]"], specials["sop"]]
    for role, text in [("system", "sys"), ("user", "hi"), ("assistant", "ok"), ("user", "hello")]:
        expected += [specials[f"<|{role}|>"]] + newline + tok.sp.encode(text)
    expected.append(specials["<|assistant|>"])
    assert encoded["input_ids"].tolist() == [expected]
    assert encoded["position_ids"].tolist() == [list(range(len(expected)))]
    assert tok.decode([specials["<|user|>"], specials["<|assistant|>"]]) == ""


@pytest.mark.parametrize(("version", "name"), case_params(("train_loss",)))
def test_build_train_example(version, name):
    """ptuning/main.py preprocessing, padded as there, reproduces the original training batch."""
    ref = reference(version)
    case = ref.cases[name]
    tok = _tokenizer(version)
    length = case["max_source_length"] + case["max_target_length"]
    ids, labels = [], []
    for prompt, answer in case["pairs"]:
        row_ids, row_labels = build_train_example(
            tok, prompt, answer, case["max_source_length"], case["max_target_length"]
        )
        assert len(row_ids) == len(row_labels) <= length
        ids.append(row_ids + [tok.pad_token_id] * (length - len(row_ids)))
        labels.append(row_labels + [-100] * (length - len(row_labels)))
    assert ids == ref.tensor(case, "input_ids").tolist()
    assert labels == ref.tensor(case, "labels").tolist()


@pytest.mark.parametrize(("version", "name"), case_params(("single", "batch_left_pad")))
def test_build_generation_inputs(version, name):
    """Prompts -> the exact tensors the original tokenizer gave to forward/generate."""
    ref = reference(version)
    case = ref.cases[name]
    tok = _tokenizer(version)
    prompts = case.get("texts") or case.get("queries") or [case.get("text") or case.get("query")]
    inputs = build_generation_inputs(tok, prompts)
    if version == "v1" and name.endswith(".single"):
        # Unpadded v1 calls return ids only; the padded call adds the mask/positions the model would build
        # (the recorded layer mask also has the P-tuning prefix columns in front).
        ids = ref.tensor(case, "input_ids")
        assert inputs["input_ids"].tolist() == ids.tolist()
        assert torch.equal(inputs["attention_mask"], ref.tensor(case, "layer_attention_mask")[..., -ids.shape[1]:])
        assert torch.equal(inputs["position_ids"], ref.tensor(case, "layer_position_ids"))
        return
    for field in ("input_ids", "attention_mask", "position_ids"):
        assert torch.equal(inputs[field], ref.tensor(case, field)), field
