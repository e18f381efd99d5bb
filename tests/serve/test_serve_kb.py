"""--kb for chat, web and serve: answers from the knowledge base's prompt, sources, refusal, /v1/embeddings."""

import os
import sys
import time

import httpx
import numpy as np
import openai
import pexpect
import pytest

from glmtune.kb.dense import load_embedder
from glmtune.kb.index import KnowledgeBase, build
from glmtune.kb.qa import NO_ANSWER, KnowledgeQA
from glmtune.serve.api import create_app
from glmtune.serve.web import build_demo
from kb_documents import CHINESE, minilm_folder, write_documents
from serve_helpers import answer, free_port, running_server
from test_serve_web import CHROMIUM, CHROMIUM_ARGS, bot_texts, unspaced

QUESTION = "大熊猫吃什么？"
UNANSWERABLE = "zzzqqq"


@pytest.fixture(scope="module")
def kb_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kb")
    build([str(write_documents(root / "docs", CHINESE))], str(root / "kb"), chunk_size=40, chunk_overlap=5,
          show_progress=False)
    return root / "kb"


@pytest.fixture(scope="module")
def knowledge(kb_folder):
    return KnowledgeQA(KnowledgeBase.load(kb_folder), top_k=2)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    pytest.importorskip("all_minilm_l6_v2")
    return load_embedder(str(minilm_folder(tmp_path_factory.mktemp("minilm"))))


def kb_answer(engine, knowledge, question: str) -> str:
    return answer(engine, [], knowledge.ground(question).prompt)


# ---- serve ----

@pytest.fixture(scope="module")
def kb_server(lora_engine, knowledge, embedder):
    with running_server(create_app(lora_engine, knowledge=knowledge, embedder=embedder)) as url:
        yield url


@pytest.fixture
def kb_client(kb_server):
    return openai.OpenAI(base_url=kb_server, api_key="none", max_retries=0, timeout=60)


def test_serve_answers_from_the_kb_with_sources(kb_client, lora_engine, knowledge):
    grounding = knowledge.ground(QUESTION)
    expected = kb_answer(lora_engine, knowledge, QUESTION)
    messages = [{"role": "user", "content": QUESTION}]
    reply = kb_client.chat.completions.create(model=lora_engine.name, messages=messages)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens == len(lora_engine.chat_prompt([], grounding.prompt))
    sources = reply.model_extra["sources"]
    assert sources == grounding.sources() and sources[0]["source"].endswith("熊猫.md")
    assert "竹子" in sources[0]["text"] and set(sources[0]) == {"source", "position", "text", "score"}

    chunks = list(kb_client.chat.completions.create(model=lora_engine.name, messages=messages, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].model_extra["sources"] == sources
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reply.choices[0].finish_reason


def test_serve_refuses_without_calling_the_model(kb_client, lora_engine):
    reply = kb_client.chat.completions.create(model=lora_engine.name,
                                              messages=[{"role": "user", "content": UNANSWERABLE}])
    assert reply.choices[0].message.content == NO_ANSWER and reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 0 and reply.model_extra["sources"] == []
    chunks = list(kb_client.chat.completions.create(model=lora_engine.name, stream=True,
                                                    messages=[{"role": "user", "content": UNANSWERABLE}]))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == NO_ANSWER
    assert chunks[-1].model_extra["sources"] == []


def test_embeddings_endpoint(kb_client, kb_server, embedder):
    texts = ["pandas eat bamboo", "熊猫吃竹子"]
    expected = embedder.embed(texts)
    default = kb_client.embeddings.create(model=embedder.name, input=texts)  # the client asks for base64
    as_floats = kb_client.embeddings.create(model=embedder.name, input=texts, encoding_format="float")
    for reply in (default, as_floats):
        assert [item.index for item in reply.data] == [0, 1]
        np.testing.assert_allclose(np.array([item.embedding for item in reply.data]), expected, atol=1e-5)
        assert reply.usage.prompt_tokens == embedder.token_count(texts) > 0
    single = kb_client.embeddings.create(model=embedder.name, input="pandas eat bamboo", encoding_format="float")
    np.testing.assert_allclose(single.data[0].embedding, expected[0], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="unknown embedding model"):
        kb_client.embeddings.create(model="text-embedding-3-small", input="x")
    reply = httpx.post(f"{kb_server}/embeddings", json={"model": embedder.name, "input": []})
    assert reply.status_code == 400


def test_server_without_embedder_says_so(lora_engine):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(lora_engine))
    reply = client.post("/v1/embeddings", json={"model": "x", "input": "y"})
    assert reply.status_code == 404 and "--embedding_model" in reply.json()["error"]["message"]


# ---- web ----

@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_web_shows_sources_under_the_answer(lora_engine, knowledge):
    from playwright.sync_api import sync_playwright

    expected = kb_answer(lora_engine, knowledge, QUESTION)
    sources = knowledge.ground(QUESTION).sources_text()
    demo = build_demo(lora_engine, knowledge)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, inbrowser=False, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(url) else route.abort())
            page.goto(url)
            for question, answer_text, source_text in ((QUESTION, expected, sources),
                                                       (UNANSWERABLE, NO_ANSWER, "Sources: none")):
                before = len(bot_texts(page))
                page.locator("#message textarea").fill(question)
                page.keyboard.press("Enter")
                deadline = time.monotonic() + 60  # a bound on waiting, not a speed check
                texts = bot_texts(page)
                while time.monotonic() < deadline and not (len(texts) >= before + 2 and "Sources" in texts[-1]):
                    time.sleep(0.2)
                    texts = bot_texts(page)
                assert unspaced(texts[before]) == unspaced(answer_text)
                assert unspaced(source_text) in unspaced(texts[before + 1])
            assert "熊猫.md" in texts[1]
            browser.close()
    finally:
        demo.close()


# ---- chat ----

def test_chat_prints_sources_and_refuses(tiny_llama, lora_run, lora_engine, knowledge, kb_folder):
    expected = kb_answer(lora_engine, knowledge, QUESTION)
    env = {**os.environ, "TERM": "dumb", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    child = pexpect.spawn(sys.executable, ["-m", "glmtune", "chat", "--model_name_or_path", str(tiny_llama),
                                           "--adapter_name_or_path", str(lora_run), "--max_new_tokens", "12",
                                           "--kb", str(kb_folder), "--kb_top_k", "2"],
                          env=env, encoding="utf-8", timeout=300, dimensions=(40, 300))  # a bound on waiting
    child.expect_exact("You: ")
    child.sendline(QUESTION)
    child.expect_exact("Model: ")
    child.expect_exact("\r\nYou: ")
    shown = child.before.replace("\r\n", "\n").strip()
    assert shown == f"{expected}\n{knowledge.ground(QUESTION).sources_text()}"
    child.sendline(UNANSWERABLE)
    child.expect_exact("Model: ")
    child.expect_exact("\r\nYou: ")
    assert child.before.replace("\r\n", "\n").strip() == f"{NO_ANSWER}\nSources: none above the score threshold"
    child.sendline("exit")
    child.expect(pexpect.EOF)


def test_sources_message_stays_out_of_the_next_prompt():
    from glmtune.serve.web import history_pairs

    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "吃竹子"},
               {"role": "assistant", "content": "Sources:\n[1] 熊猫.md (char 0, score 1.000)"},
               {"role": "user", "content": "还有呢"}, {"role": "assistant", "content": NO_ANSWER},
               {"role": "assistant", "content": "Sources: none above the score threshold"}]
    assert history_pairs(history) == [(QUESTION, "吃竹子"), ("还有呢", NO_ANSWER)]
