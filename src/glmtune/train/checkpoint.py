"""Checkpoints: ``checkpoint-STEP/`` holds what the method trains plus optimizer, scheduler and RNG state.

Each is written to a temporary folder and renamed into place, so a crash never leaves a half checkpoint.
With FSDP every rank writes its shards into that folder (``torch.distributed.checkpoint``); rank 0 renames it.
The final output is written the same way (``publish_output``), its ``glmtune.json`` last.

Checkpoints come from other people too (shared, downloaded), so nothing in one is unpickled into code:
optimizer, scheduler and RNG state load with ``torch.load(weights_only=True)`` (tensors and plain
containers only), the rest is JSON or safetensors.

Each checkpoint records which run wrote it (``run_id``, also in ``OUTPUT/glmtune_run.json``) and a
fingerprint of that run (data, method, trained-tensor shapes, base model): ``latest`` resumes only a
checkpoint of the run the output folder belongs to, and only when the fingerprints agree.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch

from glmtune.errors import GlmtuneError
from glmtune.files import OUTPUT_TEMPORARY, check_model_folder, read_json, read_run_record, write_text_atomically
from glmtune.train.distributed import ProcessGroup

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.json"
RUN_FILE = "glmtune_run.json"  # in the output folder: the run its checkpoints belong to
STATE_FILES = ("optimizer.pt", "scheduler.pt", "rng_state.pt")


def rng_state() -> dict:
    """Every generator's state as tensors and plain values, which ``torch.load(weights_only=True)`` reads."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_state(path: Path):
    """A ``torch.save``d state without unpickling code: anything but tensors and plain containers is refused."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise GlmtuneError(f"{path}: missing; the checkpoint is incomplete") from None
    except Exception as error:  # weights_only raises UnpicklingError for a crafted file, others for a corrupt one
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GlmtuneError(f"{path}: not a loadable checkpoint state ({first_line})") from None


def fingerprint(method: str, trainable: dict[str, torch.Tensor], base_model: str | None, data_hash: str) -> dict:
    """What makes two runs the same run: its data, method, trained-tensor shapes and base model."""
    return {"data": data_hash, "method": method, "base_model": base_model,
            "tensors": {name: list(tensor.shape) for name, tensor in trainable.items()}}


def examples_hash(examples) -> str:
    """A digest of the tokenized training data (file contents, template, truncation and tokenizer all show in it)."""
    digest = hashlib.sha256()
    for example in examples:
        # A preference example holds two token sequences (data/preference.py), the others one.
        for part in (example.chosen, example.rejected) if hasattr(example, "chosen") else (example,):
            digest.update(np.asarray(part.input_ids, dtype=np.int64).tobytes())
            digest.update(np.asarray(part.labels, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def start_run(output_dir: Path, run_id: str | None = None) -> str:
    """Record which run the output folder's checkpoints now belong to; a fresh run gets a new id."""
    run_id = run_id or uuid.uuid4().hex
    others = [c.name for c in list_checkpoints(output_dir) if _checkpoint_run(c) != run_id]
    if others:
        logger.warning("%s holds %d checkpoint(s) of another run (%s); they are kept, and `latest` will not resume them",
                       output_dir, len(others), ", ".join(others[:3]))
    shutil.rmtree(output_dir / OUTPUT_TEMPORARY, ignore_errors=True)  # a final save interrupted before its record
    write_text_atomically(output_dir / RUN_FILE, json.dumps({"run_id": run_id}))
    return run_id


def _checkpoint_run(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / TRAINER_STATE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError):
        return None


def read_trainer_state(checkpoint: Path) -> dict:
    state = read_json(checkpoint / TRAINER_STATE)
    state.setdefault("global_step", state.get("step"))  # checkpoints written before HF's schema said "step"
    return state


def truncate_log(path: Path, step: int) -> None:
    """Drop the rows a resumed run will write again (logged after the checkpoint it resumes from)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            if line.strip() and json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by a kill
    write_text_atomically(path, "".join(kept))


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
        if keep:  # only this run's: another run's checkpoints in the folder are not ours to delete
            run_id = _checkpoint_run(final)
            for old in [c for c in list_checkpoints(output_dir) if _checkpoint_run(c) == run_id][:-keep]:
                shutil.rmtree(old)
    group.barrier()
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    found = [p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def resolve_resume(output_dir: Path, resume: str, current: dict, config: dict, steps: int) -> tuple[Path, dict]:
    """The checkpoint to resume and its trainer state, after checking it belongs to this run.

    ``latest``: the newest checkpoint of the run recorded in ``output_dir``, whose fingerprint must equal
    ``current``. An explicit path may come from another run (a warning names what differs), but its tensors
    must have this run's shapes. Changed settings (``config`` against the checkpoint's) are named in a warning.
    """
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise GlmtuneError(f"--resume_from_checkpoint latest: no checkpoint in {output_dir}")
        run_file = output_dir / RUN_FILE
        if run_file.is_file():
            run_id = read_json(run_file).get("run_id")
            ours = [c for c in checkpoints if _checkpoint_run(c) == run_id]
            if not ours:
                raise GlmtuneError(f"--resume_from_checkpoint latest: no checkpoint of this run in {output_dir} "
                                   f"({checkpoints[-1].name} is another run's; pass its path to resume it anyway)")
            checkpoints = ours
        checkpoint = checkpoints[-1]
    else:
        checkpoint = Path(resume)
        if not (checkpoint / TRAINER_STATE).is_file():
            raise GlmtuneError(f"--resume_from_checkpoint {resume}: not a glmtune checkpoint (no {TRAINER_STATE})")
    state = read_trainer_state(checkpoint)
    check_model_folder(checkpoint, needs_config=False)
    saved = state.get("fingerprint")
    if saved is None:
        logger.warning("%s has no run fingerprint (an older glmtune wrote it); resuming it unchecked", checkpoint)
    else:
        _check_fingerprint(checkpoint, saved, current, config, explicit=resume != "latest")
    if state["global_step"] > steps:
        raise GlmtuneError(f"{checkpoint} is at step {state['global_step']}, past this run's {steps} steps "
                           "(raise --max_steps or resume an earlier checkpoint)")
    record = read_run_record(checkpoint) or {}
    changed = changed_settings(record.get("config", {}), config)
    if changed:
        logger.warning("resuming %s with settings changed since it was saved (they apply from step %d): %s",
                       checkpoint, state["global_step"] + 1, ", ".join(changed))
    return checkpoint, state


# Settings that do not change what training computes, or that name where things go.
_NOT_TRAINING = {"output_dir", "overwrite_output_dir", "resume_from_checkpoint", "do_train", "do_eval", "do_predict",
                 "report_to", "test_file", "max_predict_samples", "predict_with_generate", "max_new_tokens", "do_sample",
                 "top_p", "temperature", "num_beams", "overwrite_cache"}


def changed_settings(saved: dict, current: dict) -> list[str]:
    return [f"--{key} {saved[key]} -> {current[key]}" for key in current
            if key in saved and key not in _NOT_TRAINING and saved[key] != current[key]]


def _check_fingerprint(checkpoint: Path, saved: dict, current: dict, config: dict, explicit: bool) -> None:
    saved_tensors, current_tensors = saved.get("tensors", {}), current["tensors"]
    if saved_tensors != current_tensors:
        record = read_run_record(checkpoint) or {}
        hints = [c for c in changed_settings(record.get("config", {}), config)
                 if c.split()[0] in ("--lora_rank", "--lora_target", "--pre_seq_len", "--prefix_projection",
                                     "--prefix_hidden_size", "--freeze_trainable_layers", "--freeze_trainable_modules",
                                     "--finetuning_type")]
        differing = sorted(set(saved_tensors) ^ set(current_tensors)) or sorted(
            n for n in current_tensors if saved_tensors[n] != current_tensors[n])
        name = differing[0]
        detail = f"{name}: {saved_tensors.get(name, 'absent')} there, {current_tensors.get(name, 'absent')} here"
        because = f" ({', '.join(hints)})" if hints else ""
        raise GlmtuneError(f"{checkpoint} trained other tensors than this run{because}: {detail}")
    differences = [key for key in ("data", "method", "base_model") if saved.get(key) != current[key]]
    if not differences:
        return
    message = f"{checkpoint} is from a run with other {', '.join(differences)}"
    if not explicit:
        raise GlmtuneError(f"--resume_from_checkpoint latest: {message}; pass its path to resume it anyway")
    logger.warning("%s; resuming it as asked", message)


def check_trained_weights(trainable: dict[str, torch.Tensor], probe_loss: torch.Tensor | None, step: int,
                          group: ProcessGroup = ProcessGroup()) -> None:
    """Refuse to save weights that are not finite, or with which the loss of a batch is not (e.g. 1e30 weights).

    A collective under several processes (each checks its own shards). One sync for all tensors.
    """
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in trainable.values()]
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in tensors])
    device = finite.device
    loss_finite = torch.isfinite(probe_loss.detach()).to(device) if probe_loss is not None else torch.tensor(True, device=device)
    bad = group.sum(torch.stack([(~finite).sum(), (~loss_finite).long()]).float())
    if bad[0] > 0:
        names = [name for name, ok in zip(trainable, finite.tolist()) if not ok]
        where = f"tensor {names[0]}" if names else "a tensor shard on another process"
        raise GlmtuneError(f"step {step}: trained {where} is not finite; nothing saved (try a lower --learning_rate)")
    if bad[1] > 0:
        raise GlmtuneError(f"step {step}: the trained weights give a non-finite loss; nothing saved "
                           "(try a lower --learning_rate)")


class _MetadataUnpickler(pickle.Unpickler):
    """Only the classes a DCP index is made of: ``torch.distributed.checkpoint`` reads ``.metadata`` with plain
    ``pickle.load``, so a sharded checkpoint is unpickled here first and refused if it names anything else."""

    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout))))
                   or (module, name) in {("torch.serialization", "_get_layout"), ("torch._utils", "_get_layout"), ("collections", "OrderedDict"),
                                         ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")})
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")
        return super().find_class(module, name)


def check_sharded_index(folder: Path) -> None:
    """Refuse a sharded (DCP) checkpoint whose ``.metadata`` pickle would construct anything but index classes."""
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except Exception as error:  # UnpicklingError for a crafted file, others for a corrupt one
        raise GlmtuneError(f"{path}: not a loadable checkpoint index ({error})") from None
