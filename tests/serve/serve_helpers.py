"""Helpers for the chat/web/serve tests (conftest.py holds the fixtures)."""

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

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


@contextlib.contextmanager
def running_server(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields the /v1 base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        assert thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.config.port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
