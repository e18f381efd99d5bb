"""torchrun with 2 CPU processes (gloo) gives the losses of 1 process at the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_models import DEMO_TRAIN


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(model: Path, output: Path, method: str, processes: int, per_device_batch: int,
        extra: tuple[str, ...] = ()) -> tuple[list[float], str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                "--master_port", str(free_port()), "-m"] if processes > 1 else [sys.executable, "-m"]
    flags = ["glmtune", "train", "--model_name_or_path", str(model), "--train_file", str(DEMO_TRAIN),
             "--output_dir", str(output), "--finetuning_type", method, "--max_steps", "4", "--save_steps", "2",
             "--per_device_train_batch_size", str(per_device_batch), "--gradient_accumulation_steps", "2",
             "--learning_rate", "1e-2", "--lora_dropout", "0", "--logging_steps", "1", "--report_to", "none",
             "--max_train_samples", "40", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(launcher + flags, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    log = [json.loads(line) for line in (output / "train_log.jsonl").read_text().splitlines()]
    return [entry["loss"] for entry in log], result.stderr


@pytest.mark.parametrize("method", ["lora", "full"])
def test_two_processes_match_one(tiny_llama, tmp_path, method):
    single, _ = run(tiny_llama, tmp_path / "one", method, processes=1, per_device_batch=4)
    double, stderr = run(tiny_llama, tmp_path / "two", method, processes=2, per_device_batch=2)
    assert len(single) == len(double) == 4
    assert double == pytest.approx(single, abs=1e-5)
    assert stderr.count("saved to") == 1  # only rank 0 talks
    assert (tmp_path / "two" / "checkpoint-2" / "trainer_state.json").is_file()


def test_fsdp_matches_one_process_and_resumes_on_another_count(tiny_llama, tmp_path):
    single, _ = run(tiny_llama, tmp_path / "one", "full", processes=1, per_device_batch=4)
    sharded, _ = run(tiny_llama, tmp_path / "fsdp", "full", processes=2, per_device_batch=2, extra=("--fsdp",))
    assert sharded == pytest.approx(single, abs=1e-5)
    # The checkpoint holds full tensors: one process picks up where two sharded processes left off.
    resumed, _ = run(tiny_llama, tmp_path / "fsdp", "full", processes=1, per_device_batch=4,
                     extra=("--resume_from_checkpoint", str(tmp_path / "fsdp" / "checkpoint-2")))
    assert resumed[-2:] == pytest.approx(single[2:], abs=1e-5)
