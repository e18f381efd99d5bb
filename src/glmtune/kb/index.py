"""The knowledge base folder: building it, updating it from changed files only, loading it, searching it.

DIR/manifest.json   settings and one entry per file (its content hash and chunk count)
DIR/chunks.jsonl    one chunk per line: file, source, where, start, text, BM25 tokens
DIR/bm25/           the bm25s index
DIR/dense.faiss     the FAISS index (with --embedding_model), whose rows are the chunks in order

An update writes a new folder next to DIR and swaps it in, so a crash leaves the old index whole.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from glmtune.errors import GlmtuneError
from glmtune.kb import dense as dense_module
from glmtune.kb.lexical import LexicalIndex, tokenize
from glmtune.kb.loaders import UnreadableFile, collect_files, load
from glmtune.kb.splitter import CHUNK_OVERLAP, CHUNK_SIZE, Chunk, check_sizes, split

FORMAT = 1
MANIFEST, CHUNKS, LEXICAL, DENSE = "manifest.json", "chunks.jsonl", "bm25", "dense.faiss"
RRF_K = 60  # the constant of Cormack et al.'s reciprocal rank fusion
Retriever = Literal["auto", "lexical", "dense", "hybrid"]
RETRIEVERS = ("auto", "lexical", "dense", "hybrid")


@dataclass
class StoredChunk:
    file: str  # the resolved path: the key of its manifest entry
    chunk: Chunk
    tokens: list[str]

    def record(self) -> dict:
        c = self.chunk
        return {"file": self.file, "source": c.source, "where": c.where, "start": c.start, "text": c.text,
                "tokens": self.tokens}

    @classmethod
    def from_record(cls, record: dict) -> StoredChunk:
        chunk = Chunk(record["source"], record["where"], record["start"], record["text"])
        return cls(record["file"], chunk, record["tokens"])


@dataclass
class BuildReport:
    folder: Path
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    chunks: int = 0
    embedded: int = 0

    def summary(self) -> str:
        files = len(self.added) + len(self.updated) + len(self.unchanged)
        return (f"{self.folder}: {files} file(s), {self.chunks} chunk(s) ({len(self.added)} added, "
                f"{len(self.updated)} updated, {len(self.unchanged)} unchanged, {len(self.removed)} removed, "
                f"{len(self.errors)} unreadable; {self.embedded} chunk(s) embedded)")


@dataclass
class Passage:
    """A retrieved chunk. ``score`` ranks (BM25, cosine, or fused); ``relevance`` is what the threshold compares:
    the BM25 score for lexical retrieval, the cosine similarity for dense and hybrid."""

    chunk: Chunk
    score: float
    relevance: float

    def to_json(self) -> dict:
        return {"source": self.chunk.source, "position": self.chunk.position(), "text": self.chunk.text,
                "score": round(self.score, 6)}


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as error:
        raise UnreadableFile(f"{path}: {error.strerror or error}") from None


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GlmtuneError(f"{folder} is not a knowledge base (no {MANIFEST}; make one with glmtune kb build)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise GlmtuneError(f"{folder / MANIFEST}: cannot read it ({error})") from None
    if manifest.get("format") != FORMAT:
        raise GlmtuneError(f"{folder / MANIFEST}: format {manifest.get('format')} is not {FORMAT}; rebuild the index")
    return manifest


def _read_chunks(folder: Path) -> list[StoredChunk]:
    with open(folder / CHUNKS, encoding="utf-8") as lines:
        return [StoredChunk.from_record(json.loads(line)) for line in lines]


def _resolved_model(name: str | None) -> str | None:
    """A local folder is stored as an absolute path, so the index works from any working directory."""
    if name is None:
        return None
    return str(Path(name).resolve()) if Path(name).exists() else name


def build(paths: list[str], output: str, chunk_size: int | None = None, chunk_overlap: int | None = None,
          embedding_model: str | None = None, show_progress: bool = True) -> BuildReport:
    """Index ``paths`` (files and folders) into ``output``. An existing index there is updated: unchanged files
    keep their chunks and vectors, changed and new files are read again, files no longer given are dropped.
    Settings left out (None) are those of the existing index, else Chatchat's 750/150 and no embedding model."""
    folder = Path(output)
    report = BuildReport(folder)
    old_manifest: dict = {"files": {}}
    old_chunks: list[StoredChunk] = []
    old_vectors: np.ndarray | None = None
    if (folder / MANIFEST).exists():
        old_manifest = _read_manifest(folder)
        old_chunks = _read_chunks(folder)
        if old_manifest.get("embedding_model") and (folder / DENSE).exists():
            old_vectors = dense_module.DenseIndex.load(folder / DENSE).vectors()
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise GlmtuneError(f"--output {folder} exists and is not a knowledge base; give an empty or new folder")

    settings = {
        "chunk_size": chunk_size or old_manifest.get("chunk_size") or CHUNK_SIZE,
        "chunk_overlap": chunk_overlap if chunk_overlap is not None else old_manifest.get("chunk_overlap", CHUNK_OVERLAP),
        "embedding_model": _resolved_model(embedding_model) or old_manifest.get("embedding_model"),
    }
    check_sizes(settings["chunk_size"], settings["chunk_overlap"])
    same_settings = all(old_manifest.get(key) == value for key, value in settings.items())
    embedder = dense_module.load_embedder(settings["embedding_model"]) if settings["embedding_model"] else None

    rows_of: dict[str, list[int]] = {}
    for row, stored in enumerate(old_chunks):
        rows_of.setdefault(stored.file, []).append(row)

    files, report.errors = collect_files(paths)
    kept: list[tuple[str, list[StoredChunk], list[int] | None]] = []  # (file, chunks, old rows or None = new)
    entries: dict[str, dict] = {}
    for path in tqdm(files, desc="reading", unit="file", disable=not show_progress):
        key = str(path.resolve())
        if key in entries:
            continue
        try:
            digest = _sha256(path)
            previous = old_manifest["files"].get(key)
            if same_settings and previous and previous["sha256"] == digest:
                rows = rows_of.get(key, [])
                chunks = [old_chunks[row] for row in rows]
                for stored in chunks:
                    stored.chunk.source = str(path)
                kept.append((key, chunks, rows))
                report.unchanged.append(str(path))
            else:
                pieces = split(load(path), str(path), settings["chunk_size"], settings["chunk_overlap"])
                kept.append((key, [StoredChunk(key, piece, tokenize(piece.text)) for piece in pieces], None))
                (report.updated if previous else report.added).append(str(path))
        except UnreadableFile as error:
            report.errors.append(str(error))
            continue
        entries[key] = {"source": str(path), "sha256": digest, "chunks": len(kept[-1][1])}
    report.removed = [entry["source"] for key, entry in old_manifest["files"].items() if key not in entries]

    chunks = [stored for _, file_chunks, _ in kept for stored in file_chunks]
    report.chunks = len(chunks)
    vectors = None
    if embedder is not None:
        fresh = [stored.chunk.text for _, file_chunks, rows in kept if rows is None for stored in file_chunks]
        report.embedded = len(fresh)
        fresh_vectors = iter(embedder.embed(fresh, show_progress=show_progress))
        parts = [old_vectors[rows] if rows is not None else np.stack([next(fresh_vectors) for _ in file_chunks])
                 for _, file_chunks, rows in kept if file_chunks]
        vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dimension), dtype=np.float32)

    manifest = {"format": FORMAT, **settings, "files": entries}
    _write(folder, manifest, chunks, vectors)
    return report


def _write(folder: Path, manifest: dict, chunks: list[StoredChunk], vectors: np.ndarray | None) -> None:
    staging = folder.with_name(f".{folder.name}.building")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    with open(staging / CHUNKS, "w", encoding="utf-8") as out:
        for stored in chunks:
            out.write(json.dumps(stored.record(), ensure_ascii=False) + "\n")
    LexicalIndex.build([stored.tokens for stored in chunks]).save(staging / LEXICAL)
    if vectors is not None:
        dense_module.DenseIndex.build(vectors).save(staging / DENSE)
    (staging / MANIFEST).write_text(json.dumps(manifest, ensure_ascii=False, indent=1), encoding="utf-8")
    retired = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    if folder.exists():
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)


class KnowledgeBase:
    """A loaded index: chunks, BM25, and (when built with an embedding model) FAISS plus that model."""

    def __init__(self, folder: Path, manifest: dict, chunks: list[Chunk], lexical: LexicalIndex,
                 dense: dense_module.DenseIndex | None, embedder: dense_module.Embedder | None):
        self.folder, self.manifest, self.chunks = folder, manifest, chunks
        self.lexical, self.dense, self.embedder = lexical, dense, embedder

    @classmethod
    def load(cls, folder: str | Path) -> KnowledgeBase:
        folder = Path(folder)
        manifest = _read_manifest(folder)
        try:
            chunks = [stored.chunk for stored in _read_chunks(folder)]
            lexical = LexicalIndex.load(folder / LEXICAL, len(chunks))
        except (OSError, ValueError, KeyError) as error:
            raise GlmtuneError(f"{folder}: the index is damaged ({error}); build it again") from None
        dense = embedder = None
        if manifest.get("embedding_model"):
            dense = dense_module.DenseIndex.load(folder / DENSE)
            embedder = dense_module.load_embedder(manifest["embedding_model"])
            if embedder.dimension != dense.dimension:
                raise GlmtuneError(f"{folder}: vectors have {dense.dimension} dimensions but "
                                   f"{manifest['embedding_model']} gives {embedder.dimension}; build it again")
        return cls(folder, manifest, chunks, lexical, dense, embedder)

    def resolve(self, retriever: Retriever) -> str:
        if retriever == "auto":
            return "hybrid" if self.dense else "lexical"
        if retriever not in RETRIEVERS:
            raise GlmtuneError(f"unknown retriever {retriever!r}; choose one of {', '.join(RETRIEVERS)}")
        if retriever != "lexical" and self.dense is None:
            raise GlmtuneError(f"{self.folder} has no dense index (build it with --embedding_model) for the "
                               f"{retriever} retriever")
        return retriever

    def search(self, query: str, top_k: int = 3, retriever: Retriever = "auto") -> list[Passage]:
        """The best ``top_k`` passages for ``query``, best first."""
        if top_k < 1:
            raise GlmtuneError(f"--top_k must be at least 1, got {top_k}")
        mode = self.resolve(retriever)
        if mode == "lexical":
            return [Passage(self.chunks[row], score, score) for row, score in self.lexical.search(query, top_k)]
        query_vector = self.embedder.embed([query])[0]
        if mode == "dense":
            return [Passage(self.chunks[row], score, score) for row, score in self.dense.search(query_vector, top_k)]
        depth = max(4 * top_k, 20)
        fused = reciprocal_rank_fusion([self.lexical.search(query, depth), self.dense.search(query_vector, depth)])
        return [Passage(self.chunks[row], score, self.dense.similarity(query_vector, row))
                for row, score in fused[:top_k]]


def reciprocal_rank_fusion(rankings: Iterable[list[tuple[int, float]]], k: int = RRF_K) -> list[tuple[int, float]]:
    """Rows ordered by the sum of 1 / (k + rank) over the rankings they appear in."""
    fused: dict[int, float] = {}
    for ranking in rankings:
        for rank, (row, _) in enumerate(ranking, 1):
            fused[row] = fused.get(row, 0.0) + 1.0 / (k + rank)
    return sorted(fused.items(), key=lambda item: -item[1])
