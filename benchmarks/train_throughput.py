#!/usr/bin/env python3
"""Training throughput on one GPU: the seed-style baseline, plain HF, and glmtune, same model and data, one run.

Model: the ChatGLM-6B-sized random-init Llama proxy (7.66B, bf16). Data: random token ids with the
prompt/answer lengths of ADGEN train tokenized (benchmarks/adgen_lengths.json, capped at 64+64).
Tokens/s counts only non-pad tokens. MFU = 4·P·T / time / 777 TFLOP/s (the measured bf16 matmul rate),
P = linear parameters (frozen base: no weight-gradient GEMMs), as in ../shared/bench.

  seed    HF Trainer + PEFT LoRA r8 q,v, bs1 x ga16, padded to 128 (the seed pads to max length)
  hf16    HF Trainer + PEFT LoRA r8 q,v, bs16, padded to the longest in the batch; suffixes +compile
          (torch_compile=True, batches padded to a multiple of 8), +group (group_by_length), +liger
          (liger-kernel's fused RMSNorm/SwiGLU/RoPE/linear-CE patched into Llama, as LLaMA-Factory's enable_liger_kernel)
  lora    glmtune train, LoRA r8 q,v, effective batch 16
  ptuning glmtune train, P-Tuning v2, pre_seq_len 128, effective batch 16
  chatglm6b-ptuning  the same on native ChatGLM-6B (glmtune.models.chatglm, random init, ChatGLM-6B dims)
  glmtune runs take flag suffixes: +group (--group_by_length), +compile (--torch_compile),
  +fp8 (--fp8), +nodrop (LoRA dropout 0 instead of 0.1; also for the hf16 rows),
  +ckpt (--gradient_checkpointing), +ckptN (only the first N layers), +budgetNN (--activation_memory_budget NN/100), +plainloss (the model's own loss, logits at every position,
  instead of glmtune's default label-only chunked loss), +pack (--packing), e.g. lora+group+compile;
  the probes of training_memory_probes.py: +fp8t (the two-copy FP8 of runs 18-19), +cppwrapper, +offload[N];
  an unknown suffix is ignored, which lets a row run twice under two names (+again)

Timing: a CUDA event is recorded at the end of every optimizer step (a global optimizer hook, the same for
every runner, with no host sync), so each step's time is read off the GPU's timeline after the run. Tokens
per step are counted on the CPU as each runner collates its micro-batches. The headline is wall-clock:
all timed steps' tokens / their total time; the median of per-step rates and the slowest steps (with the
torch.compile frames, gen-2 garbage collections and cudaMalloc calls the CPU saw in them) go beside it.

Run on the device: python benchmarks/train_throughput.py [--runs seed,hf16,lora,ptuning]   (CPU check: --tiny)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from common import build_proxy, environment, proxy_config, sync, write_json  # noqa: E402

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


class StepClock:
    """Per-step times from events recorded at each optimizer step's end, and what the CPU did in each step."""

    def __init__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.cuda = torch.cuda.is_available()
        self.marks, self.step_tokens, self.pending_tokens, self.collections = [], [], 0, 0
        self.gc_callback = lambda phase, info: self._count_gc(phase, info)
        gc.callbacks.append(self.gc_callback)
        self.hook = register_optimizer_step_post_hook(lambda *args: self.stamp())

    def _count_gc(self, phase: str, info: dict) -> None:
        if phase == "start" and info["generation"] == 2:
            self.collections += 1

    def tokens(self, count: int) -> None:
        self.pending_tokens += count

    def stamp(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        else:
            event = time.perf_counter()
        mallocs = torch.cuda.memory_stats().get("num_device_alloc", 0) if self.cuda else 0
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        self.marks.append((event, frames, self.collections, mallocs))

    def close(self) -> None:
        self.hook.remove()
        gc.callbacks.remove(self.gc_callback)

    def result(self, collated_per_step: list[int], warmup: int) -> dict:
        """``collated_per_step``: the tokens of each step, in order (from the runner's collate calls)."""
        sync()
        seconds = []
        for (a, *_), (b, *_) in zip(self.marks[warmup - 1 :], self.marks[warmup:]):
            seconds.append(a.elapsed_time(b) / 1000 if self.cuda else b - a)
        tokens = collated_per_step[warmup : warmup + len(seconds)]
        rates = [t / s for t, s in zip(tokens, seconds)]
        steps = []
        for index in sorted(range(len(seconds)), key=lambda i: rates[i])[:6]:
            before, after = self.marks[warmup + index - 1], self.marks[warmup + index]
            steps.append({"step": warmup + index + 1, "seconds": round(seconds[index], 4), "tokens_per_s": round(rates[index]),
                          "new_compiled_frames": after[1] - before[1], "gen2_collections": after[2] - before[2],
                          "cuda_mallocs": after[3] - before[3]})
        return {"tokens_per_s_wall": sum(tokens) / sum(seconds), "tokens_per_s_median": statistics.median(rates),
                "timed_steps": len(seconds), "timed_seconds": round(sum(seconds), 3), "slowest_steps": steps,
                "step_seconds": [round(x, 4) for x in seconds]}


def hf_trainer_run(model, data, batch_size: int, accumulation: int, pad_to: int | None, steps: int, warmup: int,
                   compile_model: bool = False, group: bool = False, dropout: float = 0.1) -> dict:
    """The seed's stack: transformers Trainer + PEFT LoRA, optionally with its own speed flags."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=32, lora_dropout=dropout, target_modules=["q_proj", "v_proj"]))
    collated = []
    multiple = 8 if compile_model else 1  # a new length per batch would recompile the whole model every step

    def collate(batch):
        length = pad_to or -(-max(len(item["input_ids"]) for item in batch) // multiple) * multiple
        input_ids = torch.zeros(len(batch), length, dtype=torch.long)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros(len(batch), length, dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        collated.append(int(mask.sum()))
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    flags = {"torch_compile": compile_model}
    if group:  # transformers 5.24 renamed the flag
        flags.update({"group_by_length": True} if "group_by_length" in fields else {"train_sampling_strategy": "group_by_length"})
    clock = StepClock()
    try:
        with tempfile.TemporaryDirectory() as output:
            arguments = TrainingArguments(output_dir=output, per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                                          max_steps=warmup + steps, learning_rate=1e-4, bf16=torch.cuda.is_available(), logging_steps=1000,
                                          save_strategy="no", report_to=[], remove_unused_columns=False, dataloader_drop_last=True, **flags)
            dataset = [{"input_ids": ids, "labels": labels} for ids, labels in data]
            Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=collate).train()
    finally:
        clock.close()
    per_step = [sum(collated[i : i + accumulation]) for i in range(0, len(collated), accumulation)]
    model.unload()
    return clock.result(per_step, warmup)


def profiled(warmup: int):
    """A CPU and CUDA profiler that records the two optimizer steps after ``warmup`` (stepped by a global optimizer hook)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])]
    profiler = profile(activities=activities, schedule=schedule(wait=max(warmup - 1, 0), warmup=1, active=2, repeat=1))
    handle = register_optimizer_step_post_hook(lambda *args: profiler.step())
    return profiler, handle


def kernel_table(profiler, rows: int = 30) -> str:
    """The kernels by GPU time, then the host's operators by CPU time (where the step's host time goes)."""
    averages = profiler.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=90)]
    if torch.cuda.is_available():
        tables.insert(0, averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=90))
    return "\n\n".join(tables)


def glmtune_run(model, data, method: str, batch_size: int, accumulation: int, steps: int, warmup: int, extra: dict,
                plain_loss: bool = False, profile_to: Path | None = None, native_chatglm: bool = False) -> dict:
    from glmtune.config import GlmtuneConfig
    from glmtune.data.preprocess import Example
    from glmtune.methods import get_method
    from glmtune.train import trainer
    from glmtune.train.objectives import SFTObjective

    class Tokenizer:
        pad_token_id = 0
        eos_token_id = 2

    collated = []

    class CountedSFT(SFTObjective):
        def collate(self, examples, pad_id):
            batch = super().collate(examples, pad_id)
            collated.append(int(batch["attention_mask"].sum()))
            return batch

    config = GlmtuneConfig(**{**dict(
        finetuning_type=method, lora_rank=8, lora_alpha=32,
        lora_target="query_key_value" if native_chatglm else "q_proj,v_proj",
        pre_seq_len=128 if method == "ptuning" else None, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=warmup + steps, logging_steps=warmup + steps, save_steps=0,
        report_to="none", learning_rate=1e-4, output_dir=tempfile.mkdtemp(), overwrite_output_dir=True,
        bf16=torch.cuda.is_available()), **extra})
    method_object = get_method(method)
    prepared = method_object.apply(model, config)
    profiler, hook = profiled(warmup) if profile_to else (None, None)
    clock = StepClock()
    try:
        if profiler:
            profiler.start()
        trainer.train(prepared, Tokenizer(), method_object, config, [Example(ids, labels) for ids, labels in data],
                      objective=CountedSFT(label_only=not plain_loss, packing=config.packing))
    finally:
        clock.close()
        if profiler:
            profiler.stop()
            hook.remove()
            profile_to.parent.mkdir(parents=True, exist_ok=True)
            profile_to.write_text(kernel_table(profiler))
    per_step = [sum(collated[i : i + accumulation]) for i in range(0, len(collated), accumulation)]
    return clock.result(per_step, warmup)


def chatglm6b_samples(count: int, tiny: bool, seed: int = 0) -> tuple[object, list[tuple[list[int], list[int]]]]:
    """Native ChatGLM-6B's config and ADGEN-length samples in its layout: prompt [gMASK] <sop> answer <eop>."""
    from quantization_memory import model_config

    config = model_config(tiny)
    lengths = json.loads((HERE / "adgen_lengths.json").read_text())["lengths"]
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt_length, answer_length = lengths[i % len(lengths)]
        prompt = torch.randint(5, config.mask_token_id, (prompt_length - 2,), generator=generator).tolist()
        answer = torch.randint(5, config.mask_token_id, (answer_length - 1,), generator=generator).tolist()
        ids = prompt + [config.gmask_token_id, config.bos_token_id] + answer + [config.eos_token_id]
        context = ids.index(config.bos_token_id)
        out.append((ids, [-100] * context + ids[context:]))
    return config, out


@contextlib.contextmanager
def probes(flags: list[str], run_extra: dict):
    """The probes of training_memory_probes.py a run's flags name (+fp8t, +cppwrapper, +offload[N])."""
    import training_memory_probes as memory_probes

    report: dict = {}
    with contextlib.ExitStack() as stack:
        for flag in flags:
            if flag == "fp8t":
                run_extra["fp8"] = True
                stack.enter_context(memory_probes.two_copy_fp8())
            elif flag == "cppwrapper":
                stack.enter_context(memory_probes.cpp_wrapper())
            elif flag.startswith("offload"):
                report["offload_check_max_gradient_difference"] = memory_probes.offload_check()
                stack.enter_context(memory_probes.offloaded_layers(int(flag[7:]) if flag[7:] else None, report))
        yield report


def measure(run: str, args, device: str, data: list, extra: dict) -> dict:
    """Build a fresh model, run ``run``'s runner on it, and return its figures (+nocudnn: SDPA without cuDNN)."""
    if "nocudnn" not in run.split("+"):
        return _measure(run, args, device, data, extra)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        return _measure(run, args, device, data, extra)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def _measure(run: str, args, device: str, data: list, extra: dict) -> dict:
    name, *flags = run.split("+")
    if name in ("seed", "hf16"):
        if "liger" in flags:  # patches transformers' Llama classes for the rest of the process: run it last
            from liger_kernel.transformers import apply_liger_kernel_to_llama

            apply_liger_kernel_to_llama()
        model = build_proxy(args.tiny, device)
        model.config.use_cache = False
        parameters = linear_parameters(model)
        batch, accumulation, pad_to = (1, 16, 128) if name == "seed" else (16, 1, None)
        steps, warmup = (args.seed_steps, 3) if name == "seed" else (args.steps, args.warmup)  # the seed's steps are slow
        measured = hf_trainer_run(model, data, batch, accumulation, pad_to, steps, warmup,
                                  compile_model="compile" in flags, group="group" in flags,
                                  dropout=0.0 if "nodrop" in flags else 0.1)
    else:
        micro = args.glmtune_micro_batch
        method = "ptuning" if name == "chatglm6b-ptuning" else name
        flag_fields = {"group": "group_by_length", "compile": "torch_compile", "ckpt": "gradient_checkpointing", "fp8": "fp8",
                       "pack": "packing"}
        run_extra = {**extra, **{flag_fields[f]: True for f in flags if f in flag_fields}}
        for flag in flags:
            if flag.startswith("ckpt") and flag != "ckpt":  # +ckptN: checkpoint only the first N layers
                run_extra.update(gradient_checkpointing=True, gradient_checkpointing_layers=int(flag[4:]))
            if flag.startswith("budget"):  # +budgetNN: --activation_memory_budget NN/100
                run_extra["activation_memory_budget"] = int(flag[6:]) / 100
        run_extra["lora_dropout"] = 0.0 if "nodrop" in flags else 0.1
        profile_to = Path(os.environ.get("OUT", "benchmarks/results")) / f"profile_{run.replace('+', '_')}.txt" if args.profile else None
        native = name == "chatglm6b-ptuning"
        if native:
            from quantization_memory import build

            chatglm_config, run_data = chatglm6b_samples(len(data), args.tiny)
            model = build(chatglm_config, device, torch.bfloat16, None)
        else:
            model, run_data = build_proxy(args.tiny, device), data
            model.config.use_cache = False
        parameters = linear_parameters(model)
        with probes(flags, run_extra) as probe_report:
            measured = glmtune_run(model, run_data, method, micro, 16 // micro, args.steps, args.warmup, run_extra,
                                   plain_loss="plainloss" in flags, profile_to=profile_to, native_chatglm=native)
        measured.update(probe_report)
    # Every runner changes the model (PEFT, HF Trainer's compile, glmtune's methods): the next builds its own.
    del model
    gc.collect()
    return {**measured, "tokens_per_s": round(measured["tokens_per_s_wall"], 1), "linear_params": parameters,
            "mfu": round(4 * parameters * measured["tokens_per_s_wall"] / (MATMUL_TFLOPS * 1e12), 4),
            "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if device == "cuda" else None}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--runs", default="seed,hf16,lora,ptuning")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--seed_steps", type=int, default=10, help="timed steps of the seed row (3 warm-up)")
    parser.add_argument("--output", default="train_throughput.json", help="file name under $OUT (or benchmarks/results)")
    parser.add_argument("--glmtune_micro_batch", type=int, default=16)
    parser.add_argument("--extra", default="{}", help="JSON of extra GlmtuneConfig fields for the glmtune runs")
    parser.add_argument("--profile", action="store_true",
                        help="write the kernel (GPU) and operator (CPU) time tables of two steps after warm-up per glmtune run (profile_RUN.txt)")
    args = parser.parse_args()
    # One GPU: with several visible, HF Trainer (the seed and hf16 rows) would wrap the model in DataParallel.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = samples(16 * (args.steps + args.warmup + 2), proxy_config(args.tiny).vocab_size)
    results = {"env": environment(), "args": vars(args), "runs": {}}
    extra = json.loads(args.extra)
    for run in args.runs.split(","):
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            entry = measure(run, args, device, data, extra)
        except Exception as error:  # one failing lever must not cost the rest of the table
            traceback.print_exc()
            results["runs"][run] = {"error": f"{type(error).__name__}: {error}"[:2000]}
            write_json(args.output, results)
            torch._dynamo.reset()
            continue
        entry["row_seconds"] = round(time.perf_counter() - started, 1)  # build, compile and all steps: plans the calls
        results["runs"][run] = entry
        print(run, {k: v for k, v in entry.items() if k != "step_seconds"}, flush=True)
        write_json(args.output, results)
        torch._dynamo.reset()
    print("\n| run | wall tokens/s | median | slowest step | MFU (wall) | peak alloc GiB |\n|---|---|---|---|---|---|")
    for run, entry in results["runs"].items():
        if "error" in entry:
            print(f"| {run} | failed: {entry['error'][:100]} |")
            continue
        print(f"| {run} | {entry['tokens_per_s']:,.0f} | {entry['tokens_per_s_median']:,.0f} | "
              f"{entry['slowest_steps'][0]['tokens_per_s']:,} | {100 * entry['mfu']:.1f}% | {entry['peak_alloc_gib']} |")


if __name__ == "__main__":
    main()
