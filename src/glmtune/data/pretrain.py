"""Raw text for continued pre-training (``--stage pt``): documents joined by EOS, packed into blocks.

Documents come from ``.txt`` files (one document per non-empty line, as LLaMA-Factory and
``datasets``' text loader read them) or from JSON/JSONL records with a text key (``--text_column``,
default ``text``: LLaMA-Factory's ``c4_demo.jsonl``). Each document is tokenized as the tokenizer
starts a text (its BOS, if it adds one) and ends with EOS; the token stream is cut into blocks of
``block_size`` tokens, the last one possibly shorter. Every token is a label.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm.auto import tqdm

from glmtune.data.formats import BadRecord, read_parsed
from glmtune.data.preprocess import Example
from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

TOKENIZE_BATCH = 1000


def read_documents(path: str | Path, text_column: str = "text", skip_bad_records: bool = False,
                   column_flag: str = "set --text_column") -> list[str]:
    """The documents in a ``.txt``, JSON or JSONL file; a bad record stops with its file and line.
    ``column_flag`` says where ``text_column`` was set, for the error of a record that lacks it."""
    path = Path(path)
    if path.suffix != ".txt":
        return read_parsed(path, lambda record, where: _document(record, where, text_column, column_flag),
                           skip_bad_records, "no documents")
    if not path.is_file():
        raise GlmtuneError(f"data file not found: {path}")
    documents = [line for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    if not documents:
        raise GlmtuneError(f"{path}: no documents (the file is empty or every record was bad)")
    return documents


def _document(record, where: str, text_column: str, column_flag: str) -> str:
    text = record.get(text_column) if isinstance(record, dict) else None
    if isinstance(text, str) and text.strip():
        return text
    if not isinstance(record, dict) or text_column not in record:
        raise BadRecord(f"{where}: missing key '{text_column}' ({column_flag})")
    raise BadRecord(f"{where}: key '{text_column}' must be a non-empty string")


def _adds_special_tokens(tokenizer) -> bool:
    """Native ChatGLM tokenizers' special tokens are prompt markers ([gMASK] sop), not a text start."""
    from glmtune.data.templates import is_chatglm_tokenizer

    return not is_chatglm_tokenizer(tokenizer)


def pack_documents(token_lists: list[list[int]], eos_id: int, block_size: int) -> list[Example]:
    """Concatenate the documents, each followed by ``eos_id``, and cut the stream into blocks."""
    stream: list[int] = []
    for tokens in token_lists:
        stream += tokens + [eos_id]
    blocks = [stream[start : start + block_size] for start in range(0, len(stream), block_size)]
    return [Example(block, list(block)) for block in blocks if len(block) > 1]


def pretrain_examples(documents: list[str], tokenizer, block_size: int) -> list[Example]:
    """Training blocks of at most ``block_size`` tokens, labels equal to the inputs (loss on every token)."""
    if tokenizer.eos_token_id is None:
        raise GlmtuneError("--stage pt: the tokenizer has no EOS token to put between documents")
    if block_size < 2:
        raise GlmtuneError("--stage pt: the block size (--max_source_length + --max_target_length) must be at least 2")
    special = _adds_special_tokens(tokenizer)
    token_lists: list[list[int]] = []
    batches = range(0, len(documents), TOKENIZE_BATCH)
    for start in tqdm(batches, desc="tokenizing", unit="batch", disable=len(batches) < 5):
        batch = documents[start : start + TOKENIZE_BATCH]
        token_lists += [list(ids) for ids in tokenizer(batch, add_special_tokens=special)["input_ids"]]
    examples = pack_documents(token_lists, tokenizer.eos_token_id, block_size)
    logger.info("packed %d documents (%d tokens) into %d blocks of up to %d tokens", len(documents),
                sum(len(e.input_ids) for e in examples), len(examples), block_size)
    return examples
