"""`glmtune web` end to end: the Gradio page in headless Chromium answers, tuned and base."""

import shutil
import time

import pytest

from glmtune.serve.web import BASE, build_demo, history_pairs
from serve_helpers import QUERY, answer, free_port

CHROMIUM = shutil.which("chromium")  # Debian's package: /usr/bin/chromium
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def unspaced(text: str) -> str:
    """The text without its spacing, which the page may wrap differently."""
    return "".join(text.split())


def bot_texts(page) -> list[str]:
    return page.locator("#chatbot .bot-row .message-content").all_inner_texts()


def wait_for_answer(page, index: int, expected: str) -> str:
    deadline = time.monotonic() + 60  # a bound on waiting, not a speed check
    texts = bot_texts(page)
    while time.monotonic() < deadline and not (len(texts) > index and unspaced(texts[index]) == unspaced(expected)):
        time.sleep(0.2)
        texts = bot_texts(page)
    return texts[index] if len(texts) > index else ""


@pytest.fixture(scope="module")
def web_url(lora_engine):
    demo = build_demo(lora_engine)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, inbrowser=False, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_history_pairs_from_gradio_messages():
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": [{"type": "text", "text": "b"}]},
               {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    assert history_pairs(history) == [("a", "b"), ("c", "d")]


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)")
def test_page_answers_tuned_then_base(web_url, lora_engine):
    from playwright.sync_api import sync_playwright

    tuned = answer(lora_engine, [], QUERY)
    base = answer(lora_engine, [(QUERY, tuned)], QUERY, base=True)
    assert unspaced(tuned) and unspaced(base) and tuned != base
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        # Nothing leaves the machine: the page may only talk to the demo.
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(web_url) else route.abort())
        page.goto(web_url)
        page.locator("#message textarea").fill(QUERY)
        page.keyboard.press("Enter")
        assert unspaced(wait_for_answer(page, 0, tuned)) == unspaced(tuned)
        page.get_by_label(BASE).check()
        page.locator("#message textarea").fill(QUERY)
        page.keyboard.press("Enter")
        assert unspaced(wait_for_answer(page, 1, base)) == unspaced(base)
        browser.close()
