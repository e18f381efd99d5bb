"""THUDM's tool formats: ChatGLM3's for native ChatGLM2/3 (rendered token by token, read back safely, trained with
loss on the assistant's messages only) and GLM-4's ``name\\n{json}`` answers."""

import dataclasses
import json
import string
import sys
from pathlib import Path

import pytest

from glmtune.config import GlmtuneConfig
from glmtune.data.formats import Conversation, FormatOptions, Turn, read_conversations
from glmtune.data.preprocess import IGNORE_INDEX, build_prompts, encode_conversation
from glmtune.data.templates import NativeChatGLMTemplate, get_template
from glmtune.data.tools import ToolCall, call_splitter, parse_answer
from glmtune.data.tools_chatglm import python_arguments, read_python_arguments
from glmtune.errors import GlmtuneError
from glmtune.models.loading import load_tokenizer
from glmtune.recipes.train import run_train
from tiny_models import GLM4_CHAT_TOOL_TEMPLATE, build_chatglm3_folder, build_glm_tokenizer

FUNCTION = {"name": "get_weather", "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
RECORD = {
    "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "human", "value": "weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": '{"temp": 21}'},
        {"from": "gpt", "value": "It is 21 degrees."},
    ],
    "tools": json.dumps([FUNCTION]),
}
# ChatGLM3's own default system text for tools (THUDM's finetune_chatmodel_demo and openai_api_demo), written out here.
DEFAULT_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
KNOWN = {"get_weather", "add"}


@pytest.fixture(scope="module")
def chatglm3(tmp_path_factory) -> Path:
    return build_chatglm3_folder(tmp_path_factory.mktemp("chatglm3") / "model")


@pytest.fixture(scope="module")
def tokenizer(chatglm3):
    return load_tokenizer(str(chatglm3))


def read(tmp_path, records) -> list[Conversation]:
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return read_conversations(path, FormatOptions(dataset_format="sharegpt"))


def message(tokenizer, role: str, metadata: str, text: str) -> list[int]:
    """One ChatGLM3 message by hand: the role token, the metadata line, the text (SentencePiece pieces)."""
    return [tokenizer.special_token_ids[f"<|{role}|>"]] + tokenizer.sp.encode(f"{metadata}\n") + tokenizer.sp.encode(text)


def test_a_tool_conversation_renders_in_chatglm3s_format_token_by_token(tmp_path, tokenizer):
    [conversation] = read(tmp_path, [RECORD])
    template = get_template("auto", tokenizer)
    assert isinstance(template, NativeChatGLMTemplate)
    example = encode_conversation(conversation, tokenizer, template, 4096, 512)

    special = tokenizer.special_token_ids
    system = message(tokenizer, "system", "", "be brief\n" + json.dumps([FUNCTION], indent=4, ensure_ascii=False))
    user = message(tokenizer, "user", "", "weather in Paris?")
    call = message(tokenizer, "assistant", "get_weather", "```python\ntool_call(city='Paris')\n```")
    result = message(tokenizer, "observation", "", '{"temp": 21}')
    answer = message(tokenizer, "assistant", "", "It is 21 degrees.")
    start = [special["[gMASK]"], special["sop"]]
    assert example.input_ids == start + system + user + call + result + answer + [tokenizer.eos_token_id]

    # Learned: each assistant message after its role token, and the token that ends it (<|observation|>, EOS).
    hidden = [IGNORE_INDEX]
    expected = (hidden * len(start + system + user) + hidden + call[1:] + [result[0]] + hidden * (len(result) - 1)
                + hidden + answer[1:] + [tokenizer.eos_token_id])
    assert example.labels == expected


def test_the_prompt_is_chatglm3s_build_chat_input(tmp_path, tokenizer):
    record = {"conversations": RECORD["conversations"][1:2] + [{"from": "gpt", "value": ""}], "tools": [FUNCTION]}
    conversation = read_conversations(_write(tmp_path, record), FormatOptions(dataset_format="sharegpt",
                                                                              require_response=False))[0]
    template = get_template("auto", tokenizer)
    [prompt] = build_prompts([conversation], tokenizer, template, 1 << 30)
    history = [{"role": "system", "content": DEFAULT_SYSTEM, "tools": [FUNCTION]}]
    assert prompt == tokenizer.build_chat_input("weather in Paris?", history=history)["input_ids"][0].tolist()
    assert prompt[-1] == tokenizer.special_token_ids["<|assistant|>"]


def _write(tmp_path, record) -> Path:
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    return path


def test_a_prompt_after_tool_results_ends_with_the_observation_then_assistant(tokenizer):
    call = ToolCall("get_weather", {"city": "Paris", "days": 2, "alerts": True})
    conversation = Conversation([Turn("weather?", "", calls=[call]), Turn("", "", observations=["sunny"])],
                                tools=[FUNCTION])
    [prompt] = build_prompts([conversation], tokenizer, get_template("auto", tokenizer), 1 << 30)
    tail = (message(tokenizer, "assistant", "get_weather",
                    "```python\ntool_call(city='Paris', days=2, alerts=True)\n```")
            + message(tokenizer, "observation", "", "sunny") + [tokenizer.special_token_ids["<|assistant|>"]])
    assert prompt[-len(tail):] == tail


def test_python_arguments_round_trip_through_the_safe_reader():
    arguments = {"city": "Zürich 'x' \"y\"", "days": 3, "ratio": 0.5, "alerts": False, "tags": ["a", None],
                 "where": {"lat": 1.5}}
    written = python_arguments(arguments)
    assert written.startswith("tool_call(city=") and "alerts=False" in written
    assert read_python_arguments(f"```python\n{written}\n```") == arguments
    with pytest.raises(GlmtuneError, match="'class'"):
        python_arguments({"class": 1})


@pytest.mark.parametrize("code", [
    "tool_call(city=__import__('os').getcwd())",  # a call, not a literal: literal_eval refuses it
    "tool_call(city=open('/etc/passwd').read())",
    "tool_call('Paris')",  # positional
    "tool_call(**{'city': 'Paris'})",
    "tool_call(city={1, 2})",  # a set: no JSON for it
    "tool_call(city='Paris'",  # unfinished
    "import os",
])
def test_code_that_is_not_a_call_of_literals_stays_text(code):
    answer = f"get_weather\n```python\n{code}\n```"
    assert parse_answer(answer, KNOWN, "chatglm3") == (answer, [])


def test_chatglm3_answers_are_read_back_into_calls():
    text, [call] = parse_answer("get_weather\n ```python\ntool_call(city='Paris', days=2)\n```", KNOWN, "chatglm3")
    assert text == "" and (call.name, call.arguments) == ("get_weather", {"city": "Paris", "days": 2})
    unknown = "get_time\n```python\ntool_call(city='Paris')\n```"
    assert parse_answer(unknown, KNOWN, "chatglm3") == (unknown, [])
    assert parse_answer("It is sunny.", KNOWN, "chatglm3") == ("It is sunny.", [])


def test_glm4_answers_are_read_back_into_calls():
    text, [call] = parse_answer('add\n{"a": 1, "b": 2}', KNOWN, "glm4")
    assert text == "" and (call.name, call.arguments) == ("add", {"a": 1, "b": 2})
    for kept in ('add\n{"a": 1, "b": ', 'add\n[1, 2]', 'subtract\n{"a": 1}', "add two numbers\n{}"):
        assert parse_answer(kept, KNOWN, "glm4") == (kept.strip(), [])


@pytest.mark.parametrize("syntax, answer", [
    ("chatglm3", "get_weather\n```python\ntool_call(city='Paris')\n```"),
    ("glm4", 'add\n{"a": 1, "b": 2}'),
    ("glm4", "addition is easy\nsee"),
    ("chatglm3", "get_weather\n```python\ntool_call(city=Paris)\n```"),
])
def test_streamed_pieces_give_what_the_whole_answer_gives(syntax, answer):
    splitter = call_splitter(syntax, KNOWN)
    pieces = [piece for character in answer for piece in splitter.feed(character)] + splitter.flush()
    whole_text, whole_calls = parse_answer(answer, KNOWN, syntax)
    assert "".join(p for p in pieces if isinstance(p, str)).strip() == whole_text
    assert [(c.name, c.arguments) for c in pieces if isinstance(c, ToolCall)] == [(c.name, c.arguments)
                                                                                 for c in whole_calls]


def test_text_streams_as_soon_as_it_cannot_be_a_call():
    splitter = call_splitter("glm4", KNOWN)
    assert splitter.feed("ad") == []  # could still be "add\n"
    assert splitter.feed("vice: ") == ["advice: "]
    assert splitter.feed("rest") == ["rest"]


def test_a_sharegpt_tool_record_trains_native_chatglm3_on_assistant_messages_only(tmp_path, chatglm3, tokenizer):
    records = [RECORD] * 4
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    [conversation] = read(tmp_path, [RECORD])
    example = encode_conversation(conversation, tokenizer, get_template("auto", tokenizer), 4096, 512)
    learned = [token for token, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    # (each message's text starts with SentencePiece's space piece, hence the split)
    assert tokenizer.decode(learned).split() == ["get_weather", "```python", "tool_call(city='Paris')", "```", "It",
                                                 "is", "21", "degrees."]
    assert tokenizer.special_token_ids["<|observation|>"] in learned  # the call ends itself
    assert not {tokenizer.special_token_ids[t] for t in ("<|user|>", "<|system|>", "<|assistant|>")} & set(learned)

    result = run_train(GlmtuneConfig(do_train=True, model_name_or_path=str(chatglm3), train_file=str(path),
                                     dataset_format="sharegpt", output_dir=str(tmp_path / "out"), finetuning_type="lora",
                                     max_steps=4, learning_rate=5e-2, report_to="none", logging_steps=1,
                                     per_device_train_batch_size=2))
    assert result.losses[-1] < result.losses[0], result.losses


def test_chatglm_v1_has_no_tool_format(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "chatglm"))
    from _chatglm_reference import AVAILABLE, SKIP_REASON, reference

    if not AVAILABLE:
        pytest.skip(SKIP_REASON)
    from glmtune.models.chatglm import load_chatglm_tokenizer

    v1 = load_chatglm_tokenizer(reference("v1").sp_model)
    [conversation] = read(tmp_path, [RECORD])
    with pytest.raises(GlmtuneError, match="role tokens"):
        encode_conversation(conversation, v1, get_template("auto", v1), 512, 512)


def test_glm4_chat_templates_get_calls_and_results_in_their_own_message_shape(tmp_path):
    from glmtune.data.templates import ChatTemplate
    tokenizer = build_glm_tokenizer(string.printable)
    tokenizer.chat_template = GLM4_CHAT_TOOL_TEMPLATE
    [conversation] = read(tmp_path, [RECORD])
    template = get_template("auto", tokenizer)
    assert isinstance(template, ChatTemplate) and template.metadata_calls and template.message_tools
    messages = [
        {"role": "system", "content": "be brief", "tools": [{"type": "function", "function": FUNCTION}]},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 degrees."},
    ]
    segments = template.segments(conversation)
    assert "".join(s.prompt + s.answer for s in segments) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [s.answer for s in segments] == ['get_weather\n{"city": "Paris"}', "\nIt is 21 degrees."]
    prompt = template.generation_prompt(dataclasses.replace(conversation, turns=conversation.turns[:1]))
    assert prompt == tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert "## get_weather" in prompt
