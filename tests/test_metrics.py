"""glmtune.eval.metrics against hand-derived values and against THUDM's compute_metrics loop."""

from __future__ import annotations

import math
import subprocess
import sys

import jieba
import numpy as np
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from glmtune.eval.metrics import METRIC_NAMES, compute_metrics, per_example_scores

ZEROS = {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 0.0}


def assert_scores(actual: dict[str, float], expected: dict[str, float]) -> None:
    assert list(actual) == list(METRIC_NAMES)
    assert all(type(value) is float for value in actual.values())
    assert actual == pytest.approx(expected, abs=1e-3)


def test_identical_texts_score_100():
    # Four words and seven characters: every n-gram order up to 4 exists and matches. rouge_chinese's
    # F is 2PR / (P + R + 1e-8) = 2 / 2.00000001 = 0.999999995, which rounds to 100.0.
    text = "这件衣服很好看"
    assert compute_metrics([text], [text]) == {"rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "bleu-4": 100.0}


def test_identical_one_word_text_is_not_100_everywhere():
    # jieba keeps 你好 as one word, so neither side has a bigram: ROUGE-2 counts are 0, P = R = 0, F = 0.
    # BLEU on characters 你 好: p1 = 2/2, p2 = 1/1; no 3- or 4-grams, and nltk uses a denominator of
    # max(1, 0) = 1, so p3 = 0/1 and p4 = 0/1. method3 turns the k-th zero into 1 / (2^k * denominator):
    # p3 = 1/2, p4 = 1/4. Equal lengths: BP = exp(1 - 2/2) = 1.
    # BLEU = (1 * 1 * 1/2 * 1/4) ** (1/4) = 8 ** -0.25 = 0.594604 -> 59.4604.
    assert list(jieba.cut("你好")) == ["你好"]
    assert_scores(
        compute_metrics(["你好"], ["你好"]),
        {"rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0, "bleu-4": 59.4604},
    )


def test_disjoint_texts_score_0():
    # No word and no character in common. ROUGE: overlap 0, F = 0 / (0 + 1e-8) = 0.
    # BLEU: nltk returns 0 as soon as no unigram matches, *before* smoothing, so method3 never
    # replaces the zero precisions with 1/2, 1/4, ...: the score is exactly 0.
    assert compute_metrics(["你好"], ["再见"]) == ZEROS


def test_hand_worked_pair_with_smoothing():
    # prediction 我不喜欢吃香蕉, reference 我喜欢吃苹果.
    #
    # ROUGE, on jieba words (rouge_chinese counts each distinct n-gram once):
    #   hypothesis 我 / 不 / 喜欢 / 吃 / 香蕉 (5), reference 我 / 喜欢 / 吃 / 苹果 (4)
    #   ROUGE-1: overlap {我, 喜欢, 吃} = 3; P = 3/5, R = 3/4; F = 2PR/(P+R) = 0.9/1.35 = 2/3 -> 66.6667
    #   ROUGE-2: hypothesis {我不, 不喜欢, 喜欢吃, 吃香蕉} (4), reference {我喜欢, 喜欢吃, 吃苹果} (3),
    #            overlap {喜欢吃} = 1; P = 1/4, R = 1/3; F = (2/12)/(7/12) = 2/7 = 0.285714 -> 28.5714
    #   ROUGE-L: LCS(我 不 喜欢 吃 香蕉, 我 喜欢 吃 苹果) = 我 喜欢 吃 = 3; P = 3/5, R = 3/4 -> 66.6667
    #   (the 1e-8 in rouge_chinese's denominator moves these by less than 1e-7)
    #
    # BLEU-4, on characters: hypothesis 我不喜欢吃香蕉 (7), reference 我喜欢吃苹果 (6)
    #   p1: 我 不 喜 欢 吃 香 蕉 -> 我 喜 欢 吃 match: 4/7
    #   p2: 我不 不喜 喜欢 欢吃 吃香 香蕉 -> 喜欢 欢吃 match: 2/6
    #   p3: 我不喜 不喜欢 喜欢吃 欢吃香 吃香蕉 -> 喜欢吃 matches: 1/5
    #   p4: 我不喜欢 不喜欢吃 喜欢吃香 欢吃香蕉 vs 我喜欢吃 喜欢吃苹 欢吃苹果 -> 0/4;
    #       method3, first zero: 1 / (2^1 * 4) = 1/8
    #   BP: hypothesis longer than reference (7 > 6) -> 1
    #   BLEU = (4/7 * 2/6 * 1/5 * 1/8) ** (1/4) = (1/210) ** (1/4) = 1 / 3.80676 = 0.262691 -> 26.2691
    assert list(jieba.cut("我不喜欢吃香蕉")) == ["我", "不", "喜欢", "吃", "香蕉"]
    assert list(jieba.cut("我喜欢吃苹果")) == ["我", "喜欢", "吃", "苹果"]
    assert math.isclose(210**-0.25 * 100, 26.2691, abs_tol=1e-4)
    assert_scores(
        compute_metrics(["我不喜欢吃香蕉"], ["我喜欢吃苹果"]),
        {"rouge-1": 66.6667, "rouge-2": 28.5714, "rouge-l": 66.6667, "bleu-4": 26.2691},
    )


def test_hand_worked_pair_with_brevity_penalty():
    # prediction 我爱北京, reference 我爱北京天安门.
    #
    # ROUGE: hypothesis 我 / 爱 / 北京 (3), reference 我 / 爱 / 北京 / 天安门 (4)
    #   ROUGE-1: overlap 3; P = 1, R = 3/4; F = 1.5/1.75 = 6/7 = 0.857143 -> 85.7143
    #   ROUGE-2: {我爱, 爱北京} vs {我爱, 爱北京, 北京天安门}: overlap 2; P = 1, R = 2/3; F = (4/3)/(5/3) = 0.8 -> 80.0
    #   ROUGE-L: LCS = 我 爱 北京 = 3; P = 1, R = 3/4 -> 85.7143
    #
    # BLEU-4: 我爱北京 (c = 4) is a prefix of 我爱北京天安门 (r = 7), so p1..p4 = 4/4, 3/3, 2/2, 1/1 = 1
    #   and no smoothing applies. BP = exp(1 - r/c) = exp(1 - 7/4) = exp(-0.75) = 0.472367 -> 47.2367
    assert list(jieba.cut("我爱北京")) == ["我", "爱", "北京"]
    assert list(jieba.cut("我爱北京天安门")) == ["我", "爱", "北京", "天安门"]
    assert math.isclose(math.exp(-0.75) * 100, 47.2367, abs_tol=1e-4)
    assert_scores(
        compute_metrics(["我爱北京"], ["我爱北京天安门"]),
        {"rouge-1": 85.7143, "rouge-2": 80.0, "rouge-l": 85.7143, "bleu-4": 47.2367},
    )


def test_mean_over_examples():
    # The two hand-worked pairs above; each score is rounded to 4 decimals before the mean.
    result = compute_metrics(["我不喜欢吃香蕉", "我爱北京"], ["我喜欢吃苹果", "我爱北京天安门"])
    assert result == pytest.approx(
        {
            "rouge-1": (66.6667 + 85.7143) / 2,
            "rouge-2": (28.5714 + 80.0) / 2,
            "rouge-l": (66.6667 + 85.7143) / 2,
            "bleu-4": (26.2691 + 47.2367) / 2,
        },
        abs=1e-9,
    )


def test_per_example_scores_are_the_rounded_pair_scores():
    scores = per_example_scores(["我不喜欢吃香蕉", "我爱北京"], ["我喜欢吃苹果", "我爱北京天安门"])
    assert scores == [
        {"rouge-1": 66.6667, "rouge-2": 28.5714, "rouge-l": 66.6667, "bleu-4": 26.2691},
        {"rouge-1": 85.7143, "rouge-2": 80.0, "rouge-l": 85.7143, "bleu-4": 47.2367},
    ]
    assert per_example_scores([], []) == []


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [("", "你好"), ("你好", ""), ("", ""), ("   ", "你好"), ("\n\t", "你好")],
)
def test_blank_text_scores_0_instead_of_crashing(prediction, reference):
    # rouge_chinese raises "Hypothesis is empty" / "Reference is empty" here; nltk gives 0 because
    # no character of the prediction occurs in the reference (BP is 0 for an empty prediction anyway).
    with pytest.raises(ValueError, match="is empty"):
        Rouge().get_scores(" ".join(jieba.cut(prediction)), " ".join(jieba.cut(reference)))
    assert compute_metrics([prediction], [reference]) == ZEROS


def test_whitespace_prediction_keeps_nltk_bleu():
    # ROUGE is 0 (rouge_chinese cannot score it). BLEU is nltk's, on characters: hypothesis [" "] (c = 1),
    # reference ["a", " ", "b"] (r = 3). p1 = 1/1; p2..p4 have no n-grams, denominator max(1, 0) = 1,
    # so method3 gives 1/2, 1/4, 1/8. BP = exp(1 - 3/1) = exp(-2).
    # BLEU = exp(-2) * (1 * 1/2 * 1/4 * 1/8) ** (1/4) = exp(-2) * 2 ** -1.5 = 0.135335 * 0.353553 = 0.047848
    assert math.isclose(math.exp(-2) * 2**-1.5 * 100, 4.7848, abs_tol=1e-4)
    assert_scores(compute_metrics([" "], ["a b"]), {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "bleu-4": 4.7848})


def thudm_compute_metrics(decoded_preds: list[str], decoded_labels: list[str]) -> dict[str, float]:
    """The scoring loop of THUDM ChatGLM-6B / ChatGLM2-6B ptuning/main.py, after decoding."""
    score_dict = {"rouge-1": [], "rouge-2": [], "rouge-l": [], "bleu-4": []}
    for pred, label in zip(decoded_preds, decoded_labels):
        hypothesis = list(jieba.cut(pred))
        reference = list(jieba.cut(label))
        rouge = Rouge()
        scores = rouge.get_scores(" ".join(hypothesis), " ".join(reference))
        result = scores[0]
        for k, v in result.items():
            score_dict[k].append(round(v["f"] * 100, 4))
        bleu_score = sentence_bleu([list(label)], list(pred), smoothing_function=SmoothingFunction().method3)
        score_dict["bleu-4"].append(round(bleu_score * 100, 4))
    for k, v in score_dict.items():
        score_dict[k] = float(np.mean(v))
    return score_dict


# Label and the outputs before/after fine-tuning from the seed tutorial's 示例1, plus pairs with repeated
# words, several sentences, English and short texts.
LABEL_1 = (
    "简约而不简单的牛仔外套,白色的衣身十分百搭。衣身多处有做旧破洞设计,打破单调乏味,增加一丝造型看点。"
    "衣身后背处有趣味刺绣装饰,丰富层次感,彰显别样时尚。"
)
BEFORE_1 = "这件上衣的材质是牛仔布,颜色是白色,风格是简约,图案是刺绣,衣样式是外套,衣款式是破洞。"
AFTER_1 = (
    "这是一款简约的牛仔外套,破洞设计,将牛仔布破洞,带来一种随意与个性。破洞的牛仔外套,展现出时尚气息,"
    "带来一种休闲感。同时,刺绣图案,让整件外套更加立体。"
)
CROSS_CHECK_PAIRS = [
    (BEFORE_1, LABEL_1),
    (AFTER_1, LABEL_1),
    ("好好好好好", "好"),
    ("今天天气很好！我们去公园散步吧？好的。", "今天天气不错，我们去学校上课。"),
    ("The model is fine-tuned with LoRA.", "The model was fine-tuned with P-Tuning v2."),
    ("连衣裙 显瘦 文艺", "文艺的连衣裙，显瘦又有型"),
    ("你", "你好"),
]


def test_matches_thudm_loop_exactly():
    predictions = [prediction for prediction, _ in CROSS_CHECK_PAIRS]
    references = [reference for _, reference in CROSS_CHECK_PAIRS]
    assert compute_metrics(predictions, references) == thudm_compute_metrics(predictions, references)
    for prediction, reference in CROSS_CHECK_PAIRS:
        assert compute_metrics([prediction], [reference]) == thudm_compute_metrics([prediction], [reference])


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="at least one"):
        compute_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        compute_metrics(["a", "b"], ["a"])
    with pytest.raises(TypeError, match="single str"):
        compute_metrics("你好", "你好")


def test_first_use_prints_nothing():
    # A fresh interpreter, so jieba really loads its dictionary here.
    code = "from glmtune.eval.metrics import compute_metrics; print(compute_metrics(['你好'], ['你好'])['rouge-1'])"
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert finished.stdout == "100.0\n"
    assert finished.stderr == ""
