"""Tool calling in `glmtune serve` for THUDM's formats, with the official openai client: a tiny random native
ChatGLM3 (ChatGLM3's role format, calls forced in its Python syntax) and a tiny GLM-4 (``name\\n{json}``)."""

import json
import re
import string

import jsonschema
import openai
import pytest

from glmtune.config import GlmtuneConfig
from glmtune.data.formats import Conversation, Turn
from glmtune.data.preprocess import build_prompts
from glmtune.data.tools import ToolCall, parse_answer
from glmtune.serve.api import create_app
from glmtune.serve.constraints import Constraints
from glmtune.serve.engine import Engine
from serve_helpers import running_server
from test_serve_tools import ASK, SCHEMAS, TOOLS, WEATHER, check_call
from tiny_models import GLM4_CHAT_TOOL_TEMPLATE, GLM4_TOOL_CALLS_TEMPLATE, build_chatglm3_folder, build_glm_folder

FUNCTIONS = [tool["function"] for tool in TOOLS]
@pytest.fixture(scope="module")
def chatglm3_engine(tmp_path_factory):
    folder = build_chatglm3_folder(tmp_path_factory.mktemp("chatglm3") / "model")
    engine = Engine.from_config(GlmtuneConfig(model_name_or_path=str(folder), max_new_tokens=200))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def client(chatglm3_engine):
    with running_server(create_app(chatglm3_engine)) as url:
        yield openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def test_a_native_chatglm3_model_uses_chatglm3s_tool_format(chatglm3_engine):
    assert chatglm3_engine.is_chatglm and chatglm3_engine.tool_syntax == "chatglm3"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_a_forced_call_from_a_random_chatglm3_has_schema_valid_arguments(client, chatglm3_engine, choice):
    reply = client.chat.completions.create(model=chatglm3_engine.name, messages=ASK, tools=TOOLS, tool_choice=choice,
                                           max_tokens=300)
    assert reply.choices[0].finish_reason == "tool_calls"
    [call] = reply.choices[0].message.tool_calls
    check_call(call)
    if isinstance(choice, dict):
        assert call.function.name == "add"


def test_the_grammar_writes_chatglm3s_python_call(chatglm3_engine):
    """What the model writes under a forced call is ChatGLM3's syntax itself, not JSON."""
    engine = chatglm3_engine
    constraints = Constraints(engine.tokenizer, engine.model.config.vocab_size, engine.tool_stop_ids, "chatglm3")
    conversation = Conversation([Turn(ASK[0]["content"], "")], tools=FUNCTIONS)
    [prompt] = build_prompts([conversation], engine.tokenizer, engine.bundle.template, 1 << 30)
    settings = engine.default_settings(max_new_tokens=300, logits_processor=constraints.one_call(FUNCTIONS))
    raw = "".join(engine.stream(prompt, settings))
    assert re.fullmatch(r"(get_weather|add)\n ?```python\ntool_call\(.*\)\n```", raw, re.DOTALL), raw
    _, [call] = parse_answer(raw, {"get_weather", "add"}, "chatglm3")
    jsonschema.validate(call.arguments, SCHEMAS[call.name])


@pytest.mark.parametrize("text, accepted", [
    ("add\n ```python\ntool_call(a=1, b=2)\n```", True),
    (" get_weather\n ```python\ntool_call(city='Paris', unit='celsius', days=2, alerts=True)\n```", True),  # as trained
    ('get_weather\n```python\ntool_call(city="Paris", unit="fahrenheit", days=7)\n```', True),
    ("add\n```python\ntool_call(a=1)\n```", False),  # b is required
    ("add\n```python\ntool_call(a=100, b=1)\n```", False),  # above its maximum
    ("get_weather\n```python\ntool_call(city='Paris', unit='kelvin', days=2)\n```", False),  # not in its enum
    ("get_weather\n```python\ntool_call(city='Paris', unit='celsius', days=2, alerts=true)\n```", False),  # JSON's
    ("add\n```python\ntool_call(a=1, b=2, c=3)\n```", False),  # no such argument
    ('add\n{"a": 1, "b": 2}', False),  # GLM-4's syntax
])
def test_the_chatglm3_grammar_is_chatglm3s_call_syntax_and_the_schema(chatglm3_engine, text, accepted):
    engine = chatglm3_engine
    constraints = Constraints(engine.tokenizer, engine.model.config.vocab_size, engine.tool_stop_ids, "chatglm3")
    matcher = constraints.one_call(FUNCTIONS).matcher
    complete = matcher.accept_string(text) and matcher.accept_token(engine.tokenizer.special_token_ids["<|observation|>"])
    assert complete == accepted


def test_streamed_chatglm3_calls_reassemble_into_the_same_call(client, chatglm3_engine):
    request = dict(model=chatglm3_engine.name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300,
                   seed=3)
    whole = client.chat.completions.create(**request).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**request, stream=True):
        reasons.append(chunk.choices[0].finish_reason)
        for part in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = part.id or call["id"]
            call["name"] += (part.function.name or "") if part.function else ""
            call["arguments"] += (part.function.arguments or "") if part.function else ""
    assert list(calls) == [0] and reasons[-1] == "tool_calls" and calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == whole.function.name
    assert json.loads(calls[0]["arguments"]) == json.loads(whole.function.arguments)


def test_a_tool_result_round_trips_into_chatglm3s_prompt(client, chatglm3_engine):
    engine = chatglm3_engine
    arguments = {"city": "Paris", "unit": "celsius", "days": 1}
    messages = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps(arguments)}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    reply = client.chat.completions.create(model=engine.name, messages=messages, tools=TOOLS, max_tokens=5)
    conversation = Conversation([Turn(ASK[0]["content"], "", calls=[ToolCall("get_weather", arguments)]),
                                 Turn("", "", observations=['{"temperature": 21}'])], tools=FUNCTIONS)
    [prompt] = build_prompts([conversation], engine.tokenizer, engine.bundle.template, 1 << 30)
    assert reply.usage.prompt_tokens == len(prompt)
    special = engine.tokenizer.special_token_ids
    observation = [special["<|observation|>"]] + engine.tokenizer.sp.encode("\n") + engine.tokenizer.sp.encode(
        '{"temperature": 21}')
    assert prompt[-len(observation) - 1:] == observation + [special["<|assistant|>"]]
    assert "tool_call(city='Paris', unit='celsius', days=1)" in engine.tokenizer.decode(prompt)


def test_json_schema_answers_from_chatglm3_validate(client, chatglm3_engine):
    reply = client.chat.completions.create(
        model=chatglm3_engine.name, messages=ASK, max_tokens=300,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), WEATHER)


def test_an_argument_that_cannot_be_a_keyword_is_a_400(client, chatglm3_engine):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"from": {"type": "string"}}, "required": ["from"]}}}]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=chatglm3_engine.name, messages=ASK, tools=tools, tool_choice="required")
    assert error.value.body["param"] == "tools" and "'from'" in error.value.body["message"]


def test_chatglm_v1_answers_400_naming_tools(native_chatglm_engine):
    engine = native_chatglm_engine("v1", max_new_tokens=4)
    with running_server(create_app(engine)) as url:
        v1 = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as error:
            v1.chat.completions.create(model=engine.name, messages=ASK, tools=TOOLS)
        assert error.value.body["param"] == "tools" and "role tokens" in error.value.body["message"]
        plain = v1.chat.completions.create(model=engine.name, messages=ASK, max_tokens=4)
        assert plain.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module", params=[GLM4_TOOL_CALLS_TEMPLATE, GLM4_CHAT_TOOL_TEMPLATE], ids=["tool_calls", "metadata"])
def glm4_engine(request, tmp_path_factory):
    folder = build_glm_folder(tmp_path_factory.mktemp("glm4-tools") / "model", "glm4", extra_text=string.printable,
                              chat_template=request.param, context=4096)
    engine = Engine.from_config(GlmtuneConfig(model_name_or_path=str(folder), max_new_tokens=200))
    yield engine
    engine.close()


def test_glm4_forced_calls_are_written_and_read_in_glm4s_syntax(glm4_engine):
    engine = glm4_engine
    assert engine.tool_syntax == "glm4"
    with running_server(create_app(engine)) as url:
        glm = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
        request = dict(model=engine.name, messages=ASK, tools=TOOLS, tool_choice="required", max_tokens=300)
        whole = glm.chat.completions.create(**request).choices[0]
        assert whole.finish_reason == "tool_calls"
        check_call(whole.message.tool_calls[0])
        streamed = {"name": "", "arguments": ""}
        for chunk in glm.chat.completions.create(**request, stream=True):
            for part in chunk.choices[0].delta.tool_calls or []:
                streamed["name"] += part.function.name or ""
                streamed["arguments"] += part.function.arguments or ""
        assert streamed["name"] == whole.message.tool_calls[0].function.name
        assert json.loads(streamed["arguments"]) == json.loads(whole.message.tool_calls[0].function.arguments)
    constraints = Constraints(engine.tokenizer, engine.model.config.vocab_size, engine.tool_stop_ids, "glm4")
    conversation = Conversation([Turn(ASK[0]["content"], "")], tools=FUNCTIONS)
    [prompt] = build_prompts([conversation], engine.tokenizer, engine.bundle.template, 1 << 30)
    assert "## get_weather" in engine.tokenizer.decode(prompt)  # GLM-4's template rendered the tools
    raw = "".join(engine.stream(prompt, engine.default_settings(max_new_tokens=300,
                                                                logits_processor=constraints.one_call(FUNCTIONS))))
    name, arguments = raw.split("\n", 1)
    assert name in SCHEMAS and json.loads(arguments) is not None, raw


def test_auto_is_unconstrained_and_a_random_answer_stays_text(client, chatglm3_engine):
    reply = client.chat.completions.create(model=chatglm3_engine.name, messages=ASK, tools=TOOLS, max_tokens=8)
    assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


def test_a_chatglm3_call_ends_at_observation(chatglm3_engine):
    """The per-request logits processor reaches native ChatGLM's generate (none before the first token), and a
    ChatGLM3 role-format answer stops at <|observation|>, as ChatGLM3's chat() does."""
    engine = chatglm3_engine
    letter, observation = engine.tokenizer.sp.piece_to_id("x"), engine.tokenizer.special_token_ids["<|observation|>"]
    seen = []

    def force(previous, logits):
        seen.append(None if previous is None else int(previous[0]))
        forced = logits.new_full(logits.shape, float("-inf"))
        forced[:, letter if previous is None else observation] = 0
        return forced

    conversation = Conversation([Turn(ASK[0]["content"], "")], tools=FUNCTIONS)
    [prompt] = build_prompts([conversation], engine.tokenizer, engine.bundle.template, 1 << 30)
    assert prompt[-1] == engine.tokenizer.special_token_ids["<|assistant|>"]
    assert "".join(engine.stream(prompt, engine.default_settings(max_new_tokens=20, logits_processor=force))) == "x"
    assert seen == [None, letter]
