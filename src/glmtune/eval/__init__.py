"""Evaluation: THUDM's ROUGE/BLEU-4 metrics, batched generation and before/after reports.

Names are imported on first use (PEP 562), so generation works where jieba, rouge-chinese and nltk
are not installed, as on a bare GPU machine running the benchmarks.
"""

import importlib

_EXPORTS = {
    "METRIC_NAMES": "glmtune.eval.metrics",
    "compute_metrics": "glmtune.eval.metrics",
    "per_example_scores": "glmtune.eval.metrics",
    "ComparisonExample": "glmtune.eval.report",
    "RunResult": "glmtune.eval.report",
    "format_comparison_text": "glmtune.eval.report",
    "write_comparison": "glmtune.eval.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'glmtune.eval' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
