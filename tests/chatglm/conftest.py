from __future__ import annotations

from collections.abc import Callable

import pytest

from _chatglm_reference import reference, write_model_folder
from glmtune.models.chatglm import load_chatglm_model


@pytest.fixture(scope="session")
def reference_model(tmp_path_factory) -> Callable:
    """(version, model name) -> the model loaded through `load_chatglm_model` from an original-style
    folder (cached; tests must not modify it). Model names: base, ptuning_noproj, ptuning_proj."""
    cache = {}

    def get(version: str, model_name: str):
        if (version, model_name) not in cache:
            ref = reference(version)
            prefix = next(c["prefix"] for c in ref.cases.values() if c["model"] == model_name)
            folder = write_model_folder(tmp_path_factory.mktemp(f"{version}_{model_name}"), version, prefix)
            cache[version, model_name] = load_chatglm_model(folder)
        return cache[version, model_name]

    return get
