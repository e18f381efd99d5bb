"""Fixtures for the chat/web/serve tests: a tiny Llama with a quickly trained LoRA, and its engine."""

from pathlib import Path

import pytest

from glmtune.config import GlmtuneConfig
from glmtune.serve.engine import Engine
from tiny_models import train_tiny


@pytest.fixture(scope="session")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    return train_tiny(tiny_llama, tmp_path_factory.mktemp("serve") / "lora", "lora")


@pytest.fixture(scope="session")
def lora_engine(tiny_llama, lora_run) -> Engine:
    return Engine.from_config(GlmtuneConfig(model_name_or_path=str(tiny_llama), adapter_name_or_path=str(lora_run),
                                            max_new_tokens=12))
