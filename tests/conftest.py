import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import DEMO_TRAIN, build_model_folder  # noqa: E402

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session", params=["llama", "gemma"])
def tiny_model(request, tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def demo_train_file() -> Path:
    return DEMO_TRAIN
