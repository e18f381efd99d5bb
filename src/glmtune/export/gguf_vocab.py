"""A transformers tokenizer as llama.cpp's ``tokenizer.ggml.*`` metadata.

SentencePiece-style vocabularies (BPE with byte fallback and "▁" for spaces: Gemma, Llama 2, Mistral)
are written as llama.cpp's ``llama`` tokenizer, the form ``convert_hf_to_gguf.py`` gives them: pieces in
id order, scores falling with the id (SentencePiece orders pieces by score), token types from the
added-token table, byte pieces ``<0xNN>`` as BYTE.
"""

from __future__ import annotations

import json
import logging
import re

import gguf

from glmtune.errors import GlmtuneError

logger = logging.getLogger(__name__)

BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")
TokenType = gguf.TokenType


def _backend_model(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str())["model"] if backend is not None else {}


def vocabulary(tokenizer, vocab_size: int, spaces_as_text: bool) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, token types) for ids 0..vocab_size-1; ids the tokenizer lacks become [PADn], as llama.cpp pads.

    ``spaces_as_text``: Gemma's runs of spaces are user-defined pieces of real spaces in llama.cpp's files
    (transformers' GGUF reader turns them back into "▁▁..." the same way).
    """
    if len(tokenizer) > vocab_size:
        raise GlmtuneError(f"the tokenizer has {len(tokenizer)} tokens but the model only {vocab_size} embeddings")
    added = tokenizer.added_tokens_decoder
    pieces, scores, types = [], [], []
    for token_id, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        if token_id in added:
            kind = TokenType.CONTROL if added[token_id].special else TokenType.USER_DEFINED
        elif BYTE_PIECE.fullmatch(piece):
            kind = TokenType.BYTE
        elif spaces_as_text and len(piece) > 1 and set(piece) == {"▁"}:
            piece, kind = " " * len(piece), TokenType.USER_DEFINED
        else:
            kind = TokenType.NORMAL
        pieces.append(piece)
        types.append(kind)
        scores.append(-float(token_id) if kind == TokenType.NORMAL else 0.0 if kind == TokenType.BYTE else -1000.0)
    for token_id in range(len(tokenizer), vocab_size):
        pieces.append(f"[PAD{token_id}]")
        types.append(TokenType.UNUSED)
        scores.append(-1000.0)
    return pieces, scores, types


def add_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int, spaces_as_text: bool = False) -> None:
    model = _backend_model(tokenizer)
    if not (model.get("type") == "BPE" and model.get("byte_fallback")):
        logger.warning("the tokenizer (%s) is not SentencePiece-style; the GGUF carries its vocabulary, but llama.cpp "
                       "will not split text the same way", model.get("type") or type(tokenizer).__name__)
    pieces, scores, types = vocabulary(tokenizer, vocab_size, spaces_as_text)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            add(token_id)
    with_specials = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and with_specials[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and with_specials[-1:] == [tokenizer.eos_token_id])
    writer.add_add_space_prefix(bool(plain) and tokenizer.convert_ids_to_tokens(plain[0]).startswith("▁"))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
