"""File checks and writes that fail with one line naming the path, and writes a kill cannot leave half done.

Used by every layer (it imports only ``glmtune.errors``): model folders, output folders, JSON records.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

RUN_RECORD = "glmtune.json"  # in every trained output and checkpoint: what trained it, on what
OUTPUT_TEMPORARY = ".output.tmp"  # where a final output is written before it is moved into place


def read_json(path: str | Path, what: str = "") -> dict:
    """The JSON object in ``path``; an empty, truncated or non-UTF-8 file is a GlmtuneError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GlmtuneError(f"{path}: not UTF-8 text{what}") from None
    except OSError as error:
        raise GlmtuneError(f"cannot read {path}: {error.strerror}") from None
    if not text.strip():
        raise GlmtuneError(f"{path}: the file is empty{what}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise GlmtuneError(f"{path}:{error.lineno}: not valid JSON ({error.msg}){what}") from None
    if not isinstance(value, dict):
        raise GlmtuneError(f"{path}: expected a JSON object, got {type(value).__name__}{what}")
    return value


def check_safetensors(path: Path) -> None:
    """Read the header only: a truncated or corrupt file fails here, in one line, before any loading."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            handle.keys()
    except SafetensorError as error:
        raise GlmtuneError(f"{path}: corrupt or truncated safetensors file ({error})") from None
    except OSError as error:
        raise GlmtuneError(f"cannot read {path}: {error.strerror}") from None


def check_model_folder(folder: str | Path, needs_config: bool = True) -> None:
    """``config.json`` (when needed) parses and every ``*.safetensors`` file is whole."""
    folder = Path(folder)
    try:
        names = sorted(folder.iterdir())
    except OSError as error:
        raise GlmtuneError(f"cannot read the folder {folder}: {error.strerror}") from None
    if needs_config or (folder / "config.json").exists():
        read_json(folder / "config.json")
    for path in names:
        if path.suffix == ".safetensors":
            check_safetensors(path)


def prepare_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """Create ``path`` if needed and prove it writable, before hours of work are spent on what goes in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GlmtuneError(f"{flag} {path} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise GlmtuneError(f"{flag} {path}: cannot write there ({error.strerror})") from None
    return path


def write_text_atomically(path: str | Path, text: str) -> None:
    """Write a temp file beside ``path``, flush it to disk, then rename it over ``path``: never a 0-byte file."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_run_record(directory: Path, record: dict) -> None:
    write_text_atomically(Path(directory) / RUN_RECORD, json.dumps(record, indent=2, ensure_ascii=False))


def read_run_record(directory: str | Path) -> dict | None:
    """The ``glmtune.json`` of a trained output or checkpoint; None for a folder that is neither.

    A final save that a kill interrupted is completed here when everything was written
    (``OUTPUT/.output.tmp/glmtune.json`` exists); an empty or corrupt record is a one-line error.
    """
    directory = Path(directory)
    path = directory / RUN_RECORD
    if (directory / OUTPUT_TEMPORARY / RUN_RECORD).is_file():
        publish_output(directory / OUTPUT_TEMPORARY, directory)
        logger.warning("%s: completed a save that was interrupted", directory)
    if not path.is_file():
        return None
    return read_json(path, "; the run was interrupted while saving: rerun it with --resume_from_checkpoint latest "
                           "(or from the start) to write the output again")


def publish_output(temporary: Path, output_dir: Path) -> None:
    """Move a fully written output from ``temporary`` into ``output_dir``, ``glmtune.json`` last.

    The old record goes first, so at every moment ``output_dir`` is either a complete output (old or new)
    or has no ``glmtune.json``, and then ``temporary`` still holds the new one's record for a rerun to finish.
    """
    (output_dir / RUN_RECORD).unlink(missing_ok=True)
    for item in sorted(temporary.iterdir(), key=lambda p: p.name == RUN_RECORD):
        target = output_dir / item.name
        if item.is_dir() and target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    temporary.rmdir()
