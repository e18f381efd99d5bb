"""ROUGE-1/2/L and BLEU-4 for generated text, computed exactly as THUDM ChatGLM-6B's `ptuning/main.py` does.

The seed's `compute_metrics` (also in ChatGLM2-6B) scores each prediction/label pair with
`rouge_chinese` on jieba words and nltk's sentence BLEU-4 on characters, rounds each score to
4 decimals after scaling to 0-100, and averages over the pairs. glmtune reports the same numbers so
that results can be compared with the seed's. It differs only on inputs the seed mishandles: blank
texts score 0 instead of crashing the run, and empty or unequal-length inputs raise ValueError
instead of giving NaN or silently dropping pairs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

METRIC_NAMES: tuple[str, ...] = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
"""The keys of `compute_metrics`' result, in the seed's order."""

_ROUGE_NAMES = METRIC_NAMES[:3]


def compute_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Score generated texts against references the way THUDM ChatGLM-6B's P-Tuning `main.py` does.

    For each pair (prediction, reference):

    - ROUGE-1, ROUGE-2 and ROUGE-L: both texts are segmented into words with `jieba.cut`, joined
      with spaces, and scored with `rouge_chinese.Rouge().get_scores`. The F-measure is kept,
      as `round(f * 100, 4)`. `rouge_chinese` counts distinct n-grams (a repeated n-gram counts once)
      and computes ROUGE-L on the longest common subsequence of words.
    - BLEU-4: `nltk.translate.bleu_score.sentence_bleu` on *characters*
      (`[list(reference)]`, `list(prediction)`), uniform weights over 1- to 4-grams, with
      `SmoothingFunction().method3` (NIST geometric smoothing), kept as `round(bleu * 100, 4)`.
      nltk returns 0 when no character matches, before any smoothing, and applies its brevity
      penalty when the prediction is shorter than the reference. A text shorter than 4 characters
      has no 4-grams to match, so it scores below 100 even against itself ("你好" gives 59.4604).

    Each metric is then the mean over pairs (`float(np.mean(...))`, as the seed computes it).

    Texts are used as given, not stripped, again as in the seed. Where the seed would crash, this
    function scores instead: an empty or whitespace-only prediction or reference (for which
    `rouge_chinese` raises "Hypothesis is empty" / "Reference is empty") gets ROUGE 0, and its
    BLEU is whatever nltk gives: 0 for an empty text, since nothing matches.

    jieba's dictionary is loaded on the first call, with its start-up log messages silenced
    (this sets jieba's logger to WARNING for the process).

    Args:
        predictions: Generated texts, one per example.
        references: Reference texts (labels), in the same order.

    Returns:
        `{"rouge-1": ..., "rouge-2": ..., "rouge-l": ..., "bleu-4": ...}`, each a float in [0, 100].

    Raises:
        TypeError: If either argument is a single `str` rather than a sequence of texts.
        ValueError: If the two sequences differ in length, or are empty (a mean over no examples
            is undefined; the seed would return NaN).

    Example:
        >>> compute_metrics(["我爱北京"], ["我爱北京天安门"])
        {'rouge-1': 85.7143, 'rouge-2': 80.0, 'rouge-l': 85.7143, 'bleu-4': 47.2367}
    """
    scores = per_example_scores(predictions, references)
    if not scores:
        raise ValueError("compute_metrics needs at least one prediction/reference pair")
    return {name: float(np.mean([example[name] for example in scores])) for name in METRIC_NAMES}


def per_example_scores(predictions: Sequence[str], references: Sequence[str]) -> list[dict[str, float]]:
    """Score each prediction/reference pair separately, with the same rules as `compute_metrics`.

    Args:
        predictions: Generated texts, one per example.
        references: Reference texts (labels), in the same order.

    Returns:
        One dict per pair, in input order, with the keys of `METRIC_NAMES`, each already rounded to
        4 decimals on the 0-100 scale. An empty input gives an empty list.

    Raises:
        TypeError: If either argument is a single `str` rather than a sequence of texts.
        ValueError: If the two sequences differ in length.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences of texts, not a single str")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} references")
    _initialize_jieba()
    rouge = Rouge()
    smoothing = SmoothingFunction().method3
    return [
        _score_pair(prediction, reference, rouge, smoothing)
        for prediction, reference in zip(predictions, references)
    ]


def _score_pair(
    prediction: str, reference: str, rouge: Rouge, smoothing: Callable[..., list]
) -> dict[str, float]:
    # rouge_chinese raises ValueError exactly when a text is empty or whitespace-only.
    if prediction.strip() and reference.strip():
        hypothesis_words = " ".join(jieba.cut(prediction))
        reference_words = " ".join(jieba.cut(reference))
        result = rouge.get_scores(hypothesis_words, reference_words)[0]
        scores = {name: round(result[name]["f"] * 100, 4) for name in _ROUGE_NAMES}
    else:
        scores = dict.fromkeys(_ROUGE_NAMES, 0.0)
    bleu = sentence_bleu([list(reference)], list(prediction), smoothing_function=smoothing)
    # nltk returns the int 0 when nothing matches.
    scores["bleu-4"] = float(round(bleu * 100, 4))
    return scores


@functools.cache
def _initialize_jieba() -> None:
    # jieba logs "Building prefix dict from the default dictionary ..." to stderr at DEBUG level
    # while it loads its dictionary; that is noise in a training log.
    jieba.setLogLevel(logging.WARNING)
    jieba.initialize()
