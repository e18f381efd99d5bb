"""Fixtures for the chat/web/serve tests: a tiny Llama with a quickly trained LoRA, and its engine."""

import shutil
import string
import sys
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


@pytest.fixture
def native_chatglm_engine(tmp_path):
    """Builds an engine on a random native ChatGLM-6B (``v1``) or ChatGLM2 (``v2``) folder with the original's
    tokenizer model (skips when the reference files are not there); closes it after the test."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "chatglm"))
    try:
        from _chatglm_reference import AVAILABLE, SKIP_REASON, reference, write_model_folder
    finally:
        sys.path.pop(0)
    engines = []

    def build(version: str, max_new_tokens: int) -> Engine:
        if not AVAILABLE:
            pytest.skip(SKIP_REASON)
        folder = write_model_folder(tmp_path / f"chatglm-{version}", version, prefix=None)
        shutil.copy(reference(version).sp_model, folder / ("ice_text.model" if version == "v1" else "tokenizer.model"))
        engines.append(Engine.from_config(GlmtuneConfig(model_name_or_path=str(folder), max_new_tokens=max_new_tokens)))
        return engines[-1]

    yield build
    for engine in engines:
        engine.close()
