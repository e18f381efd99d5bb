"""Answering from the knowledge base: retrieve for each user turn, fill the prompt, list the sources, and
refuse without calling the model when no passage passes the score threshold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.kb.index import KnowledgeBase, Passage

NO_ANSWER = "根据已知信息无法回答该问题"
# Langchain-Chatchat's knowledge-base prompt ("knowledge_base_chat", "default"), with {context} and {question}.
DEFAULT_PROMPT = (
    "<指令>根据已知信息，简洁和专业的来回答问题。如果无法从中得到答案，请说 “根据已知信息无法回答该问题”，"
    "不允许在答案中添加编造成分，答案请使用中文。 </指令>\n"
    "<已知信息>{context}</已知信息>\n"
    "<问题>{question}</问题>\n"
)
PLACEHOLDERS = ("{context}", "{question}")


def read_prompt(path: str | None) -> str:
    if path is None:
        return DEFAULT_PROMPT
    try:
        template = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise GlmtuneError(f"--kb_prompt {path}: {error.strerror or error}") from None
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise GlmtuneError(f"--kb_prompt {path}: the template lacks {' and '.join(missing)}")
    return template


@dataclass
class Grounding:
    """What retrieval gives one question: the passages that passed, and the prompt to send (None: refuse)."""

    question: str
    passages: list[Passage]
    prompt: str | None

    def sources(self) -> list[dict]:
        return [passage.to_json() for passage in self.passages]

    def sources_text(self) -> str:
        if not self.passages:
            return "Sources: none above the score threshold"
        lines = [f"[{n}] {p.chunk.source} ({p.chunk.position()}, score {p.score:.3f})"
                 for n, p in enumerate(self.passages, 1)]
        return "Sources:\n" + "\n".join(lines)


class KnowledgeQA:
    def __init__(self, kb: KnowledgeBase, top_k: int = 3, score_threshold: float = 0.0,
                 template: str = DEFAULT_PROMPT, retriever: str = "auto"):
        if top_k < 1:
            raise GlmtuneError(f"--kb_top_k must be at least 1, got {top_k}")
        kb.resolve(retriever)  # fails now, not on the first question
        self.kb, self.top_k, self.score_threshold = kb, top_k, score_threshold
        self.template, self.retriever = template, retriever

    @classmethod
    def from_config(cls, config: GlmtuneConfig) -> KnowledgeQA | None:
        """The knowledge base that ``--kb`` names, or None without it."""
        if not config.kb:
            return None
        return cls(KnowledgeBase.load(config.kb), config.kb_top_k, config.kb_score_threshold,
                   read_prompt(config.kb_prompt), config.kb_retriever)

    def ground(self, question: str) -> Grounding:
        passages = [p for p in self.kb.search(question, self.top_k, self.retriever)
                    if p.relevance > self.score_threshold]
        if not passages:
            return Grounding(question, [], None)
        context = "\n\n".join(p.chunk.text for p in passages)
        # str.replace, not str.format: documents are full of braces.
        prompt = self.template.replace("{context}", context).replace("{question}", question)
        return Grounding(question, passages, prompt)


def embedder_for(config: GlmtuneConfig, knowledge: KnowledgeQA | None):
    """The model behind /v1/embeddings: --embedding_model, else the knowledge base's own; None without either."""
    from glmtune.kb.dense import load_embedder

    if config.embedding_model:
        return load_embedder(config.embedding_model)
    return knowledge.kb.embedder if knowledge else None
