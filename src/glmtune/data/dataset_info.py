"""LLaMA-Factory's data folder: ``dataset_info.json`` names datasets, each a local file in alpaca or sharegpt
formatting with its own column and role names. Each record is renamed to the keys ``data/formats.py`` reads,
so these datasets become the same ``Conversation`` objects as ``--train_file``.

Keys of an entry: ``file_name`` (a file or a folder of files: json, jsonl, csv, parquet), ``formatting``,
``ranking``, ``columns``, ``tags`` and ``num_samples`` (the first N records). Hub entries (``hf_hub_url``, ...)
are refused: glmtune reads local files only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.data.formats import BadRecord, Conversation, FormatOptions, read_conversations
from glmtune.errors import GlmtuneError

INFO_FILE = "dataset_info.json"
SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")

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

    def normalize(self, record: dict, where: str) -> dict:
        """The record under formats.py's keys (sharegpt messages as ``{"from", "value"}``)."""
        if not isinstance(record, dict):
            raise BadRecord(f"{where}: a record must be an object, got {type(record).__name__}")
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
    return DatasetEntry(
        name=name, files=_files(Path(dataset_dir) / spec["file_name"], where), formatting=formatting,
        ranking=bool(spec.get("ranking", False)),
        columns={ours: given.get(theirs, default) for theirs, (default, ours) in layout.items()},
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
    conversations: list[Conversation] = []
    for name in [n.strip() for n in names.split(",") if n.strip()]:
        entry = dataset_entry(name, dataset_dir)
        if entry.ranking:
            raise GlmtuneError(f"{dataset_dir}/{INFO_FILE}: dataset '{name}' is a ranking (preference) dataset; "
                               "it trains with stage: dpo, not sft")
        entry_options = FormatOptions(**{**vars(options), "dataset_format": entry.formatting})
        records: list[Conversation] = []
        for path in entry.files:
            records += read_conversations(path, entry_options, skip_bad_records, normalize=entry.normalize)
        limit = min(n for n in (entry.num_samples, max_samples, len(records)) if n is not None)
        conversations += records[:limit]
    if not conversations:
        raise GlmtuneError(f"--dataset {names!r} names no dataset")
    return conversations
