"""Tool calling and structured output in `glmtune serve`, driven with the official openai client.

The model is a tiny random Llama: whatever it writes under a forced call or a JSON schema must still
parse and match the schema, because constrained decoding allows nothing else.
"""

import json

import jsonschema
import openai
import pytest

from glmtune.data.formats import Conversation, Turn
from glmtune.data.preprocess import build_prompts
from glmtune.data.tools import ToolCall, results_text
from glmtune.serve.api import create_app
from serve_helpers import running_server

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["celsius", "fahrenheit"]},
                   "days": {"type": "integer", "minimum": 1, "maximum": 7}, "alerts": {"type": "boolean"}},
    "required": ["city", "unit", "days"], "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tool_engine):
    with running_server(create_app(tool_engine)) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def check_call(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    assert call.type == "function" and call.id.startswith("call_")
    return arguments


def test_required_call_has_schema_valid_arguments(client, tool_engine):
    reply = client.chat.completions.create(model=tool_engine.name, messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=300)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    check_call(call)


def test_named_call_calls_that_function(client, tool_engine):
    reply = client.chat.completions.create(model=tool_engine.name, messages=ASK, tools=TOOLS, max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "add"}})
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "add"
    assert set(check_call(call)) == {"a", "b"}


def test_streamed_call_reassembles_into_the_same_call(client, tool_engine):
    request = dict(model=tool_engine.name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300)
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        reasons.append(chunk.choices[0].finish_reason)
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += (part.function.name or "") if part.function else ""
            call["arguments"] += (part.function.arguments or "") if part.function else ""
    assert list(calls) == [0] and reasons[-1] == "tool_calls"
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)
    assert calls[0]["id"].startswith("call_")


def test_tool_result_round_trips_into_the_prompt(client, tool_engine):
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(model=tool_engine.name, messages=messages, tools=TOOLS, max_tokens=5)
    call = ToolCall("get_weather", {"city": "Paris", "unit": "celsius", "days": 1}, "call_1")
    functions = [tool["function"] for tool in TOOLS]
    conversation = Conversation([Turn(ASK[0]["content"], "", calls=[call]), Turn("", "", observations=['{"temperature": 21}'])],
                                tools=functions)
    prompt = build_prompts([conversation], tool_engine.tokenizer, tool_engine.bundle.template, 1 << 30)[0]
    assert reply.usage.prompt_tokens == len(prompt)
    text = tool_engine.tokenizer.decode(prompt)
    assert results_text(['{"temperature": 21}']) in text and '"name": "get_weather"' in text
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_json_schema_answer_parses_and_validates(client, tool_engine):
    reply = client.chat.completions.create(
        model=tool_engine.name, messages=ASK, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)
    assert reply.choices[0].finish_reason == "stop"


def test_json_object_answer_parses(client, tool_engine):
    # A random model may open nested objects without end; the budget bounds it, and what it wrote is JSON so far.
    reply = client.chat.completions.create(model=tool_engine.name, messages=ASK, max_tokens=300,
                                           response_format={"type": "json_object"})
    content = reply.choices[0].message.content
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(content), (dict, list))
    else:
        assert content.lstrip()[:1] in "{["


def test_tool_choice_none_answers_in_prose_without_tools_in_the_prompt(client, tool_engine):
    with_none = client.chat.completions.create(model=tool_engine.name, messages=ASK, tools=TOOLS, tool_choice="none",
                                               max_tokens=5)
    without = client.chat.completions.create(model=tool_engine.name, messages=ASK, max_tokens=5)
    assert with_none.usage.prompt_tokens == without.usage.prompt_tokens
    assert with_none.choices[0].message.tool_calls is None


@pytest.mark.parametrize("change, param, message", [
    ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name", "not among"),
    ({"response_format": {"type": "json_object"}, "tool_choice": "auto"}, "response_format", "together with tools"),
    ({"response_format": {"type": "json_schema"}, "tools": None}, "response_format.json_schema", "required"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "does not support"),
    ({"logprobs": True}, "logprobs", "log probabilities"),
    ({"top_logprobs": 2}, "top_logprobs", "does not support"),
    ({"n": 2}, "n", "one choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
])
def test_bad_tool_requests_are_400_naming_the_field(client, tool_engine, change, param, message):
    request = {"model": tool_engine.name, "messages": ASK, "tools": TOOLS, "max_tokens": 5, **change}
    request = {key: value for key, value in request.items() if value is not None}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    assert error.value.body["param"] == param and message in error.value.body["message"]


@pytest.mark.parametrize("messages, param", [
    ([{"role": "tool", "tool_call_id": "x", "content": "1"}], "messages.0.tool_call_id"),
    (ASK + [{"role": "assistant", "content": "ok"}, {"role": "tool", "tool_call_id": "x", "content": "1"}], "messages.2.tool_call_id"),
    (ASK + [{"role": "assistant", "tool_calls": [{"id": "a", "type": "function",
                                                   "function": {"name": "add", "arguments": "{"}}]}],
     "messages.1.tool_calls.0.function.arguments"),
])
def test_bad_tool_conversations_are_400(client, tool_engine, messages, param):
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=tool_engine.name, messages=messages, tools=TOOLS, max_tokens=5)
    assert error.value.body["param"] == param
