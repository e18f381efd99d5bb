"""Evaluation: THUDM's ROUGE/BLEU-4 metrics, batched generation and before/after reports."""

from glmtune.eval.metrics import METRIC_NAMES, compute_metrics, per_example_scores
from glmtune.eval.report import ComparisonExample, RunResult, format_comparison_text, write_comparison

__all__ = [
    "METRIC_NAMES",
    "ComparisonExample",
    "RunResult",
    "compute_metrics",
    "format_comparison_text",
    "per_example_scores",
    "write_comparison",
]
