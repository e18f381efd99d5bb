"""Checkpoints: ``checkpoint-STEP/`` holds what the method trains plus optimizer, scheduler and RNG state.

Each is written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint.
With FSDP every rank writes its shards into that folder (``torch.distributed.checkpoint``); rank 0 renames it.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from glmtune.errors import GlmtuneError
from glmtune.train.distributed import ProcessGroup

RUN_RECORD = "glmtune.json"


def write_run_record(directory: Path, record: dict) -> None:
    (Path(directory) / RUN_RECORD).write_text(json.dumps(record, indent=2, ensure_ascii=False), encoding="utf-8")


def read_run_record(directory: str | Path) -> dict | None:
    path = Path(directory) / RUN_RECORD
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: Path, step: int, write_contents, keep: int | None,
                    group: ProcessGroup = ProcessGroup()) -> Path:
    """Every rank calls ``write_contents(folder)`` on the same temp folder, then rank 0 renames it to ``checkpoint-STEP``.

    A collective: all ranks call it. ``write_contents`` decides what each rank writes.
    """
    final = output_dir / f"checkpoint-{step}"
    temporary = output_dir / f".checkpoint-{step}.tmp"
    if group.is_main:
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    group.barrier()
    write_contents(temporary)
    group.barrier()  # every rank's files are in place
    if group.is_main:
        shutil.rmtree(final, ignore_errors=True)
        temporary.rename(final)
        if keep:
            for old in list_checkpoints(output_dir)[:-keep]:
                shutil.rmtree(old)
    group.barrier()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(output_dir: Path, resume: str) -> Path:
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise GlmtuneError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        return checkpoints[-1]
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        raise GlmtuneError(f"--resume_from_checkpoint {resume}: not a glmtune checkpoint (no trainer_state.json)")
    return path
