"""Before/after comparison of fine-tuning runs, like the seed tutorial's 示例1/示例2 section.

One table of metrics with a column per run (for example "base", "lora", "ptuning"), then each
example's Input, Label and every run's output. Written as Markdown and as a self-contained HTML
page by `write_comparison`, or formatted as plain text for a terminal by `format_comparison_text`.
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from glmtune.eval.metrics import METRIC_NAMES

_THROUGHPUT_ROW = "samples/s"
_MISSING = "—"


@dataclass(frozen=True)
class RunResult:
    """One model variant evaluated on the comparison examples.

    Attributes:
        name: Column heading, such as "base", "lora" or "ptuning". Must be unique within a report.
        metrics: Scores such as `compute_metrics` returns ("rouge-1", "rouge-2", "rouge-l", "bleu-4");
            other keys are shown after those.
        outputs: The run's generated text for each example, in the same order as the examples.
        samples_per_second: Generation throughput, shown as a "samples/s" row when given.
    """

    name: str
    metrics: Mapping[str, float]
    outputs: Sequence[str]
    samples_per_second: float | None = None


@dataclass(frozen=True)
class ComparisonExample:
    """One example shown in the comparison: the prompt given to every run and the reference answer."""

    prompt: str
    label: str


def write_comparison(
    output_dir: str | Path,
    runs: Sequence[RunResult],
    examples: Sequence[ComparisonExample],
    *,
    title: str = "Fine-tuning comparison",
) -> tuple[Path, Path]:
    """Write `compare.md` and `compare.html` with the runs' metrics side by side and their outputs.

    Args:
        output_dir: Folder to write into; created if missing. Existing files of the same names are replaced.
        runs: The runs to compare, in column order.
        examples: The examples whose outputs to show; `runs[i].outputs[j]` answers `examples[j]`.
        title: Heading of both documents.

    Returns:
        The paths of the Markdown and the HTML file.

    Raises:
        ValueError: If there are no runs, two runs share a name, or a run's number of outputs
            differs from the number of examples.
    """
    markdown = format_comparison_markdown(runs, examples, title=title)
    page = format_comparison_html(runs, examples, title=title)
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    markdown_path = directory / "compare.md"
    html_path = directory / "compare.html"
    markdown_path.write_text(markdown, encoding="utf-8")
    html_path.write_text(page, encoding="utf-8")
    return markdown_path, html_path


def format_comparison_markdown(
    runs: Sequence[RunResult],
    examples: Sequence[ComparisonExample],
    *,
    title: str = "Fine-tuning comparison",
) -> str:
    """The comparison as Markdown: a metrics table, then each example in a code block.

    Example texts go in fenced code blocks, so characters that mean something in Markdown
    (ADGEN prompts are full of `#` and `*`) show as written. The best value of each score row is bold.

    Args and Raises: as for `write_comparison`.
    """
    _check(runs, examples)
    names = [run.name for run in runs]
    lines = [f"# {title}", "", "## Metrics", ""]
    lines.append("| metric | " + " | ".join(_markdown_cell(name) for name in names) + " |")
    lines.append("|---|" + "---:|" * len(runs))
    for row_name, cells in _metric_rows(runs):
        shown = [f"**{text}**" if best else text for text, best in cells]
        lines.append(f"| {_markdown_cell(row_name)} | " + " | ".join(shown) + " |")
    if examples:
        lines += ["", "## Examples"]
    for number, block in enumerate(_example_blocks(runs, examples), start=1):
        fence = "`" * max(3, _longest_backtick_run(block) + 1)
        lines += ["", f"### Example {number}", "", fence, block, fence]
    return "\n".join(lines) + "\n"


def format_comparison_html(
    runs: Sequence[RunResult],
    examples: Sequence[ComparisonExample],
    *,
    title: str = "Fine-tuning comparison",
) -> str:
    """The comparison as one self-contained UTF-8 HTML page (inline CSS, no scripts, all text escaped).

    Args and Raises: as for `write_comparison`.
    """
    _check(runs, examples)
    head = "".join(f"<th>{html.escape(run.name)}</th>" for run in runs)
    body = []
    for row_name, cells in _metric_rows(runs):
        tds = "".join(
            f'<td class="best">{html.escape(text)}</td>' if best else f"<td>{html.escape(text)}</td>"
            for text, best in cells
        )
        body.append(f"<tr><th>{html.escape(row_name)}</th>{tds}</tr>")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Metrics</h2>",
        f'<table class="metrics"><thead><tr><th>metric</th>{head}</tr></thead>',
        "<tbody>",
        *body,
        "</tbody></table>",
    ]
    if examples:
        parts.append("<h2>Examples</h2>")
    for index in range(len(examples)):
        dl = "".join(
            f"<dt>{html.escape(name)}</dt><dd>{html.escape(text)}</dd>"
            for name, text in _example_fields(runs, examples, index)
        )
        parts.append(f'<section class="example"><h3>Example {index + 1}</h3><dl>{dl}</dl></section>')
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def format_comparison_text(
    runs: Sequence[RunResult],
    examples: Sequence[ComparisonExample],
    *,
    max_examples: int | None = None,
) -> str:
    """The comparison as plain text for a terminal: an aligned metrics table, then the examples.

    Columns are aligned by display width, so Chinese run names line up too.

    Args:
        runs: The runs to compare, in column order.
        examples: The examples whose outputs to show; `runs[i].outputs[j]` answers `examples[j]`.
        max_examples: Show only the first this many examples (all when None).

    Raises:
        ValueError: As for `write_comparison`.
    """
    _check(runs, examples)
    table = [["metric", *(run.name for run in runs)]]
    table += [[row_name, *(text for text, _ in cells)] for row_name, cells in _metric_rows(runs)]
    widths = [max(_display_width(row[column]) for row in table) for column in range(len(table[0]))]
    lines = [
        "  ".join(_pad(cell, width, align_left=column == 0) for column, (cell, width) in enumerate(zip(row, widths)))
        for row in table
    ]
    shown = examples if max_examples is None else examples[:max_examples]
    for number, block in enumerate(_example_blocks(runs, shown), start=1):
        lines += ["", f"Example {number}", _indent(block, "    ")]
    return "\n".join(lines) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", "PingFang SC", "Microsoft YaHei", sans-serif;
       max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.6; color: #222; }
table.metrics { border-collapse: collapse; margin-bottom: 1.5rem; }
table.metrics th, table.metrics td { border: 1px solid #ccc; padding: .3rem .8rem; }
table.metrics td { text-align: right; font-variant-numeric: tabular-nums; }
table.metrics thead th { background: #f3f3f3; }
td.best { font-weight: bold; background: #eef7ee; }
section.example { border-top: 1px solid #ddd; padding-top: .5rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: .3rem 1rem; }
dt { font-weight: bold; }
dd { margin: 0; white-space: pre-wrap; overflow-wrap: anywhere; }
""".strip()


def _check(runs: Sequence[RunResult], examples: Sequence[ComparisonExample]) -> None:
    if not runs:
        raise ValueError("a comparison needs at least one run")
    names = [run.name for run in runs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"run names must be unique, repeated: {', '.join(duplicates)}")
    for run in runs:
        if len(run.outputs) != len(examples):
            raise ValueError(f"run {run.name!r} has {len(run.outputs)} outputs for {len(examples)} examples")


def _metric_rows(runs: Sequence[RunResult]) -> list[tuple[str, list[tuple[str, bool]]]]:
    """(row name, [(cell text, is the row's best)] per run) for each metric, then samples/s if any run has it.

    Best is only marked for the scores and throughput, where higher is better, and only where the runs' values differ.
    """
    names = dict.fromkeys([*METRIC_NAMES, *(name for run in runs for name in run.metrics)])
    rows = [(name, [run.metrics.get(name) for run in runs]) for name in names]
    if any(run.samples_per_second is not None for run in runs):
        rows.append((_THROUGHPUT_ROW, [run.samples_per_second for run in runs]))
    higher_is_better = {*METRIC_NAMES, _THROUGHPUT_ROW}
    formatted = []
    for name, values in rows:
        present = [value for value in values if value is not None]
        best = max(present) if name in higher_is_better and len(set(present)) > 1 else None
        cells = [(_MISSING, False) if value is None else (f"{value:.2f}", value == best) for value in values]
        formatted.append((name, cells))
    return formatted


def _example_fields(
    runs: Sequence[RunResult], examples: Sequence[ComparisonExample], index: int
) -> list[tuple[str, str]]:
    """Input, Label and 'Output [run]' of one example, as the seed tutorial lists them."""
    example = examples[index]
    fields = [("Input", example.prompt), ("Label", example.label)]
    return fields + [(f"Output [{run.name}]", run.outputs[index]) for run in runs]


def _example_blocks(runs: Sequence[RunResult], examples: Sequence[ComparisonExample]) -> list[str]:
    """Each example as 'Input: …', 'Label: …', 'Output [run]: …' lines."""
    return [
        "\n".join(_labelled(name, text) for name, text in _example_fields(runs, examples, index))
        for index in range(len(examples))
    ]


def _labelled(name: str, text: str) -> str:
    """'name: text', with the text's later lines indented under its first, so multi-line outputs stay readable."""
    prefix = f"{name}: "
    return prefix + text.replace("\n", "\n" + " " * _display_width(prefix))


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.split("\n"))


def _markdown_cell(text: str) -> str:
    return text.replace("|", r"\|").replace("\n", " ")


def _longest_backtick_run(text: str) -> int:
    return max((len(run) for run in re.findall(r"`+", text)), default=0)


def _display_width(text: str) -> int:
    """Terminal columns: CJK and other wide characters take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _pad(text: str, width: int, *, align_left: bool) -> str:
    padding = " " * (width - _display_width(text))
    return text + padding if align_left else padding + text
