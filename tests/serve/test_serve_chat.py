"""`glmtune chat` in a real terminal (pexpect): streaming, history, clear, Ctrl-C, exit."""

import json
import os
import sys

import pexpect
import pytest

from serve_helpers import QUERY, answer
from tiny_models import build_model_folder


def spawn_chat(*flags: str) -> pexpect.spawn:
    env = {**os.environ, "TERM": "dumb", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8"}
    return pexpect.spawn(sys.executable, ["-m", "glmtune", "chat", *flags], env=env, encoding="utf-8", timeout=90,
                         dimensions=(40, 300))


def ask(child: pexpect.spawn, message: str) -> str:
    """Send a message and return the streamed answer as the terminal shows it."""
    child.sendline(message)
    child.expect_exact("Model: ")
    child.expect_exact("\r\nYou: ")
    return child.before.replace("\r\n", "\n").strip()


def interrupt_at_prompt(child: pexpect.spawn, tries: int = 10) -> None:
    """Ctrl-C at the prompt, sent again while unanswered: CPython's readline loop drops a SIGINT that lands
    between drawing the prompt and its select() (it checks signals only when select is interrupted)."""
    for _ in range(tries):
        child.sendintr()
        if child.expect_exact(["(type exit to quit)", pexpect.TIMEOUT], timeout=3) == 0:
            return
    raise AssertionError(f"Ctrl-C at the prompt was not answered in {tries} tries")


def exit_status(child: pexpect.spawn) -> int | None:
    child.expect(pexpect.EOF)
    child.wait()
    return child.exitstatus


def test_chat_keeps_history_clears_and_exits(tiny_llama, lora_run, lora_engine):
    first = answer(lora_engine, [], QUERY, max_new_tokens=8)
    second = answer(lora_engine, [(QUERY, first)], QUERY, max_new_tokens=8)
    child = spawn_chat("--model_name_or_path", str(tiny_llama), "--adapter_name_or_path", str(lora_run),
                       "--max_new_tokens", "8")
    child.expect_exact("'exit' quits")
    child.expect_exact("You: ")
    assert ask(child, QUERY) == first
    assert ask(child, QUERY) == second  # the first turn is in the prompt
    child.sendline("clear")
    child.expect_exact("(history cleared)")
    child.expect_exact("You: ")
    assert ask(child, QUERY) == first
    child.sendline("exit")
    assert exit_status(child) == 0


@pytest.fixture(scope="module")
def long_context_llama(tmp_path_factory):
    """The tiny Llama with room for a very long answer, so Ctrl-C surely lands in the middle of one."""
    folder = build_model_folder(tmp_path_factory.mktemp("long"), "llama")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return folder


def test_ctrl_c_stops_one_answer_and_the_session_goes_on(long_context_llama):
    child = spawn_chat("--model_name_or_path", str(long_context_llama), "--max_new_tokens", "3000")
    for _ in range(2):  # the second answer shows that the session survived the first Ctrl-C
        child.expect_exact("You: ")
        child.sendline(QUERY)
        child.expect_exact("Model: ")
        child.expect(r"\S")  # the answer is streaming
        child.sendintr()
        child.expect_exact("[stopped]")
    child.expect_exact("You: ")
    interrupt_at_prompt(child)  # Ctrl-C at the prompt does not end the session either
    # Sent once the prompt is back: a Ctrl-D sent earlier can be lost while readline switches the terminal mode.
    child.expect_exact("You: ")
    child.sendline("exit")
    assert exit_status(child) == 0
