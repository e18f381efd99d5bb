"""LLaMA-Factory's data folder: ``dataset_info.json`` names datasets, each a local file in alpaca or sharegpt
formatting with its own column and role names. Each record is renamed to the keys ``data/formats.py`` reads,
so these datasets become the same ``Conversation`` objects as ``--train_file``; ``ranking: true`` datasets become
``stage: dpo``'s preference pairs, and ``stage: pt`` reads each record's ``columns.prompt`` text as one document.

Keys of an entry: ``file_name`` (a file or a folder of files: json, jsonl, csv, parquet; txt for pt), ``formatting``,
``ranking``, ``columns``, ``tags`` and ``num_samples`` (the first N records). Hub entries (``hf_hub_url``, ...)
are refused: glmtune reads local files only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.data.formats import BadRecord, Conversation, FormatOptions, read_conversations
from glmtune.data.preference import PreferencePair, read_preference_pairs
from glmtune.data.pretrain import read_documents
from glmtune.errors import GlmtuneError

INFO_FILE = "dataset_info.json"
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet", ".txt")
TEXT_SUFFIX = ".txt"  # raw text, one document per line: stage pt only

# LLaMA-Factory column key -> (its default column, the key data/formats.py reads). tools, chosen and rejected
# pass through under their own names, for the tools and preference record kinds.
ALPACA_COLUMNS = {"prompt": ("instruction", "instruction"), "query": ("input", "input"),
                  "response": ("output", "output"), "history": (None, "history"), "system": (None, "system"),
                  "tools": (None, "tools"), "chosen": (None, "chosen"), "rejected": (None, "rejected")}
SHAREGPT_COLUMNS = {"messages": ("conversations", "conversations"), "system": (None, "system"),
                    "tools": (None, "tools"), "chosen": (None, "chosen"), "rejected": (None, "rejected")}
# Tag -> (its default, the role name data/formats.py reads).
TAGS = {"user_tag": ("human", "human"), "assistant_tag": ("gpt", "gpt"), "system_tag": ("system", "system"),
        "observation_tag": ("observation", "observation"), "function_tag": ("function_call", "function_call")}
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")


@dataclass
class DatasetEntry:
    name: str
    files: list[Path]
    formatting: str = "alpaca"
    ranking: bool = False
    columns: dict[str, str | None] = field(default_factory=dict)  # formats.py key -> this dataset's column
    role_tag: str = "from"
    content_tag: str = "value"
    roles: dict[str, str] = field(default_factory=dict)  # this dataset's role name -> formats.py's
    num_samples: int | None = None
    info_path: Path = Path(INFO_FILE)

    def check_stage(self, stage: str) -> None:
        """A dataset of the wrong kind for ``stage`` is refused, naming the kind it is for."""
        where = f"{self.info_path}: dataset '{self.name}'"
        if self.ranking and stage != "dpo":
            raise GlmtuneError(f"{where} is a ranking (preference) dataset; it trains with stage: dpo, not {stage}")
        if stage == "dpo" and not self.ranking:
            raise GlmtuneError(f"{where} is not a ranking dataset; stage: dpo needs ranking: true with chosen and "
                               "rejected columns")
        if stage == "pt" and self.formatting != "alpaca":
            raise GlmtuneError(f"{where}: stage: pt reads raw text, the column named by columns.prompt; "
                               f"formatting: {self.formatting} has none")
        text_files = [p.name for p in self.files if p.suffix.lower() == TEXT_SUFFIX]
        if text_files and stage != "pt":
            raise GlmtuneError(f"{where}: {text_files[0]} is raw text, for stage: pt, not {stage}")

    def normalize(self, record: dict, where: str) -> dict:
        """The record under formats.py's keys (sharegpt messages as ``{"from", "value"}``)."""
        if not isinstance(record, dict):
            raise BadRecord(f"{where}: a record must be an object, got {type(record).__name__}")
        if self.ranking:
            missing = next((key for key in ("chosen", "rejected") if self.columns[key] not in record), None)
            if missing:
                raise BadRecord(f"{where}: missing key '{self.columns[missing]}' (columns.{missing} in {INFO_FILE})")
        out = {ours: record[theirs] for ours, theirs in self.columns.items() if theirs and theirs in record}
        if self.formatting == "sharegpt":
            messages_column = self.columns["conversations"]
            if not isinstance(out.get("conversations"), list):
                raise BadRecord(f"{where}: missing key '{messages_column}' (a list of messages)")
            out["conversations"] = [self._message(m, where, messages_column, i) for i, m in enumerate(out["conversations"])]
            if out.get("system") and out["conversations"][:1] and out["conversations"][0]["from"] != "system":
                out["conversations"].insert(0, {"from": "system", "value": out.pop("system")})
            for key in ("chosen", "rejected"):
                if isinstance(out.get(key), dict):
                    out[key] = self._message(out[key], where, self.columns[key], 0)
        return out

    def _message(self, message, where: str, column: str, index: int) -> dict:
        if not isinstance(message, dict) or self.role_tag not in message:
            raise BadRecord(f"{where}: key '{column}' item {index}: no '{self.role_tag}' (tags.role_tag in {INFO_FILE})")
        role = self.roles.get(message[self.role_tag])
        if role is None:
            raise BadRecord(f"{where}: key '{column}' item {index}: role '{message[self.role_tag]}' is none of "
                            f"{', '.join(self.roles)} (tags in {INFO_FILE})")
        return {"from": role, "value": message.get(self.content_tag)}


def read_dataset_info(dataset_dir: str | Path) -> tuple[Path, dict]:
    path = Path(dataset_dir) / INFO_FILE
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise GlmtuneError(f"--dataset needs {path} ({error.strerror}); set --dataset_dir to its folder") from None
    except json.JSONDecodeError as error:
        raise GlmtuneError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(info, dict):
        raise GlmtuneError(f"{path}: must be an object of dataset names")
    return path, info


def dataset_entry(name: str, dataset_dir: str | Path) -> DatasetEntry:
    info_path, info = read_dataset_info(dataset_dir)
    if name not in info:
        raise GlmtuneError(f"{info_path}: no dataset named '{name}' (it has: {', '.join(sorted(info))})")
    spec, where = info[name], f"{info_path}: dataset '{name}'"
    if not isinstance(spec, dict):
        raise GlmtuneError(f"{where}: must be an object")
    if "file_name" not in spec:
        hub = next((k for k in HUB_KEYS if k in spec), None)
        if hub:
            raise GlmtuneError(f"{where} is on a hub ({hub}); glmtune reads local files: download it into "
                               f"{dataset_dir} and give it a file_name")
        raise GlmtuneError(f"{where}: no file_name")
    formatting = spec.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise GlmtuneError(f"{where}: formatting '{formatting}' is not alpaca or sharegpt")
    layout = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    given = spec.get("columns") or {}
    unknown = set(given) - set(layout)
    if unknown:
        raise GlmtuneError(f"{where}: columns {', '.join(sorted(unknown))} are not {formatting} text columns "
                           f"glmtune reads (it has: {', '.join(layout)})")
    tags = spec.get("tags") or {}
    unknown_tags = set(tags) - set(TAGS) - {"role_tag", "content_tag"}
    if unknown_tags:
        raise GlmtuneError(f"{where}: unknown tags {', '.join(sorted(unknown_tags))}")
    ranking = bool(spec.get("ranking", False))
    columns = {ours: given.get(theirs, default) for theirs, (default, ours) in layout.items()}
    if ranking:  # the names every ranking dataset of LLaMA-Factory's data/ gives them
        columns = {**columns, "chosen": columns["chosen"] or "chosen", "rejected": columns["rejected"] or "rejected"}
    return DatasetEntry(
        name=name, info_path=info_path, files=_files(Path(dataset_dir) / spec["file_name"], where), formatting=formatting,
        ranking=ranking, columns=columns,
        role_tag=tags.get("role_tag", "from"), content_tag=tags.get("content_tag", "value"),
        roles={tags.get(tag, default): ours for tag, (default, ours) in TAGS.items()},
        num_samples=spec.get("num_samples"),
    )


def _files(path: Path, where: str) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
        if not files:
            raise GlmtuneError(f"{where}: folder {path} has no {', '.join(SUFFIXES)} files")
        return files
    if not path.is_file():
        raise GlmtuneError(f"{where}: file_name {path} not found")
    if path.suffix.lower() not in SUFFIXES:
        raise GlmtuneError(f"{where}: {path.name}: glmtune reads {', '.join(SUFFIXES)} files")
    return [path]


def read_datasets(names: str, dataset_dir: str | Path, options: FormatOptions, skip_bad_records: bool = False,
                  max_samples: int | None = None) -> list[Conversation]:
    """The conversations of every dataset in ``names`` (comma-separated), each cut to ``max_samples``."""
    def read(entry: DatasetEntry) -> list[Conversation]:
        entry.check_stage("sft")
        entry_options = FormatOptions(**{**vars(options), "dataset_format": entry.formatting})
        return [c for path in entry.files for c in read_conversations(path, entry_options, skip_bad_records, entry.normalize)]

    return _read_each(names, dataset_dir, max_samples, read)


def read_dataset_documents(names: str, dataset_dir: str | Path, skip_bad_records: bool = False,
                           max_samples: int | None = None) -> list[str]:
    """``stage: pt``: the documents of every dataset in ``names``, the text in each record's ``columns.prompt``
    (LLaMA-Factory's ``c4_demo``: ``{"prompt": "text"}``; a ``.txt`` file: one document per line)."""
    def read(entry: DatasetEntry) -> list[str]:
        entry.check_stage("pt")
        column = entry.columns["instruction"]
        flag = f"columns.prompt of '{entry.name}' in {INFO_FILE}"
        return [d for path in entry.files for d in read_documents(path, column, skip_bad_records, flag)]

    return _read_each(names, dataset_dir, max_samples, read)


def read_dataset_pairs(names: str, dataset_dir: str | Path, skip_bad_records: bool = False,
                       max_samples: int | None = None) -> list[PreferencePair]:
    """``stage: dpo``: the preference pairs of every ``ranking: true`` dataset in ``names``."""
    def read(entry: DatasetEntry) -> list[PreferencePair]:
        entry.check_stage("dpo")
        return [p for path in entry.files for p in read_preference_pairs(path, skip_bad_records, entry.normalize)]

    return _read_each(names, dataset_dir, max_samples, read)


def _read_each(names: str, dataset_dir: str | Path, max_samples: int | None, read: Callable[[DatasetEntry], list]) -> list:
    records: list = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        entry = dataset_entry(name, dataset_dir)
        entry_records = read(entry)
        limit = min(n for n in (entry.num_samples, max_samples, len(entry_records)) if n is not None)
        records += entry_records[:limit]
    if not records:
        raise GlmtuneError(f"--dataset {names!r} names no dataset")
    return records
