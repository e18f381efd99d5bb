"""Bad input to `glmtune serve` and `glmtune web`: each case is a clear 400/401/413 (never a 500 or a
silently coerced value), tokenization runs off the event loop, and a client that hangs up stops its job."""

import json
import threading

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmtune.errors import GlmtuneError
from glmtune.serve.api import create_app
from glmtune.serve.web import build_demo, check_web_listen, parse_auth
from serve_helpers import QUERY, free_port, running_server

KEY = "robust-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def api(lora_engine):
    with TestClient(create_app(lora_engine, api_key=KEY, max_request_bytes=64 * 1024)) as client:
        yield client


def post(api, path: str, body: dict):
    """JSON with ASCII escapes, so a lone surrogate travels as the 6 characters \\ud800, as a client sends it."""
    return api.post(path, content=json.dumps(body).encode(), headers={**HEADERS, "Content-Type": "application/json"})


def chat(api, engine, **change):
    body = {"model": engine.name, "messages": [{"role": "user", "content": QUERY}], "max_tokens": 2, **change}
    return post(api, "/v1/chat/completions", body)


@pytest.mark.parametrize("change, param, message", [
    ({"stream": "yes"}, "stream", "boolean"),
    ({"stream": 1}, "stream", "boolean"),
    ({"max_tokens": "4"}, "max_tokens", "integer"),
    ({"max_tokens": 4.0}, "max_tokens", "integer"),
    ({"temperature": "0.5"}, "temperature", "number"),
    ({"seed": 2**70}, "seed", "less than or equal"),
    ({"seed": -1}, "seed", "greater than or equal"),
    ({"seed": True}, "seed", "integer"),
    ({"stop": 5}, "stop", "string"),
    ({"model": 3}, "model", "string"),
    ({"user": 5}, "user", "string"),
    ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage", "boolean"),
    ({"presence_penalty": 0}, "presence_penalty", "does not support"),
    ({"logit_bias": {"1": 5}}, "logit_bias", "does not support"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0", "tag"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", ""),
    ({"messages": [{"role": "user", "content": "\ud800"}]}, "messages.0.content", "lone surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfffb"}]}]}, "messages.0.content.0.text",
     "lone surrogate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", ""),
    ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages.0.name", "does not support"),
    ({"stop": ["\ud800"]}, "stop.0", "lone surrogate"),
])
def test_bad_chat_fields_are_400_naming_the_field(api, lora_engine, change, param, message):
    reply = chat(api, lora_engine, **change)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("prompt, param, message", [
    ("", "prompt", "empty"),
    ([], "prompt", "one prompt"),
    ("\ud800", "prompt", "lone surrogate"),
    (5, "prompt", "string"),
])
def test_bad_completion_prompts_are_400(api, lora_engine, prompt, param, message):
    reply = post(api, "/v1/completions", {"model": lora_engine.name, "prompt": prompt, "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param and message in reply.json()["error"]["message"]


def test_oversized_bodies_are_413_with_or_without_a_length(api, lora_engine):
    big = {"model": lora_engine.name, "prompt": "问" * 40_000}
    reply = api.post("/v1/completions", json=big, headers=HEADERS)
    assert reply.status_code == 413 and "over 65536 bytes" in reply.json()["error"]["message"]

    def chunks():  # no Content-Length: the body arrives chunked
        data = json.dumps(big).encode()
        for start in range(0, len(data), 8192):
            yield data[start : start + 8192]

    reply = api.post("/v1/completions", content=chunks(), headers={**HEADERS, "Content-Type": "application/json"})
    assert reply.status_code == 413


def test_openapi_needs_the_key(api):
    assert api.get("/openapi.json").status_code == 401
    reply = api.get("/openapi.json", headers=HEADERS)
    assert reply.status_code == 200 and "/v1/chat/completions" in reply.json()["paths"]
    assert api.get("/docs").status_code == 404


def test_tokenization_runs_off_the_event_loop(api, lora_engine, monkeypatch):
    threads = []
    original = lora_engine.text_prompt
    monkeypatch.setattr(lora_engine, "text_prompt", lambda text: threads.append(threading.current_thread().name)
                        or original(text))
    reply = api.post("/v1/completions", json={"model": lora_engine.name, "prompt": "类型", "max_tokens": 2},
                     headers=HEADERS)
    assert reply.status_code == 200
    assert threads and all(name.startswith("glmtune-tokenize") for name in threads)


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["stream", "temperature", "top_p", "seed", "stop", "n", "model", "messages", "user",
                              "logprobs", "stream_options", "tools", "tool_choice", "response_format", "prompt"]),
       value=JSON_VALUES)
def test_any_json_in_any_field_is_answered_never_a_500(api, lora_engine, field, value):
    endpoint = "/v1/completions" if field == "prompt" else "/v1/chat/completions"
    body = {"model": lora_engine.name, "max_tokens": 1, field: value}
    if field != "prompt":
        body.setdefault("messages", [{"role": "user", "content": QUERY}])
    reply = post(api, endpoint, body)
    assert reply.status_code in (200, 400), reply.text
    if reply.status_code == 400:
        assert reply.json()["error"]["message"]


def test_a_client_that_hangs_up_cancels_its_job(tool_engine, monkeypatch):
    prompt = tool_engine.chat_prompt([], "hello")
    full = "".join(tool_engine.stream(prompt, tool_engine.default_settings(max_new_tokens=300)))
    full_tokens = len(tool_engine.tokenizer(full, add_special_tokens=False)["input_ids"])
    assert full_tokens >= 250  # the random model does not stop early, so an answer cut short shows the cancel
    jobs = []
    original = tool_engine.submit

    def slow_submit(prompt_ids, settings, deliver, base=False):
        def slow_deliver(output):
            threading.Event().wait(0.02)  # slows each token, so the job is surely running when the client leaves
            deliver(output)
        job = original(prompt_ids, settings, slow_deliver, base)
        jobs.append(job)
        return job

    monkeypatch.setattr(tool_engine, "submit", slow_submit)
    with running_server(create_app(tool_engine)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/chat/completions", timeout=1.0, json={
                "model": tool_engine.name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 300})
        [job] = jobs
        assert job.cancelled.wait(timeout=60)
    assert job.completion_tokens < full_tokens


def test_web_auth_flag_and_open_host_refusal():
    assert parse_auth("ann:s3:cret") == ("ann", "s3:cret")
    for bad in ("ann", "ann:", ":pw"):
        with pytest.raises(GlmtuneError, match="USER:PASSWORD"):
            parse_auth(bad)
    with pytest.raises(GlmtuneError, match="without --auth"):
        check_web_listen("0.0.0.0", None)
    check_web_listen("0.0.0.0", ("ann", "pw"))
    check_web_listen("127.0.0.1", None)


def test_web_page_with_auth_asks_for_the_login(lora_engine):
    demo = build_demo(lora_engine)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, inbrowser=False, quiet=True,
                        auth=("ann", "pw"))
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/config").status_code == 401
        assert httpx.post(f"{url}/login", data={"username": "ann", "password": "wrong"}).status_code == 400
        with httpx.Client() as browser:
            assert browser.post(f"{url}/login", data={"username": "ann", "password": "pw"}).status_code == 200
            assert browser.get(f"{url}/config").status_code == 200
    finally:
        demo.close()
