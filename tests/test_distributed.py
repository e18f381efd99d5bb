"""torchrun with 2 CPU processes (gloo) gives the losses of 1 process at the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_fsdp_checkpoints_are_sharded_and_resume_on_any_count(tiny_llama, tmp_path):
    # A bf16 base: training upcasts to float32 (the same in every run), the final output goes back to bf16.
    bf16 = ("--torch_dtype", "bfloat16")
    single, _ = run(tiny_llama, tmp_path / "one", "full", processes=1, per_device_batch=4, extra=bf16)
    sharded, _ = run(tiny_llama, tmp_path / "fsdp", "full", processes=2, per_device_batch=2, extra=(*bf16, "--fsdp"))
    assert sharded == pytest.approx(single, abs=1e-5)
    checkpoint = tmp_path / "fsdp" / "checkpoint-2"
    # Each rank wrote its own shard with torch.distributed.checkpoint: nothing gathered to rank 0.
    assert (checkpoint / ".metadata").is_file() and len(list(checkpoint.glob("*.distcp"))) == 2
    assert not (checkpoint / "optimizer.pt").exists() and not list(checkpoint.glob("*.safetensors"))
    assert not list((tmp_path / "fsdp").glob(".checkpoint-*"))

    # The final output is one ordinary folder, in the dtype the base was loaded in.
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    with safe_open(str(tmp_path / "fsdp" / "model.safetensors"), "pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp").dtype == torch.bfloat16

    # Resharded on resume: one plain process, and two FSDP processes, continue with the same losses.
    resumed_alone, _ = run(tiny_llama, tmp_path / "alone", "full", processes=1, per_device_batch=4,
                           extra=(*bf16, "--resume_from_checkpoint", str(checkpoint)))
    resumed_fsdp, _ = run(tiny_llama, tmp_path / "fsdp2", "full", processes=2, per_device_batch=2,
                          extra=(*bf16, "--fsdp", "--resume_from_checkpoint", str(checkpoint)))
    assert resumed_alone == pytest.approx(single[2:], abs=1e-5)
    assert resumed_fsdp == pytest.approx(single[2:], abs=1e-5)
