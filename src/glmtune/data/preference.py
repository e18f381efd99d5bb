"""Preference pairs for ``--stage dpo``: one prompt, a chosen and a rejected answer.

Record forms (JSON array or JSON lines, any mix):

* ``prompt`` / ``chosen`` / ``rejected`` strings, optional ``system`` (TRL's and many datasets' form);
* sharegpt with ``ranking: true`` (LLaMA-Factory's ``dpo_en_demo.json``): ``conversations`` (or
  ``messages``) ending with the human turn, ``chosen`` and ``rejected`` each a ``{"from": "gpt",
  "value": ...}`` message (or a plain string);
* alpaca with ``ranking: true``: ``instruction``, optional ``input``, ``chosen``, ``rejected``.

Both answers of a pair are encoded with the same template and truncation as SFT, so they share the
prompt tokens and only the answers carry labels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from glmtune.data.formats import BadRecord, Conversation, FormatOptions, Turn, read_parsed, to_conversation
from glmtune.data.preprocess import Example, encode_conversation, segment_lengths, shared_lengths
from glmtune.data.templates import Template
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)


@dataclass
class PreferencePair:
    chosen: Conversation
    rejected: Conversation


@dataclass
class PreferenceExample:
    chosen: Example
    rejected: Example
    # Reference-model log-probabilities (summed over answer tokens), when precomputed (--precompute_ref_logps).
    reference_logps: tuple[float, float] | None = None


def _answer(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, dict):
        role = value.get("from", value.get("role"))
        if role not in ("gpt", "assistant"):
            raise BadRecord(f"{where}: key '{key}' must be a gpt/assistant message")
        value = value.get("value", value.get("content"))
    if not isinstance(value, str):
        raise BadRecord(f"{where}: missing key '{key}' (a string or a gpt message)")
    return value


def _with_answer(conversation: Conversation, answer: str) -> Conversation:
    *history, last = conversation.turns
    return Conversation(history + [Turn(last.query, answer)], conversation.system, conversation.source)


def to_pair(record, where: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise BadRecord(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    chosen, rejected = _answer(record, "chosen", where), _answer(record, "rejected", where)
    if "conversations" in record or "messages" in record:
        # The prompt turns with an empty answer for the last one, then each answer in its place.
        prompt = to_conversation(record, FormatOptions(dataset_format="sharegpt", require_response=False), where)
        if prompt.turns[-1].answer:
            raise BadRecord(f"{where}: the conversation must end with the human turn the chosen/rejected answers reply to")
    elif "instruction" in record:
        prompt = to_conversation(record, FormatOptions(dataset_format="alpaca", require_response=False), where)
    elif isinstance(record.get("prompt"), str):
        system = record.get("system")
        if system is not None and not isinstance(system, str):
            raise BadRecord(f"{where}: key 'system' must be a string")
        prompt = Conversation([Turn(record["prompt"], "")], system, where)
    else:
        raise BadRecord(f"{where}: a preference record needs 'prompt', 'instruction' or 'conversations' with 'chosen' and 'rejected'")
    return PreferencePair(_with_answer(prompt, chosen), _with_answer(prompt, rejected))


def read_preference_pairs(path: str | Path, skip_bad_records: bool = False,
                          normalize: Callable[[dict, str], dict] | None = None) -> list[PreferencePair]:
    """The pairs in a file. ``normalize(record, where)`` renames a dataset_info.json entry's keys to these."""
    def parse(record, where: str) -> PreferencePair:
        return to_pair(normalize(record, where) if normalize else record, where)

    return read_parsed(Path(path), parse, skip_bad_records, "no usable preference pairs")


def preference_examples(pairs: list[PreferencePair], tokenizer, template: Template, max_source_length: int,
                        max_target_length: int, cutoff_len: int | None = None) -> list[PreferenceExample]:
    """Encoded pairs; a pair whose chosen or rejected answer is cut away entirely is dropped. With ``cutoff_len``
    the prompt and the longer answer share that budget (LLaMA-Factory's pairwise split), so both keep one prompt."""
    if tokenizer.eos_token_id is None and not template.answer_has_end_marker:
        raise GlmtuneError("the tokenizer has no EOS token; set one or use a chat template")
    examples = []
    for pair in pairs:
        source_length, target_length = max_source_length, max_target_length
        if cutoff_len:
            (prompt_tokens, chosen_tokens), (_, rejected_tokens) = (segment_lengths(c, tokenizer, template)[-1]
                                                                    for c in (pair.chosen, pair.rejected))
            source_length, target_length = shared_lengths(prompt_tokens, max(chosen_tokens, rejected_tokens), cutoff_len)
            target_length = max(target_length, 1)  # room for the end token however long the prompt
        chosen, rejected = (encode_conversation(c, tokenizer, template, source_length, target_length)
                            for c in (pair.chosen, pair.rejected))
        if min(chosen.answer_tokens, rejected.answer_tokens) >= template.minimum_answer_labels:
            examples.append(PreferenceExample(chosen, rejected))
    if not examples:
        budget = f"cutoff_len={cutoff_len}" if cutoff_len else f"max_target_length={max_target_length}"
        raise GlmtuneError(f"no preference pair has answer tokens left after truncation ({budget})")
    if len(examples) < len(pairs):
        logger.warning("dropped %d pair(s) with an empty chosen or rejected answer", len(pairs) - len(examples))
    return examples
