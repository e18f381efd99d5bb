"""Dense retrieval: sentence-transformers embeddings (unit length) in a FAISS inner-product index, so a
score is the cosine similarity. The index file keeps the vectors, so an update re-embeds changed files only."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from glmtune.errors import GlmtuneError
from glmtune.kb import require


class Embedder:
    """A sentence-transformers model (a local folder or a hub name) that turns texts into unit vectors."""

    def __init__(self, name_or_path: str):
        sentence_transformers = require("sentence_transformers", "sentence-transformers")
        self.name_or_path = name_or_path
        self.name = Path(name_or_path).name if Path(name_or_path).exists() else name_or_path
        try:
            self.model = sentence_transformers.SentenceTransformer(name_or_path)
        except Exception as error:  # a missing folder, no hub access, or not a sentence-transformers model
            raise GlmtuneError(f"cannot load the embedding model {name_or_path}: {error}") from None
        # sentence-transformers 6 renamed the method; the kb extra accepts older versions too.
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dimension = dimension()

    def embed(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = self.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                                    show_progress_bar=show_progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def token_count(self, texts: list[str]) -> int:
        return sum(len(ids) for ids in self.model.tokenizer(texts)["input_ids"])


@functools.cache
def load_embedder(name_or_path: str) -> Embedder:
    """One loaded copy per model, shared by the knowledge base and /v1/embeddings."""
    return Embedder(name_or_path)


class DenseIndex:
    def __init__(self, index):
        self.index = index

    @classmethod
    def build(cls, vectors: np.ndarray) -> DenseIndex:
        faiss = require("faiss", "faiss-cpu")
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return cls(index)

    @classmethod
    def load(cls, path: Path) -> DenseIndex:
        faiss = require("faiss", "faiss-cpu")
        return cls(faiss.read_index(str(path)))

    def save(self, path: Path) -> None:
        require("faiss", "faiss-cpu").write_index(self.index, str(path))

    @property
    def dimension(self) -> int:
        return self.index.d

    def vectors(self) -> np.ndarray:
        return self.index.reconstruct_n(0, self.index.ntotal)

    def search(self, query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk number, cosine similarity) of the ``k`` nearest chunks, best first."""
        k = min(k, self.index.ntotal)
        if k < 1:
            return []
        scores, rows = self.index.search(query_vector.reshape(1, -1), k)
        return [(int(row), float(score)) for row, score in zip(rows[0], scores[0]) if row >= 0]

    def similarity(self, query_vector: np.ndarray, row: int) -> float:
        return float(self.index.reconstruct(row) @ query_vector)
