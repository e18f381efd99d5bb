"""Model loading: native ChatGLM for original ChatGLM-6B/2/3 folders, transformers for every other decoder."""

from glmtune.models.loading import load_model, load_tokenizer, resolve_model_source

__all__ = ["load_model", "load_tokenizer", "resolve_model_source"]
