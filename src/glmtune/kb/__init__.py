"""Local knowledge QA: index your documents (``glmtune kb build``), search them, and let chat/web/serve answer
from them with sources (``--kb DIR``). The pipeline follows Langchain-Chatchat: load, split with a Chinese-aware
recursive splitter, retrieve the top k chunks, and fill its prompt.

Modules: ``loaders`` (files to text), ``splitter`` (text to chunks), ``lexical`` (BM25 on jieba tokens),
``dense`` (sentence-transformers + FAISS), ``index`` (the folder on disk, incremental updates, retrieval),
``qa`` (prompt, score threshold, sources), ``evaluate`` (hit@k).
"""

from glmtune.errors import GlmtuneError


def require(module: str, package: str | None = None):
    """Import an optional dependency of the kb extra, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise GlmtuneError(f"the knowledge base needs {package or module}: pip install 'glmtune[kb]'") from None
