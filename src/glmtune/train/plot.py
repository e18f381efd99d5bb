"""``training_loss.png``: the training loss per logging step, and the eval loss when there is one."""

from __future__ import annotations

from pathlib import Path


def plot_loss(history: list[dict], path: Path) -> Path | None:
    """Draws ``history`` (entries ``{"step", "loss"}`` / ``{"step", "eval_loss"}``); None when nothing was logged."""
    # Figure without pyplot: no GUI backend and no global figure state in a training process.
    from matplotlib.figure import Figure

    train = [(e["step"], e["loss"]) for e in history if "loss" in e]
    evaluation = [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e]
    if not train and not evaluation:
        return None
    figure = Figure(figsize=(6.4, 4.0), layout="tight")
    axes = figure.subplots()
    for points, label, style in ((train, "train loss", ".-"), (evaluation, "eval loss", "o--")):
        if points:
            axes.plot(*zip(*points), style, label=label)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(f"training loss of {path.parent.name}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100)
    return path
