"""glmtune.eval.report: compare.md / compare.html / terminal text of runs side by side."""

from __future__ import annotations

import unicodedata

import pytest

from glmtune.eval.report import (
    ComparisonExample,
    RunResult,
    format_comparison_markdown,
    format_comparison_text,
    write_comparison,
)

EXAMPLES = [
    ComparisonExample(prompt="类型#上衣*材质#牛仔布*颜色#白色", label="简约而不简单的牛仔外套,白色的衣身十分百搭。"),
    ComparisonExample(prompt="<script>alert('x')</script>", label="A & B"),
]
BASE = RunResult(
    name="base",
    metrics={"rouge-1": 12.3456, "rouge-2": 1.5, "rouge-l": 10.0, "bleu-4": 3.25},
    outputs=["这件上衣的材质是牛仔布", "<b>bold</b>"],
    samples_per_second=4.5,
)
LORA = RunResult(
    name="lora",
    metrics={"rouge-1": 30.0, "rouge-2": 7.891, "rouge-l": 25.5, "bleu-4": 8.0},
    outputs=["这是一款简约的牛仔外套", "first line\nsecond line"],
    samples_per_second=3.0,
)
RUNS = [BASE, LORA]


def test_writes_both_files(tmp_path):
    output_dir = tmp_path / "new" / "folder"
    markdown_path, html_path = write_comparison(output_dir, RUNS, EXAMPLES)
    assert (markdown_path, html_path) == (output_dir / "compare.md", output_dir / "compare.html")
    markdown = markdown_path.read_text(encoding="utf-8")
    page = html_path.read_text(encoding="utf-8")
    for text in (markdown, page):
        for value in ("12.35", "1.50", "10.00", "3.25", "30.00", "7.89", "25.50", "8.00", "4.50", "3.00"):
            assert value in text
        for row in ("rouge-1", "rouge-2", "rouge-l", "bleu-4", "samples/s"):
            assert row in text
        for label in ("Input", "Label", "Output [base]", "Output [lora]"):
            assert label in text
        for chinese in ("类型#上衣*材质#牛仔布*颜色#白色", "简约而不简单的牛仔外套,白色的衣身十分百搭。", "这是一款简约的牛仔外套"):
            assert chinese in text


def test_markdown_layout():
    markdown = format_comparison_markdown(RUNS, EXAMPLES, title="ADGEN")
    assert markdown.startswith("# ADGEN\n")
    assert "| metric | base | lora |" in markdown
    # The best run of each row is bold: lora for the scores, base for throughput.
    assert "| rouge-1 | 12.35 | **30.00** |" in markdown
    assert "| samples/s | **4.50** | 3.00 |" in markdown
    # Example texts are in code blocks, verbatim: '#' and '*' must not turn into headings or emphasis.
    assert "```\nInput: 类型#上衣*材质#牛仔布*颜色#白色\nLabel: 简约而不简单的牛仔外套,白色的衣身十分百搭。\n" in markdown
    assert "Input: <script>alert('x')</script>" in markdown
    # A multi-line output keeps its later lines under the first.
    assert "Output [lora]: first line\n               second line\n```" in markdown


def test_markdown_fence_outlasts_backticks_in_text():
    run = RunResult(name="base", metrics={}, outputs=["use ```python``` blocks"])
    markdown = format_comparison_markdown([run], [ComparisonExample(prompt="p", label="l")])
    assert "\n````\nInput: p\n" in markdown
    assert "blocks\n````\n" in markdown


def test_html_escapes_user_text(tmp_path):
    hostile = RunResult(name="<i>run</i>", metrics={"rouge-1": 1.0}, outputs=["<script>steal()</script>", "x"])
    _, html_path = write_comparison(tmp_path, [hostile], EXAMPLES, title="<title> & co")
    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert "&lt;script&gt;steal()&lt;/script&gt;" in page
    assert "A &amp; B" in page
    assert "<th>&lt;i&gt;run&lt;/i&gt;</th>" in page
    assert "Output [&lt;i&gt;run&lt;/i&gt;]" in page
    assert "<h1>&lt;title&gt; &amp; co</h1>" in page


def test_html_is_self_contained(tmp_path):
    _, html_path = write_comparison(tmp_path, RUNS, EXAMPLES)
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    assert '<meta charset="utf-8">' in page
    assert "<style>" in page
    assert "http://" not in page and "https://" not in page
    assert '<td class="best">30.00</td>' in page


def test_missing_values_and_no_throughput():
    partial = RunResult(name="ptuning", metrics={"rouge-1": 5.0, "eval_loss": 2.5}, outputs=["a", "b"])
    without_speed = [RunResult(name=run.name, metrics=run.metrics, outputs=run.outputs) for run in RUNS]
    markdown = format_comparison_markdown([*without_speed, partial], EXAMPLES)
    assert "samples/s" not in markdown
    assert "| rouge-2 | 1.50 | **7.89** | — |" in markdown
    # Extra metrics follow the four scores; nothing is marked best where higher is not known to be better.
    assert "| eval_loss | — | — | 2.50 |" in markdown


def test_terminal_text():
    text = format_comparison_text(RUNS, EXAMPLES)
    lines = text.splitlines()
    assert lines[:6] == [
        "metric      base   lora",
        "rouge-1    12.35  30.00",
        "rouge-2     1.50   7.89",
        "rouge-l    10.00  25.50",
        "bleu-4      3.25   8.00",
        "samples/s   4.50   3.00",
    ]
    assert "Example 1\n    Input: 类型#上衣*材质#牛仔布*颜色#白色\n    Label: 简约而不简单的牛仔外套,白色的衣身十分百搭。\n" in text
    assert "    Output [lora]: first line\n                   second line\n" in text
    assert "Example 2" not in format_comparison_text(RUNS, EXAMPLES, max_examples=1)


def test_terminal_table_aligns_chinese_run_names():
    runs = [
        RunResult(name="微调前", metrics=BASE.metrics, outputs=BASE.outputs),
        RunResult(name="微调后", metrics=LORA.metrics, outputs=LORA.outputs),
    ]
    table = format_comparison_text(runs, EXAMPLES).split("\n\n")[0].splitlines()

    def width(line: str) -> int:
        return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in line)

    assert table[:2] == ["metric   微调前  微调后", "rouge-1   12.35   30.00"]
    assert len({width(line) for line in table}) == 1


def test_rejects_inconsistent_runs(tmp_path):
    output_dir = tmp_path / "report"
    with pytest.raises(ValueError, match="at least one run"):
        write_comparison(output_dir, [], EXAMPLES)
    with pytest.raises(ValueError, match="unique, repeated: base"):
        write_comparison(output_dir, [BASE, BASE], EXAMPLES)
    short = RunResult(name="short", metrics={}, outputs=["only one"])
    with pytest.raises(ValueError, match="'short' has 1 outputs for 2 examples"):
        format_comparison_text([short], EXAMPLES)
    assert not output_dir.exists()
