"""Fixtures for the chat/web/serve tests: a tiny Llama with a quickly trained LoRA, and its engine."""

import string
from pathlib import Path

import pytest

from glmtune.config import GlmtuneConfig
from glmtune.serve.engine import Engine
from tiny_models import build_model_folder, train_tiny


@pytest.fixture(scope="session")
def lora_run(tiny_llama, tmp_path_factory) -> Path:
    return train_tiny(tiny_llama, tmp_path_factory.mktemp("serve") / "lora", "lora")


@pytest.fixture(scope="session")
def lora_engine(tiny_llama, lora_run) -> Engine:
    return Engine.from_config(GlmtuneConfig(model_name_or_path=str(tiny_llama), adapter_name_or_path=str(lora_run),
                                            max_new_tokens=12))


@pytest.fixture(scope="session")
def tool_llama(tmp_path_factory) -> Path:
    """A tiny random Llama whose characters cover JSON and tool-call syntax, with room for tool prompts."""
    return build_model_folder(tmp_path_factory.mktemp("tool-llama"), "llama", extra_text=string.printable, context=4096)


@pytest.fixture(scope="session")
def tool_engine(tool_llama) -> Engine:
    return Engine.from_config(GlmtuneConfig(model_name_or_path=str(tool_llama), max_new_tokens=200))
