#!/usr/bin/env python3
"""Scale-out on 2 GPUs through glmtune's own trainer: LoRA on 1 vs 2 processes, and an FSDP full fine-tune
with a sharded (DCP) checkpoint that a second run resumes from.

Model: the ChatGLM-6B-sized random-init Llama proxy (7.66B, bf16), built on every rank with the same seed
(no 15 GB file to write and read). Data: random ids with ADGEN's prompt/answer lengths
(``train_throughput.samples``). Tokens/s counts non-pad tokens of all ranks (the trainer's logged value).

Stages, each a torchrun of this script writing its own JSON (``common.write_json``: $OUT or benchmarks/results):
  lora                       per-device micro-batch 16, gradient accumulation 1; warm-up then timed steps
  full --phase first         --fsdp full fine-tune, a DCP checkpoint at --save_at; the final export is skipped
                             (the resumed run writes and times it)
  full --phase resume        resume_from_checkpoint="latest", the remaining steps, the final (gathered, bf16) export
  summary                    (plain python) one JSON and a table from the stages' JSONs

Driver: bash benchmarks/scale_out.sh [--tiny]   (--tiny: CPU, gloo, a tiny proxy)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from common import build_proxy, environment, sync, write_json  # noqa: E402
from train_throughput import samples  # noqa: E402

MICRO_BATCH = 16
DATA_SIZE = MICRO_BATCH * 2 * 40  # the same examples whatever the process count


class Tokenizer:
    pad_token_id = 0
    eos_token_id = 2

    def save_pretrained(self, directory: str) -> None:
        """A synthetic-data run has no tokenizer to save."""


def gib(value: int) -> float:
    return round(value / 2**30, 2)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def result_path(name: str) -> Path:
    return Path(os.environ.get("OUT", "benchmarks/results")) / name


class Probes:
    """Wall times of the trainer's steps and checkpoint I/O, by wrapping names in glmtune.train.trainer."""

    def __init__(self, skip_export: bool):
        import glmtune.train.trainer as trainer

        self.step_stamps: list[float] = []
        self.seconds: dict[str, float] = {}
        probes = self

        class StampedBar(trainer.tqdm):
            def update(self, n=1):
                sync()
                probes.step_stamps.append(time.perf_counter())
                return super().update(n)

        trainer.tqdm = StampedBar
        trainer.save_checkpoint = self.timed("checkpoint_save", trainer.save_checkpoint)
        trainer.load_sharded = self.timed("checkpoint_load", trainer.load_sharded)
        if skip_export:
            trainer.gather_model_state = lambda model: None
        else:
            trainer.gather_model_state = self.timed("export_gather", trainer.gather_model_state)

    def timed(self, name: str, function):
        def wrapper(*args, **kwargs):
            sync()
            start = time.perf_counter()
            value = function(*args, **kwargs)
            sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            return value

        return wrapper

    def step_seconds(self, first: int) -> list[float]:
        """Durations of the steps after the ``first`` ones (each from the previous step's end)."""
        return [b - a for a, b in zip(self.step_stamps[first:], self.step_stamps[first + 1 :])]


def run_stage(args, device: str) -> dict:
    from glmtune.config import GlmtuneConfig
    from glmtune.data.preprocess import Example
    from glmtune.methods import get_method
    from glmtune.train.distributed import process_group
    from glmtune.train.trainer import train

    full = args.stage == "full"
    resume = full and args.phase == "resume"
    probes = Probes(skip_export=full and not resume)
    started = time.perf_counter()
    model = build_proxy(args.tiny, device)
    model.config.use_cache = False
    build_seconds = time.perf_counter() - started
    data = [Example(ids, labels) for ids, labels in samples(DATA_SIZE, model.config.vocab_size)]
    output_dir = Path(args.workdir) / ("full" if full else f"lora_{os.environ.get('WORLD_SIZE', '1')}")
    on_gpu = device.startswith("cuda")
    if full:
        if args.full_steps >= 2 * args.save_at:
            raise SystemExit("--full_steps must be below 2 × --save_at: one checkpoint only (disk)")
        fields = dict(finetuning_type="full", fsdp=True, max_steps=args.full_steps, save_steps=args.save_at,
                      learning_rate=1e-5, resume_from_checkpoint="latest" if resume else None)
    else:
        fields = dict(finetuning_type="lora", lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_target="q_proj,v_proj",
                      max_steps=args.warmup + args.steps, save_steps=0, learning_rate=1e-4,
                      group_by_length=args.group, torch_compile=args.compile)
    config = GlmtuneConfig(per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=1, logging_steps=1,
                           report_to="none", output_dir=str(output_dir), overwrite_output_dir=True, bf16=on_gpu, **fields)
    method = get_method(config.finetuning_type)
    if full and not resume:
        method.save_output = lambda *a, **k: None  # skipped here; the resumed run measures it
    elif full:
        method.save_output = probes.timed("export_write", method.save_output)
    prepared = method.apply(model, config)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = train(prepared, Tokenizer(), method, config, data)
    train_call_seconds = time.perf_counter() - started

    group = process_group()
    per_rank = group.gather({
        "rank": group.rank, "build_seconds": round(build_seconds, 2), **{k: round(v, 2) for k, v in probes.seconds.items()},
        "peak_alloc_gib": gib(torch.cuda.max_memory_allocated()) if on_gpu else None,
        "peak_reserved_gib": gib(torch.cuda.max_memory_reserved()) if on_gpu else None,
    })
    if not group.is_main:
        return {}
    log = [json.loads(line) for line in (output_dir / "train_log.jsonl").read_text().splitlines()]
    entry = {"processes": group.world_size, "micro_batch_per_device": MICRO_BATCH, "losses": result.losses,
             "train_call_seconds": round(train_call_seconds, 2), "ranks": per_rank}
    if not full:
        rates = [e["tokens_per_s"] for e in log[args.warmup :]]
        times = probes.step_seconds(args.warmup)
        entry.update(tokens_per_s=round(statistics.median(rates), 1), step_seconds=round(statistics.median(times), 4),
                     timed_steps=len(rates), group_by_length=args.group, torch_compile=args.compile)
        return entry
    # Step times without the step that wrote the checkpoint (its save is timed on its own).
    start_step = args.save_at if resume else 0
    times = [t for step, t in enumerate(probes.step_seconds(0), start=start_step + 2) if step != args.save_at + 1]
    entry.update(step_seconds=round(statistics.median(times), 3) if times else None,
                 tokens_per_s=round(statistics.median(e["tokens_per_s"] for e in log[-len(result.losses):]), 1))
    checkpoint = output_dir / f"checkpoint-{args.save_at}"
    if checkpoint.is_dir():
        entry.update(checkpoint_gb=round(folder_bytes(checkpoint) / 1e9, 3),
                     checkpoint_files=sorted(f.name for f in checkpoint.iterdir()),
                     disk_free_gb_after=round(shutil.disk_usage(output_dir).free / 1e9, 1))
    if resume:
        export = sorted(output_dir.glob("*.safetensors"))
        entry["export_gb"] = round(sum(f.stat().st_size for f in export) / 1e9, 3)
        if export:
            from safetensors import safe_open

            with safe_open(str(export[0]), "pt") as weights:
                entry["export_dtype"] = str(weights.get_tensor(next(iter(weights.keys()))).dtype)
        first = result_path("scale_out_full_first.json")
        if first.is_file():
            uninterrupted = json.loads(first.read_text())["losses"][args.save_at :]
            entry["uninterrupted_losses"] = uninterrupted
            entry["max_abs_loss_difference"] = max((abs(a - b) for a, b in zip(result.losses, uninterrupted)), default=None)
    return entry


def summary() -> None:
    stages = {name: json.loads(result_path(f"scale_out_{name}.json").read_text())
              for name in ("lora_1", "lora_2", "full_first", "full_resume") if result_path(f"scale_out_{name}.json").is_file()}
    combined = {"stages": stages}
    if "lora_1" in stages and "lora_2" in stages:
        combined["lora_scaling"] = round(stages["lora_2"]["tokens_per_s"] / stages["lora_1"]["tokens_per_s"], 3)
    write_json("scale_out.json", combined)
    print("\n| stage | processes | tokens/s (all ranks) | step s | peak alloc GiB per rank | notes |\n|---|---|---|---|---|---|")
    for name, entry in stages.items():
        peaks = " / ".join(str(r["peak_alloc_gib"]) for r in entry["ranks"])
        rank0 = entry["ranks"][0]
        notes = [f"{key} {rank0[key]} s" for key in ("checkpoint_save", "checkpoint_load", "export_gather", "export_write")
                 if key in rank0]
        if "checkpoint_gb" in entry:
            notes.append(f"checkpoint {entry['checkpoint_gb']} GB")
        if "export_gb" in entry:
            notes.append(f"export {entry['export_gb']} GB {entry.get('export_dtype')}")
        if "max_abs_loss_difference" in entry:
            notes.append(f"resumed vs uninterrupted loss: max |diff| {entry['max_abs_loss_difference']}")
        print(f"| {name} | {entry['processes']} | {entry['tokens_per_s']:,.0f} | {entry['step_seconds']} | {peaks} | {'; '.join(notes)} |")
    if "lora_scaling" in combined:
        print(f"\nLoRA scaling, 2 processes vs 1: {combined['lora_scaling']}x (target >= 1.8x)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stage", choices=["lora", "full", "summary"])
    parser.add_argument("--phase", choices=["first", "resume"], default="first")
    parser.add_argument("--tiny", action="store_true", help="CPU (gloo) check with a tiny proxy")
    parser.add_argument("--workdir", default="/tmp/glmtune_scale_out", help="training outputs and the checkpoint")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed LoRA steps")
    parser.add_argument("--group", action="store_true", help="LoRA with --group_by_length")
    parser.add_argument("--compile", action="store_true", help="LoRA with --torch_compile (about 1 min more per run)")
    parser.add_argument("--full_steps", type=int, default=7)
    parser.add_argument("--save_at", type=int, default=4)
    args = parser.parse_args()
    if args.stage == "summary":
        return summary()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = "cpu"
    if torch.cuda.is_available() and not args.tiny:
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    entry = run_stage(args, device)
    if entry:
        name = f"lora_{entry['processes']}" if args.stage == "lora" else f"full_{args.phase}"
        entry = {"env": environment(), "args": vars(args), **entry}
        write_json(f"scale_out_{name}.json", entry)
        print(name, json.dumps({k: v for k, v in entry.items() if k not in ("env", "args")}), flush=True)


if __name__ == "__main__":
    main()
