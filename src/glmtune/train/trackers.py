"""Where training metrics go: always ``train_log.jsonl``, plus each tracker ``--report_to`` names, through that
library's own client. A tracker's package is imported only when it is asked for; a missing one is a one-line
error naming the extra that installs it."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from glmtune.errors import GlmtuneError

# Tracker -> the package it imports (each is also the name of glmtune's extra).
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "swanlab": "swanlab"}


def tracker_names(report_to: str) -> list[str]:
    """``--report_to`` as a list, checked: names known and packages installed."""
    names = [n.strip().lower() for n in str(report_to).split(",") if n.strip()]
    if names in ([], ["none"]):
        return []
    for name in names:
        if name not in TRACKERS:
            raise GlmtuneError(f"--report_to {name}: not one of none, {', '.join(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise GlmtuneError(f"--report_to {name} needs the {TRACKERS[name]} package: pip install 'glmtune[{name}]'")
    return names


class Trackers:
    """``log(step, values)`` to every destination; ``history`` keeps what was logged (HF's ``log_history``)."""

    def __init__(self, output_dir: Path, report_to: str, append: bool, run_config: dict | None = None,
                 history: list[dict] | None = None):
        names = tracker_names(report_to)
        self.history = list(history or [])
        self.jsonl = open(output_dir / "train_log.jsonl", "a" if append else "w", encoding="utf-8")
        self.clients = [_CLIENTS[name](output_dir, run_config or {}) for name in names]

    def log(self, step: int, values: dict) -> None:
        entry = {"step": step, **values}
        self.history.append(entry)
        self.jsonl.write(json.dumps(entry) + "\n")
        self.jsonl.flush()
        for client in self.clients:
            client.log(step, values)

    def close(self) -> None:
        self.jsonl.close()
        for client in self.clients:
            client.close()


class _TensorBoard:
    def __init__(self, output_dir: Path, run_config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "runs"))

    def log(self, step: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """W&B's own settings apply: WANDB_PROJECT (default glmtune), WANDB_MODE=offline, WANDB_DIR (default OUTPUT_DIR)."""

    def __init__(self, output_dir: Path, run_config: dict):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "glmtune"), name=output_dir.name,
                              dir=os.environ.get("WANDB_DIR", str(output_dir)), config=run_config)

    def log(self, step: int, values: dict) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    """MLflow's own settings apply: MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME."""

    def __init__(self, output_dir: Path, run_config: dict):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=output_dir.name)
        # MLflow keeps parameters as strings of at most 6000 characters.
        mlflow.log_params({k: str(v)[:6000] for k, v in run_config.items()})

    def log(self, step: int, values: dict) -> None:
        self.mlflow.log_metrics(values, step=step, run_id=self.run.info.run_id)

    def close(self) -> None:
        self.mlflow.end_run()


class _Swanlab:
    """SwanLab's own settings apply (SWANLAB_MODE=offline|local|cloud, SWANLAB_PROJECT)."""

    def __init__(self, output_dir: Path, run_config: dict):
        import swanlab

        self.swanlab = swanlab
        swanlab.init(project=os.environ.get("SWANLAB_PROJECT", "glmtune"), experiment_name=output_dir.name,
                     config=run_config, logdir=str(output_dir / "swanlog"))

    def log(self, step: int, values: dict) -> None:
        self.swanlab.log(values, step=step)

    def close(self) -> None:
        self.swanlab.finish()


_CLIENTS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "mlflow": _Mlflow, "swanlab": _Swanlab}
