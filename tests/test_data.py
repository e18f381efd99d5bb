import json
import logging

import pytest
from transformers import AutoTokenizer

from glmtune.data.formats import FormatOptions, read_conversations
from glmtune.data.preprocess import IGNORE_INDEX, build_examples, build_prompts, collate
from glmtune.data.templates import Template, get_template
from glmtune.errors import GlmtuneError


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_columns_with_history_and_json_array(tmp_path):
    record = {"q": "第二问", "a": "第二答", "h": [["第一问", "第一答"]]}
    path = tmp_path / "data.json"
    path.write_text(json.dumps([record], ensure_ascii=False), encoding="utf-8")
    options = FormatOptions(prompt_column="q", response_column="a", history_column="h")
    (conversation,) = read_conversations(path, options)
    assert [(t.query, t.answer, t.trains) for t in conversation.turns] == [("第一问", "第一答", False), ("第二问", "第二答", True)]


def test_alpaca_joins_instruction_and_input(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", [json.dumps({"instruction": "翻译", "input": "hello", "output": "你好"})])
    (conversation,) = read_conversations(path, FormatOptions(dataset_format="alpaca"))
    assert conversation.turns[-1].query == "翻译\nhello"
    assert conversation.turns[-1].answer == "你好"


@pytest.mark.parametrize("train_on, expected", [("last", [False, True]), ("all", [True, True])])
def test_sharegpt_train_on(tmp_path, train_on, expected):
    turns = [{"from": "system", "value": "你是助手"}, {"from": "human", "value": "问一"}, {"from": "gpt", "value": "答一"},
             {"from": "human", "value": "问二"}, {"from": "gpt", "value": "答二"}]
    path = write_lines(tmp_path / "s.jsonl", [json.dumps({"conversations": turns}, ensure_ascii=False)])
    (conversation,) = read_conversations(path, FormatOptions(dataset_format="sharegpt", train_on=train_on))
    assert conversation.system == "你是助手"
    assert [t.trains for t in conversation.turns] == expected


def test_chatglm_template_matches_chatglm2_build_prompt(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"q": "问二", "a": "答二", "h": [["问一", "答一"]]}, ensure_ascii=False)])
    (conversation,) = read_conversations(path, FormatOptions(prompt_column="q", response_column="a", history_column="h"))
    prompt = Template("chatglm").generation_prompt(conversation)
    assert prompt == "[Round 1]\n\n问：问一\n\n答：答一\n\n[Round 2]\n\n问：问二\n\n答："


def test_separate_truncation_and_labels(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"content": "类型#上衣*颜色#白色", "summary": "这款上衣干净百搭"}, ensure_ascii=False)])
    conversations = read_conversations(path, FormatOptions())
    template = Template("plain")
    (example,) = build_examples(conversations, tokenizer, template, max_source_length=5, max_target_length=4)
    assert len(example.input_ids) == 5 + 4
    assert example.labels[:5] == [IGNORE_INDEX] * 5
    answer = example.labels[5:]
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer[:-1]) == "这款上"
    assert example.input_ids[0] == tokenizer.bos_token_id
    (prompt,) = build_prompts(conversations, tokenizer, template, max_source_length=5)
    assert prompt == example.input_ids[:5]


def test_train_on_all_labels_every_answer(tmp_path, tokenizer):
    turns = [{"from": "human", "value": "问一"}, {"from": "gpt", "value": "答一"}, {"from": "human", "value": "问二"}, {"from": "gpt", "value": "答二"}]
    path = write_lines(tmp_path / "s.jsonl", [json.dumps({"conversations": turns}, ensure_ascii=False)])
    template = Template("chatglm")
    for train_on, answers in (("all", "答一答二"), ("last", "答二")):
        conversations = read_conversations(path, FormatOptions(dataset_format="sharegpt", train_on=train_on))
        (example,) = build_examples(conversations, tokenizer, template, 64, 64)
        labelled = [t for t in example.labels if t not in (IGNORE_INDEX, tokenizer.eos_token_id)]
        assert tokenizer.decode(labelled) == answers


def test_collate_pads_right_with_ignored_labels(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [json.dumps({"content": "短", "summary": "答"}, ensure_ascii=False),
                                              json.dumps({"content": "长一点的问题", "summary": "长一点的回答"}, ensure_ascii=False)])
    examples = build_examples(read_conversations(path, FormatOptions()), tokenizer, Template("plain"), 64, 64)
    batch = collate(examples, tokenizer.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape[1] == -(-len(examples[1].input_ids) // 8) * 8
    assert (batch["labels"][0, short:] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][0, short:] == 0).all() and (batch["input_ids"][0, short:] == tokenizer.pad_token_id).all()


def test_chat_template_segments(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    template = get_template("auto", tokenizer)
    from glmtune.data.formats import Conversation, Turn

    (segment,) = template.segments(Conversation([Turn("问", "答")]))
    assert (segment.prompt, segment.answer) == ("<user>问\n<assistant>", "答\n")


# ---- bad data: one line naming file, line and key ----

def test_broken_json_line_names_the_line(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"content": "a", "summary": "b"}', '{"content": "a", "summary": '])
    with pytest.raises(GlmtuneError, match=r"bad\.jsonl:2: not valid JSON"):
        read_conversations(path, FormatOptions())


def test_missing_column_names_line_and_key(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"content": "a", "summary": "b"}', '{"content": "a", "answer": "b"}'])
    with pytest.raises(GlmtuneError, match=r"bad\.jsonl:2: missing key 'summary'"):
        read_conversations(path, FormatOptions())


def test_non_string_field_names_line_and_key(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"content": 5, "summary": "b"}'])
    with pytest.raises(GlmtuneError, match=r"bad\.jsonl:1: key 'content' must be a string, got int"):
        read_conversations(path, FormatOptions())


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(GlmtuneError, match="no usable records"):
        read_conversations(path, FormatOptions())


def test_skip_bad_records_counts_them(tmp_path, caplog):
    path = write_lines(tmp_path / "mixed.jsonl", ['{"content": "a", "summary": "b"}', "{oops", '{"content": "a"}', '{"content": "c", "summary": "d"}'])
    with caplog.at_level(logging.WARNING):
        conversations = read_conversations(path, FormatOptions(), skip_bad_records=True)
    assert len(conversations) == 2
    assert "skipped 2 bad record(s)" in caplog.text


def test_truncation_leaving_no_answer_is_an_error(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", ['{"content": "问题", "summary": "回答"}'])
    conversations = read_conversations(path, FormatOptions())
    with pytest.raises(GlmtuneError, match="no example has answer tokens"):
        build_examples(conversations, tokenizer, Template("plain"), 64, max_target_length=1)
