#!/usr/bin/env python3
"""Training throughput on one GPU: the seed-style baseline, plain HF, and glmtune, same model and data, one run.

Model: the ChatGLM-6B-sized random-init Llama proxy (7.66B, bf16). Data: random token ids with the
prompt/answer lengths of ADGEN train tokenized (benchmarks/adgen_lengths.json, capped at 64+64).
Tokens/s counts only non-pad tokens. MFU = 4·P·T / time / 777 TFLOP/s (the measured bf16 matmul rate),
P = linear parameters (frozen base: no weight-gradient GEMMs), as in ../shared/bench.

  seed    HF Trainer + PEFT LoRA r8 q,v, bs1 x ga16, padded to 128 (the seed pads to max length)
  hf16    HF Trainer + PEFT LoRA r8 q,v, bs16, padded to the longest in the batch
  lora    glmtune train, LoRA r8 q,v, effective batch 16
  ptuning glmtune train, P-Tuning v2, pre_seq_len 128, effective batch 16
  glmtune runs take flag suffixes: +group (--group_by_length), +compile (--torch_compile),
  +ckpt (--gradient_checkpointing), +ckptN (only the first N layers), +plainloss (the model's own loss, logits at every position,
  instead of glmtune's default label-only chunked loss), e.g. lora+group+compile

Run on the device: python benchmarks/train_throughput.py [--runs seed,hf16,lora,ptuning]   (CPU check: --tiny)
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from common import build_proxy, environment, sync, write_json  # noqa: E402

MATMUL_TFLOPS = 777.0


def samples(count: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    lengths = json.loads((HERE / "adgen_lengths.json").read_text())["lengths"]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt_length, answer_length = lengths[i % len(lengths)]
        ids = torch.randint(3, vocab, (prompt_length + answer_length,), generator=generator).tolist()
        out.append((ids, [-100] * prompt_length + ids[prompt_length:]))
    return out


def linear_parameters(model) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def hf_trainer_run(model, data, batch_size: int, accumulation: int, pad_to: int | None, steps: int, warmup: int) -> dict:
    """The seed's stack: transformers Trainer + PEFT LoRA; step time stamped after each optimizer step."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["q_proj", "v_proj"]))
    stamps = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            sync()
            stamps.append(time.perf_counter())

    def collate(batch):
        length = pad_to or max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, (ids, lab) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(lab)
            mask[row, : len(ids)] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    with tempfile.TemporaryDirectory() as output:
        arguments = TrainingArguments(output_dir=output, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                      max_steps=warmup + steps, learning_rate=1e-4, bf16=torch.cuda.is_available(), logging_steps=1000,
                                      save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_drop_last=True)
        trainer = Trainer(model=model, args=arguments, train_dataset=data, data_collator=collate, callbacks=[Stamp()])
        trainer.train()
    step_seconds = statistics.median(b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:]))
    tokens = sum(len(ids) for ids, _ in data[: batch_size * accumulation * (warmup + steps)]) / (warmup + steps)
    model.unload()
    return {"step_seconds": step_seconds, "tokens_per_step": tokens}


def profiled(warmup: int):
    """A CUDA profiler that records the two optimizer steps after ``warmup`` (stepped by a global optimizer hook)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU  # CPU: --tiny checks
    profiler = profile(activities=[activity], schedule=schedule(wait=max(warmup - 1, 0), warmup=1, active=2, repeat=1))
    handle = register_optimizer_step_post_hook(lambda *args: profiler.step())
    return profiler, handle


def kernel_table(profiler, rows: int = 30) -> str:
    sort = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=90)


def glmtune_run(model, data, method: str, batch_size: int, accumulation: int, steps: int, warmup: int, extra: dict,
                plain_loss: bool = False, profile_to: Path | None = None) -> dict:
    from glmtune.config import GlmtuneConfig
    from glmtune.data.preprocess import Example
    from glmtune.methods import get_method
    from glmtune.train import trainer

    class Tokenizer:
        pad_token_id = 0
        eos_token_id = 2

    config = GlmtuneConfig(finetuning_type=method, lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_target="q_proj,v_proj",
                           pre_seq_len=128 if method == "ptuning" else None, per_device_train_batch_size=batch_size,
                           gradient_accumulation_steps=accumulation, max_steps=warmup + steps, logging_steps=1, save_steps=0,
                           report_to="none", learning_rate=1e-4, output_dir=tempfile.mkdtemp(), overwrite_output_dir=True,
                           bf16=torch.cuda.is_available(), **extra)
    method_object = get_method(method)
    prepared = method_object.apply(model, config)
    label_only_loss = trainer._loss
    if plain_loss:  # no user flag for it: the label-only loss is the default and equal to this one
        trainer._loss = functools.partial(label_only_loss, label_only=False)
    profiler, hook = profiled(warmup) if profile_to else (None, None)
    try:
        if profiler:
            profiler.start()
        trainer.train(prepared, Tokenizer(), method_object, config, [Example(ids, labels) for ids, labels in data])
    finally:
        trainer._loss = label_only_loss
        if profiler:
            profiler.stop()
            hook.remove()
            profile_to.parent.mkdir(parents=True, exist_ok=True)
            profile_to.write_text(kernel_table(profiler))
    log = [json.loads(line) for line in (Path(config.output_dir) / "train_log.jsonl").read_text().splitlines()]
    rates = [entry["tokens_per_s"] for entry in log[warmup:]]
    return {"tokens_per_s_median": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--runs", default="seed,hf16,lora,ptuning")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--glmtune_micro_batch", type=int, default=16)
    parser.add_argument("--extra", default="{}", help="JSON of extra GlmtuneConfig fields for the glmtune runs")
    parser.add_argument("--profile", action="store_true",
                        help="write the CUDA kernel time table of two steps after warm-up per glmtune run (profile_RUN.txt)")
    args = parser.parse_args()
    # One GPU: with several visible, HF Trainer (the seed and hf16 rows) would wrap the model in DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_proxy(args.tiny, device)
    model.config.use_cache = False
    parameters = linear_parameters(model)
    data = samples(16 * (args.steps + args.warmup + 2), model.config.vocab_size)
    results = {"env": environment(), "args": vars(args), "linear_params": parameters, "runs": {}}
    extra = json.loads(args.extra)
    for run in args.runs.split(","):
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        if run in ("seed", "hf16"):
            batch, accumulation, pad_to = (1, 16, 128) if run == "seed" else (16, 1, None)
            measured = hf_trainer_run(model, data, batch, accumulation, pad_to, args.steps, args.warmup)
            rate = measured["tokens_per_step"] / measured["step_seconds"]
        else:
            micro = args.glmtune_micro_batch
            method, *flags = run.split("+")
            flag_fields = {"group": "group_by_length", "compile": "torch_compile", "ckpt": "gradient_checkpointing"}
            run_extra = {**extra, **{flag_fields[f]: True for f in flags if f in flag_fields}}
            for flag in flags:  # +ckptN: checkpoint only the first N layers
                if flag.startswith("ckpt") and flag != "ckpt":
                    run_extra.update(gradient_checkpointing=True, gradient_checkpointing_layers=int(flag[4:]))
            profile_to = Path(os.environ.get("OUT", "benchmarks/results")) / f"profile_{run}.txt" if args.profile else None
            measured = glmtune_run(model, data, method, micro, 16 // micro, args.steps, args.warmup, run_extra,
                                   plain_loss="plainloss" in flags, profile_to=profile_to)
            rate = measured["tokens_per_s_median"]
            # glmtune's methods wrap or modify the model: rebuild a clean one for the next run
            del model
            gc.collect()
            model = build_proxy(args.tiny, device)
            model.config.use_cache = False
        entry = {**measured, "tokens_per_s": round(rate, 1), "mfu": round(4 * parameters * rate / (MATMUL_TFLOPS * 1e12), 4),
                 "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
                 "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None}
        results["runs"][run] = entry
        print(run, entry, flush=True)
        write_json("train_throughput.json", results)
    print("\n| run | tokens/s | MFU | peak alloc GiB |\n|---|---|---|---|")
    for run, entry in results["runs"].items():
        print(f"| {run} | {entry['tokens_per_s']:,.0f} | {100 * entry['mfu']:.1f}% | {entry['peak_alloc_gib']} |")


if __name__ == "__main__":
    main()
