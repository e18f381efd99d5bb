"""Read training data files into conversations.

Three record formats are understood:

* ``columns`` (the seed's ADGEN style): ``--prompt_column``, ``--response_column`` and an optional
  ``--history_column`` holding ``[[query, answer], ...]``.
* ``alpaca``: ``instruction``, optional ``input``, ``output`` and optional ``history``.
* ``sharegpt``: ``conversations``, a list of ``{"from": "human"|"gpt"|"system", "value": ...}``
  (``role``/``content`` with user/assistant are accepted too). Tool-call data (LLaMA-Factory's glaive
  style): ``function_call`` turns (the call as JSON) and ``observation`` turns (the tool's result), with
  the function definitions in the record's ``tools`` (a JSON string or a list).

Files are a JSON array, JSON lines, CSV (a header row) or Parquet (needs pyarrow). Every problem is reported as
``file:line: what is wrong``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from glmtune.data.tools import ToolCall, normalize_tools, parse_calls_value
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Turn:
    query: str
    answer: str
    trains: bool = True
    #: Tool results that take the place of the query (sharegpt ``observation``, OpenAI ``tool`` messages).
    observations: list[str] = field(default_factory=list)
    #: Function calls the answer makes (sharegpt ``function_call``, OpenAI ``tool_calls``).
    calls: list[ToolCall] = field(default_factory=list)


@dataclass
class Conversation:
    """One record: earlier turns, then the final turn. ``trains`` marks the answers that carry loss."""

    turns: list[Turn]
    system: str | None = None
    source: str = ""  # "file:line", for messages
    tools: list[dict] | None = None  # function definitions ({"name", "description", "parameters"})


@dataclass
class FormatOptions:
    dataset_format: str = "columns"
    prompt_column: str = "content"
    response_column: str = "summary"
    history_column: str | None = None
    train_on: str = "last"
    require_response: bool = True


class BadRecord(GlmtuneError):
    pass


@dataclass
class LoadReport:
    skipped: int = 0


def read_parsed(path: Path, parse: Callable[[object, str], T], skip_bad_records: bool, nothing: str) -> list[T]:
    """``parse(record, where)`` of every record in a file. A ``BadRecord`` stops the read, or with
    ``skip_bad_records`` is skipped and counted in one warning; no record left is ``GlmtuneError(f"{path}: {nothing}")``."""
    if not path.is_file():
        raise GlmtuneError(f"data file not found: {path}")
    parsed, report = [], LoadReport()
    for where, record in read_records(path, skip_bad_records, report):
        try:
            parsed.append(parse(record, where))
        except BadRecord as error:
            if not skip_bad_records:
                raise
            report.skipped += 1
            logger.debug("skipped %s", error)
    if report.skipped:
        logger.warning("%s: skipped %d bad record(s) (--skip_bad_records)", path, report.skipped)
    if not parsed:
        raise GlmtuneError(f"{path}: {nothing} (the file is empty or every record was bad)")
    return parsed


def read_conversations(path: str | Path, options: FormatOptions, skip_bad_records: bool = False,
                       normalize: Callable[[dict, str], dict] | None = None) -> list[Conversation]:
    """All conversations in a file; raises GlmtuneError naming file, line and key for a bad record.
    ``normalize(record, where)`` renames another layout's keys to this module's (``data/dataset_info.py``)."""
    path = Path(path)

    def parse(record, where: str) -> Conversation:
        return to_conversation(normalize(record, where) if normalize else record, options, where)

    conversations = read_parsed(path, parse, skip_bad_records, "no usable records")
    if options.require_response and not any(has_answer(c) for c in conversations):
        raise GlmtuneError(f"{path}: every answer is empty ({_answer_key(options)}); there is nothing to learn or score")
    return conversations


def has_answer(conversation: Conversation) -> bool:
    """Whether an answer that carries the loss has any non-blank text."""
    return any(turn.answer.strip() for turn in conversation.turns if turn.trains)


def _answer_key(options: FormatOptions) -> str:
    return {"columns": f"key '{options.response_column}'", "alpaca": "key 'output'"}.get(options.dataset_format, "the gpt turns")


def read_records(path: Path, skip_bad_records: bool, report: LoadReport):
    if path.suffix.lower() == ".csv":
        yield from _csv_records(path)
        return
    if path.suffix.lower() == ".parquet":
        yield from _parquet_records(path)
        return
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
    if data.lstrip().startswith(b"["):
        try:
            records = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise GlmtuneError(_not_utf8(path, data, error)) from None
        except json.JSONDecodeError as error:
            raise GlmtuneError(f"{path}:{error.lineno}: not valid JSON ({error.msg}, column {error.colno})") from None
        # A JSON array has no line per record; name the record by its 1-based index.
        for index, record in enumerate(records, start=1):
            yield f"{path}:record {index}", record
        return
    # Records end at "\n" only: str.splitlines() would also split at U+2028, U+0085 and others, which
    # JSON allows unescaped inside strings. A "\n" byte is never part of a multi-byte UTF-8 character.
    for line_number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_number}", json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if isinstance(error, UnicodeDecodeError):
                message = _not_utf8(path, line, error, line_number)
            else:
                message = f"{path}:{line_number}: not valid JSON ({error.msg}, column {error.colno})"
            if not skip_bad_records:
                raise GlmtuneError(message) from None
            report.skipped += 1
            logger.debug("skipped %s", message)


def _not_utf8(path: Path, data: bytes, error: UnicodeDecodeError, line_number: int | None = None) -> str:
    """``file:line: not UTF-8`` for the first undecodable byte of ``data`` (one line, or the whole file)."""
    if line_number is None:
        line_number = data.count(b"\n", 0, error.start) + 1
    column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
    return (f"{path}:{line_number}: not UTF-8 (byte 0x{data[error.start]:02x} at byte column {column}); "
            "save the file as UTF-8")


def _csv_records(path: Path):
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        for row in reader:
            # line_num: the line the record ends on (the header is line 1; a quoted field may span lines).
            # An empty cell is a missing value, as pandas and datasets read CSV.
            yield f"{path}:{reader.line_num}", {k: v for k, v in row.items() if v != ""}


def _parquet_records(path: Path):
    try:
        import pyarrow.parquet
    except ImportError:
        raise GlmtuneError(f"{path}: reading Parquet needs pyarrow: pip install 'glmtune[parquet]'") from None
    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except pyarrow.ArrowException as error:
        raise GlmtuneError(f"{path}: not a readable Parquet file ({error})") from None
    for index, row in enumerate(rows, start=1):
        yield f"{path}:row {index}", row


def _string(record: dict, key: str, where: str, required: bool = True) -> str | None:
    if key not in record or record[key] is None:
        if required:
            raise BadRecord(f"{where}: missing key '{key}'")
        return None
    value = record[key]
    if not isinstance(value, str):
        raise BadRecord(f"{where}: key '{key}' must be a string, got {type(value).__name__}")
    return value


def _history(record: dict, key: str | None, where: str) -> list[Turn]:
    if not key or record.get(key) is None:
        return []
    pairs = record[key]
    if not isinstance(pairs, list):
        raise BadRecord(f"{where}: key '{key}' must be a list of [query, answer] pairs")
    turns = []
    for index, pair in enumerate(pairs):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise BadRecord(f"{where}: key '{key}' item {index} must be a [query, answer] pair of strings")
        turns.append(Turn(pair[0], pair[1], trains=False))
    return turns


def to_conversation(record, options: FormatOptions, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if options.dataset_format == "columns":
        query = _string(record, options.prompt_column, where)
        answer = _string(record, options.response_column, where, options.require_response) or ""
        turns = _history(record, options.history_column, where) + [Turn(query, answer)]
        return Conversation(turns, source=where)
    if options.dataset_format == "alpaca":
        instruction = _string(record, "instruction", where)
        extra_input = _string(record, "input", where, required=False)
        query = f"{instruction}\n{extra_input}" if extra_input else instruction
        answer = _string(record, "output", where, options.require_response) or ""
        turns = _history(record, "history", where) + [Turn(query, answer)]
        return Conversation(turns, system=_string(record, "system", where, required=False), source=where)
    if options.dataset_format == "sharegpt":
        return _sharegpt(record, options, where)
    raise GlmtuneError(f"unknown --dataset_format {options.dataset_format}")


_ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
               "function_call": "function_call", "observation": "observation", "tool": "observation"}


def _sharegpt(record: dict, options: FormatOptions, where: str) -> Conversation:
    key = "conversations" if "conversations" in record else "messages"
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        raise BadRecord(f"{where}: missing key 'conversations' (a non-empty list of turns)")
    try:
        functions = normalize_tools(record["tools"], where) if record.get("tools") is not None else []
    except GlmtuneError as error:
        raise BadRecord(str(error)) from None
    system = None
    roles_and_texts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise BadRecord(f"{where}: key '{key}' item {index} must be an object")
        role_key, text_key = ("from", "value") if "from" in message else ("role", "content")
        role = _ROLE_NAMES.get(message.get(role_key))
        if role is None:
            raise BadRecord(f"{where}: key '{key}' item {index}: unknown or missing '{role_key}'")
        text = _string(message, text_key, f"{where}: key '{key}' item {index}")
        if role == "system" and index == 0:
            system = text
        else:
            roles_and_texts.append((role, text, f"{where}: key '{key}' item {index}"))
    if not roles_and_texts or roles_and_texts[-1][0] not in ("assistant", "function_call"):
        if options.require_response or not roles_and_texts:
            raise BadRecord(f"{where}: key '{key}' must end with an assistant (gpt) turn")
        roles_and_texts.append(("assistant", "", where))
    turns = _sharegpt_turns(roles_and_texts, key, where)
    uses_tools = any(turn.calls for turn in turns)
    if uses_tools and not functions:
        raise BadRecord(f"{where}: a function_call turn needs the record's 'tools' (the function definitions)")
    last_user = max(i for i, turn in enumerate(turns) if not turn.observations)
    for index, turn in enumerate(turns):
        # A tool round trains every assistant turn of the last request (its calls and its final answer).
        turn.trains = options.train_on == "all" or index == len(turns) - 1 or (uses_tools and index >= last_user)
    return Conversation(turns, system=system, source=where, tools=functions or None)


def _sharegpt_turns(messages: list[tuple[str, str, str]], key: str, where: str) -> list[Turn]:
    """(query or observations, answer or calls) turns: human/observation then gpt/function_call, alternating."""
    turns: list[Turn] = []
    current: Turn | None = None
    for role, text, at in messages:
        if role == "user":
            if current is not None:
                raise BadRecord(f"{where}: key '{key}' turns must alternate human, gpt")
            current = Turn(text, "")
        elif role == "observation":
            if current is None and turns and turns[-1].calls:
                current = Turn("", "", observations=[text])
            elif current is not None and current.observations:
                current.observations.append(text)
            else:
                raise BadRecord(f"{at}: an observation must follow a function_call turn")
        elif current is None:
            raise BadRecord(f"{where}: key '{key}' turns must alternate human, gpt")
        else:
            if role == "function_call":
                try:
                    current.calls = parse_calls_value(text, at)
                except GlmtuneError as error:
                    raise BadRecord(str(error)) from None
            else:
                current.answer = text
            turns.append(current)
            current = None
    return turns
