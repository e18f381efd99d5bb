"""BM25 on jieba-segmented text (bm25s): the default retriever, which needs no embedding model.

jieba's search mode also emits the shorter words inside long ones (天安门 -> 天安, 天安门), so a question
that uses a part of a compound still matches; English words pass through jieba whole and are lower-cased.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from glmtune.kb import require


@functools.cache
def _stopwords() -> frozenset[str]:
    stopwords = require("bm25s.stopwords", "bm25s")
    return frozenset(stopwords.STOPWORDS_EN) | frozenset(stopwords.STOPWORDS_CHINESE)


@functools.cache
def _jieba():
    jieba = require("jieba")
    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
    return jieba


def tokenize(text: str) -> list[str]:
    """Words of ``text`` for BM25: jieba's search-mode words, lower-cased, without punctuation and stopwords."""
    stopwords = _stopwords()
    words = (word.strip().lower() for word in _jieba().cut_for_search(text))
    return [word for word in words if word and any(c.isalnum() for c in word) and word not in stopwords]


class LexicalIndex:
    """A bm25s index over the chunks' tokens, saved in its own folder."""

    def __init__(self, retriever, size: int):
        self.retriever = retriever
        self.size = size

    @classmethod
    def build(cls, tokens: list[list[str]]) -> LexicalIndex:
        bm25s = require("bm25s")
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every build at INFO
        retriever = bm25s.BM25()
        # bm25s cannot index an empty corpus or an all-empty one; a placeholder token keeps every row scorable.
        retriever.index([words or ["\x00"] for words in tokens] or [["\x00"]], show_progress=False)
        return cls(retriever, len(tokens))

    def save(self, folder: Path) -> None:
        self.retriever.save(str(folder), show_progress=False)

    @classmethod
    def load(cls, folder: Path, size: int) -> LexicalIndex:
        bm25s = require("bm25s")
        return cls(bm25s.BM25.load(str(folder), show_progress=False), size)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk number, BM25 score) of the best ``k`` chunks sharing a word with ``query``, best first."""
        words = tokenize(query)
        if not words or not self.size:
            return []
        rows, scores = self.retriever.retrieve([words], k=min(k, self.size), show_progress=False)
        return [(int(row), float(score)) for row, score in zip(rows[0], scores[0]) if score > 0]
