"""Vocabulary extension (Chinese-LLaMA-Alpaca's first step): more tokens, and embedding rows for them.

``--add_tokens FILE`` adds one token per line to the model's tokenizer; ``--new_tokenizer PATH`` takes a
tokenizer that extends the model's (the same ids for every old token); ``--resize_vocab`` alone makes
the embeddings match the tokenizer. Each new row of the input embedding (and of an untied LM head)
starts as the mean of the rows of the old tokens that the new token's text splits into, so a new token
begins where the model already understands its text. transformers' own ``mean_resizing`` gives every
new row the same mean of all rows instead.

The initialisation depends only on the base model and the two tokenizers, so an output that saved its
tokenizer rebuilds the same rows on load (``resize_for_tokenizer``); trained rows then overwrite them.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)


def read_token_file(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise GlmtuneError(f"--add_tokens {path}: file not found")
    tokens = list(dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()))
    if not tokens:
        raise GlmtuneError(f"--add_tokens {path}: no tokens (one per line)")
    return tokens


def check_extends(old_tokenizer, new_tokenizer, where: str) -> None:
    """Every token of ``old_tokenizer`` keeps its id in ``new_tokenizer``."""
    old_vocab, new_vocab = old_tokenizer.get_vocab(), new_tokenizer.get_vocab()
    changed = [token for token, index in old_vocab.items() if new_vocab.get(token) != index]
    if changed:
        raise GlmtuneError(f"{where}: does not extend the model's tokenizer ({len(changed)} old tokens have another "
                           f"id or are missing, e.g. {changed[0]!r})")


def extended_tokenizer(tokenizer, add_tokens: str | None, new_tokenizer: str | None):
    """The tokenizer to train with: ``tokenizer`` plus the file's tokens, or the named extension."""
    if add_tokens and new_tokenizer:
        raise GlmtuneError("choose one of --add_tokens and --new_tokenizer")
    if new_tokenizer:
        from glmtune.models.loading import load_tokenizer

        extended = load_tokenizer(new_tokenizer)
        check_extends(tokenizer, extended, f"--new_tokenizer {new_tokenizer}")
        return extended
    if add_tokens:
        extended = copy.deepcopy(tokenizer)
        added = extended.add_tokens(read_token_file(add_tokens))
        logger.info("added %d new tokens from %s (the others were already in the vocabulary)", added, add_tokens)
        return extended
    return tokenizer


def _tied(model: nn.Module) -> bool:
    head = model.get_output_embeddings()
    return head is None or head.weight is model.get_input_embeddings().weight


def resize_for_tokenizer(model: nn.Module, old_tokenizer, new_tokenizer) -> list[int]:
    """Give ``model`` a row for every id of ``new_tokenizer``; returns the ids whose rows were initialised.

    The new ids are those ``old_tokenizer`` does not have; a model whose matrix already has spare rows
    (padded vocabularies) keeps its size when they suffice.
    """
    from glmtune.models.quantization import QuantizedEmbedding

    embeddings = model.get_input_embeddings()
    if embeddings is None or not hasattr(model, "resize_token_embeddings"):
        raise GlmtuneError(f"{type(model).__name__}: vocabulary extension needs a transformers model with input embeddings")
    if isinstance(embeddings, QuantizedEmbedding):
        raise GlmtuneError("vocabulary extension with --quantization_bit needs --no_quantize_embeddings")
    old_size, new_size = len(old_tokenizer), len(new_tokenizer)
    rows = embeddings.weight.shape[0]
    if new_size > rows:
        model.resize_token_embeddings(new_size, mean_resizing=False)
    new_ids = list(range(old_size, new_size))
    if not new_ids:
        return []
    matrices = [model.get_input_embeddings().weight]
    if not _tied(model):
        matrices.append(model.get_output_embeddings().weight)
    with torch.no_grad():
        for matrix in matrices:
            fallback = matrix[:old_size].float().mean(0)
            for index in new_ids:
                text = new_tokenizer.decode([index])
                pieces = [i for i in old_tokenizer(text, add_special_tokens=False)["input_ids"] if i < old_size]
                row = matrix[pieces].float().mean(0) if pieces else fallback
                matrix[index] = row.to(matrix.dtype)
    if model.config.vocab_size != model.get_input_embeddings().weight.shape[0]:
        model.config.vocab_size = model.get_input_embeddings().weight.shape[0]
    logger.info("vocabulary: %d -> %d tokens (new rows: mean of their old sub-token embeddings)", old_size, new_size)
    return new_ids


def vocabulary_record(tokenizer, extended, add_tokens: str | None, new_tokenizer: str | None) -> dict:
    """What a run record keeps to rebuild the training tokenizer from the base's, wherever a checkpoint is."""
    if new_tokenizer:
        return {"new_tokenizer": str(Path(new_tokenizer).resolve()), "size": len(extended)}
    added = [extended.convert_ids_to_tokens(i) for i in range(len(tokenizer), len(extended))]
    return {"added_tokens": added, "size": len(extended)}


def tokenizer_for_output(folder: Path, base_tokenizer, record: dict):
    """The tokenizer a trained output was trained with: the one saved in it, else rebuilt from its record."""
    from glmtune.models.loading import load_tokenizer

    if (Path(folder) / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(str(folder))
    elif record.get("new_tokenizer"):
        tokenizer = load_tokenizer(record["new_tokenizer"])
    else:
        tokenizer = copy.deepcopy(base_tokenizer)
        tokenizer.add_tokens(record.get("added_tokens", []))
    if len(tokenizer) != record["size"]:
        raise GlmtuneError(f"{folder}: its tokenizer has {len(tokenizer)} tokens, the run trained with {record['size']}")
    return tokenizer
