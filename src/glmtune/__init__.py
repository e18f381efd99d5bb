"""glmtune: fine-tune, evaluate and serve ChatGLM-family and other open LLMs on your own data."""

__version__ = "0.1.0"
