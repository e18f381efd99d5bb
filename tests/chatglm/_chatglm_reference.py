"""Access to the ChatGLM reference vectors in `<repo>/../shared/reference/chatglm` (see its README)."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REFERENCE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "reference" / "chatglm"
VERSIONS = ("v1", "v2")
AVAILABLE = all((REFERENCE_DIR / v / "cases.json").is_file() for v in VERSIONS)
SKIP_REASON = f"ChatGLM reference vectors not found in {REFERENCE_DIR}"

requires_reference = pytest.mark.skipif(not AVAILABLE, reason=SKIP_REASON)


@dataclass(frozen=True)
class Reference:
    version: str
    directory: Path
    config: dict
    cases: dict[str, dict]
    tensors: dict[str, torch.Tensor]
    tokenizer_cases: dict

    def tensor(self, case: dict, field: str) -> torch.Tensor | None:
        info = case["tensors"].get(field)
        return self.tensors[info["key"]] if info else None

    @property
    def sp_model(self) -> Path:
        return self.directory / self.tokenizer_cases["standin_model_file"]


@functools.cache
def reference(version: str) -> Reference:
    directory = REFERENCE_DIR / version
    cases = json.loads((directory / "cases.json").read_text())["cases"]
    return Reference(
        version=version,
        directory=directory,
        config=json.loads((directory / "config.json").read_text()),
        cases={c["name"]: c for c in cases},
        tensors=load_file(str(directory / "cases.safetensors")),
        tokenizer_cases=json.loads((directory / "tokenizer_cases.json").read_text()),
    )


def case_params(kinds: tuple[str, ...] | None = None) -> list:
    """pytest params (version, case name) for every reference case, optionally of some kinds only."""
    if not AVAILABLE:
        return [pytest.param(None, None, marks=pytest.mark.skip(reason=SKIP_REASON), id="no-reference")]
    return [
        pytest.param(v, name, id=f"{v}:{name}")
        for v in VERSIONS
        for name in reference(v).cases
        if kinds is None or name.split(".", 1)[1] in kinds
    ]


def write_model_folder(folder: Path, version: str, prefix: dict | None) -> Path:
    """An original-style folder: config.json + model.safetensors (+ the case's prefix weights merged in)."""
    ref = reference(version)
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(ref.config)
    weights = load_file(str(ref.directory / "model.safetensors"))
    if prefix is not None:
        config["pre_seq_len"] = prefix["pre_seq_len"]
        config["prefix_projection"] = prefix["prefix_projection"]
        weights.update(load_file(str(ref.directory / prefix["prefix_weights"])))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(weights, str(folder / "model.safetensors"))
    return folder


def forward_inputs(ref: Reference, case: dict) -> dict[str, torch.Tensor]:
    """Exactly the tensors the original forward received."""
    return {field: ref.tensor(case, field) for field in case["forward_inputs"]}
