"""Text to chunks with langchain's recursive splitter and the separators of Chatchat's ChineseRecursiveTextSplitter:
paragraphs, lines, Chinese and English sentence ends, semicolons, commas, then characters."""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.errors import GlmtuneError
from glmtune.kb import require
from glmtune.kb.loaders import Section

# Chatchat 0.3's knowledge-base defaults (characters).
CHUNK_SIZE = 750
CHUNK_OVERLAP = 150
SEPARATORS = ["\n\n", "\n", "。|！|？", r"\.\s|\!\s|\?\s", "；|;\\s", "，|,\\s", ""]


@dataclass
class Chunk:
    """A passage of one file: ``where`` is its section (``page 3``...), ``start`` its character offset there."""

    source: str
    where: str
    start: int
    text: str

    def position(self) -> str:
        return f"{self.where}, char {self.start}" if self.where else f"char {self.start}"


def check_sizes(chunk_size: int, chunk_overlap: int) -> None:
    if chunk_size < 1:
        raise GlmtuneError(f"--chunk_size must be at least 1, got {chunk_size}")
    if not 0 <= chunk_overlap < chunk_size:
        raise GlmtuneError(f"--chunk_overlap must be in [0, --chunk_size), got {chunk_overlap}")


def split(sections: list[Section], source: str, chunk_size: int = CHUNK_SIZE,
          chunk_overlap: int = CHUNK_OVERLAP) -> list[Chunk]:
    """Chunks of at most ``chunk_size`` characters, neighbours sharing up to ``chunk_overlap``."""
    check_sizes(chunk_size, chunk_overlap)
    splitters = require("langchain_text_splitters", "langchain-text-splitters")
    splitter = splitters.RecursiveCharacterTextSplitter(
        separators=SEPARATORS, is_separator_regex=True, keep_separator="end", chunk_size=chunk_size,
        chunk_overlap=chunk_overlap, add_start_index=True,
    )
    chunks = []
    for section in sections:
        for document in splitter.create_documents([section.text]):
            chunks.append(Chunk(source, section.where, document.metadata["start_index"], document.page_content))
    return chunks
