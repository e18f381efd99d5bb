"""Tool-call training data: sharegpt function_call/observation turns with a tools column, rendered as serve
renders them, with loss on the assistant's calls and answers and none on observations."""

import json
import string

import pytest

from glmtune.data.formats import FormatOptions, read_conversations
from glmtune.data.preprocess import IGNORE_INDEX, encode_conversation
from glmtune.data.templates import ChatTemplate, Template
from glmtune.data.tools import CallSplitter, ToolCall, calls_text, parse_answer, results_text
from glmtune.errors import GlmtuneError
from tiny_models import build_tokenizer, corpus_texts

FUNCTION = {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "Paris"}}
RECORD = {
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "weather in Paris?"},
        {"from": "function_call", "value": json.dumps(CALL)},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps([FUNCTION]),  # LLaMA-Factory keeps it a JSON string; a list works too
}

# A minimal tool-aware chat template in the Hermes/Qwen style, written for this test.
TOOL_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{{ messages[0]['content'] if messages[0]['role'] == 'system' else '' }}"
    "<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
    "{%- elif m['role'] == 'assistant' %}<|im_start|>assistant\n{{ m['content'] or '' }}"
    "{%- for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}<|im_end|>\n"
    "{%- elif m['role'] == 'tool' %}<|im_start|>user\n<tool_response>{{ m['content'] }}</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(corpus_texts() + [string.printable])


def write(tmp_path, records) -> str:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def read(tmp_path, records, **options):
    return read_conversations(write(tmp_path, records), FormatOptions(dataset_format="sharegpt", **options))


def test_glaive_style_record_reads_into_call_and_observation_turns(tmp_path):
    listed = {**RECORD, "tools": [{"type": "function", "function": FUNCTION}]}
    for record in (RECORD, listed):
        [conversation] = read(tmp_path, [record])
        assert conversation.tools == [FUNCTION] and conversation.system == "be brief"
        first, second = conversation.turns
        assert first.query == "weather in Paris?" and first.answer == ""
        assert [(c.name, c.arguments) for c in first.calls] == [("get_weather", {"city": "Paris"})]
        assert second.observations == ['{"temp": 21}'] and second.answer == "It is 21 degrees."
        assert first.trains and second.trains


def test_labels_cover_calls_and_answers_not_observations(tmp_path, tokenizer):
    [conversation] = read(tmp_path, [RECORD])
    example = encode_conversation(conversation, tokenizer, Template("chatglm"), 4096, 512)
    labelled = [token if label != IGNORE_INDEX else None for token, label in zip(example.input_ids, example.labels)]
    spans, current = [], []
    for token in labelled + [None]:
        if token is None and current:
            spans.append(tokenizer.decode(current, skip_special_tokens=True))
            current = []
        elif token is not None:
            current.append(token)
    assert spans == [calls_text([ToolCall("get_weather", {"city": "Paris"})]), "It is 21 degrees."]
    whole = tokenizer.decode(example.input_ids, skip_special_tokens=True)
    assert results_text(['{"temp": 21}']) in whole and '"name": "get_weather"' in whole and "<tools>" in whole


def test_chat_template_with_tools_renders_as_apply_chat_template(tmp_path, tokenizer):
    tokenizer.chat_template = TOOL_TEMPLATE
    [conversation] = read(tmp_path, [RECORD])
    template = ChatTemplate(tokenizer)
    assert template.native_tools
    messages = [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": conversation.turns[0].calls[0].id, "type": "function",
                                                            "function": CALL}]},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    tools = [{"type": "function", "function": FUNCTION}]
    expected_prompt = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert template.generation_prompt(conversation) == expected_prompt
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "It is 21 degrees."}], tools=tools,
                                         tokenize=False)
    assert "".join(s.prompt + s.answer for s in template.segments(conversation)) == full
    assert [s.trains for s in template.segments(conversation)] == [True, True]


def test_chat_template_without_tools_gets_the_fallback_format(tmp_path, tokenizer):
    tokenizer.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                               "{% if add_generation_prompt %}<assistant>{% endif %}")
    [conversation] = read(tmp_path, [RECORD])
    template = ChatTemplate(tokenizer)
    assert not template.native_tools
    prompt = template.generation_prompt(conversation)
    assert "<system>be brief\n\n# Tools" in prompt and json.dumps(FUNCTION) in prompt
    assert "<user>" + results_text(['{"temp": 21}']) in prompt
    assert f"<assistant>{calls_text([ToolCall('get_weather', {'city': 'Paris'})])}" in prompt


@pytest.mark.parametrize("change, message", [
    ({"tools": None}, "needs the record's 'tools'"),
    ({"tools": "[{"}, "'tools' is not valid JSON"),
    ({"tools": [{"description": "x"}]}, "'tools' item 0 needs a 'name'"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "r"},
                        {"from": "gpt", "value": "a"}]}, "an observation must follow a function_call turn"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{not json"}]},
     "a function_call value must be JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": '{"name": "f", "arguments": 3}'}]},
     "must be a JSON object"),
])
def test_bad_tool_records_name_the_file_and_line(tmp_path, change, message):
    record = {**RECORD, **change}
    record = {key: value for key, value in record.items() if value is not None}
    with pytest.raises(GlmtuneError) as error:
        read(tmp_path, [RECORD, record])
    assert "tools.jsonl:2" in str(error.value) and message in str(error.value)


def test_streamed_splitting_matches_whole_parsing():
    text = ('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
            '<tool_call>{"name": "unknown", "arguments": {}}</tool_call> and <tool')
    content, calls = parse_answer(text, {"get_weather"})
    assert [c.name for c in calls] == ["get_weather"] and calls[0].arguments == {"city": "Paris"}
    assert content == 'Let me check.<tool_call>{"name": "unknown", "arguments": {}}</tool_call> and <tool'
    splitter = CallSplitter({"get_weather"})
    pieces = [p for character in text for p in splitter.feed(character)] + splitter.flush()
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == content
    assert [p.arguments for p in pieces if isinstance(p, ToolCall)] == [{"city": "Paris"}]
    assert parse_answer('{"name": "get_weather", "parameters": {"city": "Oslo"}}', {"get_weather"})[1][0].arguments == {
        "city": "Oslo"}
