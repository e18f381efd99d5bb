"""`glmtune serve`: the OpenAI-compatible API, driven with the official openai client."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from glmtune.errors import GlmtuneError
from glmtune.serve.api import StopScanner, check_listen, create_app
from serve_helpers import QUERY, answer, free_port, running_server

KEY = "test-key"


@pytest.fixture(scope="module")
def server(lora_engine):
    with running_server(create_app(lora_engine, api_key=KEY)) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def test_models_lists_tuned_and_base(client, lora_engine):
    ids = [model.id for model in client.models.list()]
    assert ids == [lora_engine.name, f"{lora_engine.name}:base"]
    assert client.models.retrieve(lora_engine.name).id == lora_engine.name


def test_chat_plain_and_streamed_give_the_engine_answer(client, lora_engine):
    expected = answer(lora_engine, [("类型#裙", "好看")], QUERY, max_new_tokens=10)
    messages = [{"role": "user", "content": "类型#裙"}, {"role": "assistant", "content": "好看"},
                {"role": "user", "content": QUERY}]
    reply = client.chat.completions.create(model=lora_engine.name, messages=messages, max_tokens=10)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(lora_engine.chat_prompt([("类型#裙", "好看")], QUERY))
    chunks = list(client.chat.completions.create(model=lora_engine.name, messages=messages, max_tokens=10, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_base_model_id_answers_with_the_base(client, lora_engine):
    reply = client.chat.completions.create(model=f"{lora_engine.name}:base", messages=[{"role": "user", "content": QUERY}],
                                           max_tokens=10)
    assert reply.choices[0].message.content == answer(lora_engine, [], QUERY, base=True, max_new_tokens=10)


def test_completions_plain_and_streamed(client, lora_engine):
    prompt = "类型#上衣"
    expected = "".join(lora_engine.stream(lora_engine.text_prompt(prompt), lora_engine.default_settings(max_new_tokens=8)))
    reply = client.completions.create(model=lora_engine.name, prompt=prompt, max_tokens=8)
    assert reply.choices[0].text == expected
    streamed = "".join(c.choices[0].text for c in client.completions.create(model=lora_engine.name, prompt=prompt,
                                                                            max_tokens=8, stream=True))
    assert streamed == expected


def test_stop_strings_cut_the_answer(client, lora_engine):
    full = answer(lora_engine, [], QUERY, max_new_tokens=12)
    stop = full[3:5]
    reply = client.chat.completions.create(model=lora_engine.name, messages=[{"role": "user", "content": QUERY}],
                                           max_tokens=12, stop=[stop])
    assert reply.choices[0].message.content == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_stop_scanner_holds_back_a_possible_stop_start():
    scanner = StopScanner(["END"])
    assert scanner.feed("abcE") == ("ab", False)
    assert scanner.feed("N") == ("c", False)
    assert scanner.feed("D tail") == ("", True)


def test_wrong_or_missing_key_is_401(server, lora_engine):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/models").status_code == 401


@pytest.mark.parametrize("change, message", [
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_tokens": 100_000}, "context"),
    ({"model": "gpt-4o"}, "unknown model"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, "user"),
    ({"temperature": 7}, "temperature"),
])
def test_bad_requests_are_400_with_a_message(client, lora_engine, change, message):
    request = {"model": lora_engine.name, "messages": [{"role": "user", "content": QUERY}], **change}
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(**request)
    assert message in error.value.body["message"]


def test_bad_json_and_overlong_prompt_are_400(server, lora_engine):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    reply = httpx.post(f"{server}/chat/completions", content=b"{not json", headers=headers)
    assert reply.status_code == 400 and "JSON" in reply.json()["error"]["message"]
    long_prompt = "问" * (lora_engine.context_length + 10)
    reply = httpx.post(f"{server}/completions", json={"model": lora_engine.name, "prompt": long_prompt}, headers=headers)
    assert reply.status_code == 400 and "context" in reply.json()["error"]["message"]


def test_concurrent_streams_are_not_mixed(server, lora_engine):
    queries = [QUERY, "类型#裙", "类型#裤*版型#宽松", "问", "一二三", "类型#上衣"] * 2
    expected = [answer(lora_engine, [], q, max_new_tokens=10) for q in queries]

    def ask(query):
        client = openai.OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=lora_engine.name, messages=[{"role": "user", "content": query}],
                                                max_tokens=10, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(len(queries)) as pool:
        assert list(pool.map(ask, queries)) == expected


def test_open_address_without_key_and_taken_port_are_refused(server):
    with pytest.raises(GlmtuneError, match="without --api-key"):
        check_listen("0.0.0.0", free_port(), None)
    check_listen("0.0.0.0", free_port(), "key")
    check_listen("127.0.0.1", free_port(), None)
    taken = int(server.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(GlmtuneError, match="cannot listen"):
        check_listen("127.0.0.1", taken, None)
