#!/usr/bin/env python3
"""Recompute predict_results.json from generated_predictions.txt with THUDM's compute_metrics, written out
here independently of glmtune (the loop of ChatGLM-6B ptuning/main.py), and compare.

Usage: python benchmarks/recompute_metrics.py OUTPUT_DIR [OUTPUT_DIR ...]
"""

import json
import sys
from pathlib import Path

import jieba
import numpy as np
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge


def thudm_compute_metrics(decoded_preds, decoded_labels):
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(decoded_preds, decoded_labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        rouge = Rouge()
        try:
            scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
            result = scores[0]
        except ValueError:  # empty hypothesis: THUDM's loop would crash here; glmtune scores 0
            result = {"rouge-1": {"f": 0.0}, "rouge-2": {"f": 0.0}, "rouge-l": {"f": 0.0}}
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    return {k: float(np.mean(v)) for k, v in score_dict.items()}


def main() -> None:
    worst = 0.0
    for folder in map(Path, sys.argv[1:]):
        rows = [json.loads(line) for line in (folder / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()]
        recomputed = thudm_compute_metrics([r["predict"] for r in rows], [r["labels"] for r in rows])
        reported = json.loads((folder / "predict_results.json").read_text())
        for key, value in recomputed.items():
            difference = abs(reported[f"predict_{key}"] - value)
            worst = max(worst, difference)
            print(f"{folder.name:>14} {key:8} glmtune {reported[f'predict_{key}']:9.4f}  THUDM {value:9.4f}  |diff| {difference:.2e}")
    print(f"largest difference: {worst:.2e}")
    sys.exit(0 if worst < 1e-3 else 1)


if __name__ == "__main__":
    main()
