"""Helpers for the chat/web/serve tests (conftest.py holds the fixtures)."""

import socket
from pathlib import Path

from glmtune.config import GlmtuneConfig
from glmtune.recipes.train import run_train
from glmtune.serve.engine import Engine
from tiny_models import DEMO_TRAIN

QUERY = "类型#上衣*颜色#白色"


def train(model: Path, output: Path, method: str) -> Path:
    # Large steps, so the trained weights surely change what greedy decoding picks.
    run_train(GlmtuneConfig(
        do_train=True, model_name_or_path=str(model), train_file=str(DEMO_TRAIN), output_dir=str(output),
        finetuning_type=method, pre_seq_len=4, freeze_trainable_layers=1, max_steps=3, save_steps=0,
        learning_rate={"ptuning": 0.5}.get(method, 5e-2), max_train_samples=8, report_to="none",
    ))
    return output


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answer(engine: Engine, history: list[tuple[str, str]], query: str, base: bool = False, **settings) -> str:
    """What the engine answers, in-process: the reference for the terminal, browser and HTTP tests."""
    prompt = engine.chat_prompt(history, query)
    return "".join(engine.stream(prompt, engine.default_settings(**settings), base=base))
