"""``glmtune kb eval``: hit@k of the retriever on questions whose answer passage is known."""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from glmtune.errors import GlmtuneError
from glmtune.kb.index import KnowledgeBase, Passage


@dataclass
class Question:
    q: str
    doc: str  # the file the answer is in: its path, a path suffix, or its name
    key: str  # text the answer passage contains


@dataclass
class EvalReport:
    top_k: int
    retriever: str
    hits_at: dict[int, int] = field(default_factory=dict)
    misses: list[Question] = field(default_factory=list)
    total: int = 0

    def rate(self, k: int) -> float:
        return self.hits_at[k] / self.total if self.total else 0.0

    def summary(self) -> str:
        lines = [f"{self.total} question(s), retriever {self.retriever}"]
        lines += [f"hit@{k}: {self.rate(k):.1%} ({self.hits_at[k]}/{self.total})" for k in sorted(self.hits_at)]
        lines += [f"miss@{self.top_k}: {q.q!r} (doc {q.doc}, key {q.key!r})" for q in self.misses]
        return "\n".join(lines)


def read_questions(path: str) -> list[Question]:
    questions = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise GlmtuneError(f"--questions {path}: {error.strerror or error}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise GlmtuneError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(record, dict) or not all(isinstance(record.get(k), str) and record[k] for k in ("q", "doc", "key")):
            raise GlmtuneError(f"{path}:{number}: needs non-empty string fields q, doc and key")
        questions.append(Question(record["q"], record["doc"], record["key"]))
    if not questions:
        raise GlmtuneError(f"--questions {path}: no questions")
    return questions


def _normal(text: str) -> str:
    """Compared without spacing and case, since splitting and extraction may change line breaks."""
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def is_hit(passage: Passage, question: Question) -> bool:
    source = Path(passage.chunk.source).as_posix()
    doc = Path(question.doc).as_posix()
    same_doc = source == doc or source.endswith("/" + doc) or Path(source).name == doc
    return same_doc and _normal(question.key) in _normal(passage.chunk.text)


def evaluate(kb: KnowledgeBase, questions: list[Question], top_k: int = 3, retriever: str = "auto") -> EvalReport:
    report = EvalReport(top_k, kb.resolve(retriever), {k: 0 for k in sorted({1, top_k})}, total=len(questions))
    for question in questions:
        passages = kb.search(question.q, top_k, retriever)
        first = next((rank for rank, p in enumerate(passages, 1) if is_hit(p, question)), None)
        for k in report.hits_at:
            report.hits_at[k] += first is not None and first <= k
        if first is None:
            report.misses.append(question)
    return report
