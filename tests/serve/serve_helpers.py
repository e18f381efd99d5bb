"""Helpers for the chat/web/serve tests (conftest.py holds the fixtures)."""

import socket

from glmtune.serve.engine import Engine

QUERY = "类型#上衣*颜色#白色"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answer(engine: Engine, history: list[tuple[str, str]], query: str, base: bool = False, **settings) -> str:
    """What the engine answers, in-process: the reference for the terminal, browser and HTTP tests."""
    prompt = engine.chat_prompt(history, query)
    return "".join(engine.stream(prompt, engine.default_settings(**settings), base=base))
