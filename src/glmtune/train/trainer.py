"""The training loop.

A lean loop of our own rather than HF Trainer: it lets a checkpoint hold only what the method
trains (Trainer saves whole models for custom wrappers), writes checkpoints atomically, resumes with
bit-identical losses from a stateless data order, and keeps the fast paths (packing, fused losses)
in plain sight.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm
from transformers import get_scheduler, set_seed

from glmtune.config import GlmtuneConfig
from glmtune.data.preprocess import Example, collate, pad_id
from glmtune.errors import GlmtuneError
from glmtune.methods import Method
from glmtune.models.introspect import decoder_layers, parameter_dtype
from glmtune.train.distributed import (
    gather_model_state,
    is_sharded_checkpoint,
    load_model_state,
    load_optimizer_state,
    load_sharded,
    optimizer_state,
    process_group,
    save_sharded,
    unwrap,
    wrap,
)
from glmtune.train.checkpoint import (
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_run_record,
)
from glmtune.train.best import BestWeights
from glmtune.train.loss import label_loss, supports_label_loss

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    eval_losses: list[tuple[int, float]] = field(default_factory=list)
    train_seconds: float = 0.0


def enable_gradient_checkpointing(model: nn.Module, layer_count: int | None = None) -> None:
    """Recompute each transformer block (or the first ``layer_count``) in backward (non-reentrant
    ``torch.utils.checkpoint``).

    Ours rather than ``model.gradient_checkpointing_enable()``: transformers drops the KV cache inside
    checkpointed layers, which would drop the P-Tuning v2 prefix. One mechanism serves every method.
    """
    for layer in list(decoder_layers(model))[:layer_count]:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if torch.is_grad_enabled():
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
            return _forward(*args, **kwargs)

        layer.forward = checkpointed


class DataOrder:
    """Which examples form each micro-batch, derived from the seed and the micro-batch index alone.

    Each epoch is a seeded shuffle. Being stateless, the order after a resume is the one an
    uninterrupted run would see. With ``lengths`` (``--group_by_length``), each window of 50
    micro-batches is sorted by length, as transformers' ``group_by_length`` does, so a micro-batch
    holds similar lengths and little padding.
    """

    def __init__(self, dataset_size: int, batch_size: int, seed: int, lengths: list[int] | None = None):
        self.dataset_size, self.batch_size, self.seed, self.lengths = dataset_size, batch_size, seed, lengths
        self.batches_per_epoch = math.ceil(dataset_size / batch_size)
        self._epoch, self._order = None, []

    def _epoch_order(self, epoch: int) -> list[int]:
        if epoch != self._epoch:
            order = torch.randperm(self.dataset_size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            if self.lengths is not None:
                window = 50 * self.batch_size
                order = [i for start in range(0, len(order), window)
                         for i in sorted(order[start : start + window], key=lambda i: -self.lengths[i])]
            self._epoch, self._order = epoch, order
        return self._order

    def batch(self, micro_index: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """This rank's share of global micro-batch ``micro_index`` (``batch_size`` is the global size)."""
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        indices = self._epoch_order(epoch)[position * self.batch_size : (position + 1) * self.batch_size]
        share = math.ceil(len(indices) / world_size)
        return indices[rank * share : (rank + 1) * share]


def total_steps(config: GlmtuneConfig, dataset_size: int) -> int:
    if config.max_steps and config.max_steps > 0:
        return config.max_steps
    micro_per_epoch = math.ceil(dataset_size / config.per_device_train_batch_size)
    return max(1, math.ceil(config.num_train_epochs * micro_per_epoch / config.gradient_accumulation_steps))


def compute_dtype(model: nn.Module, config: GlmtuneConfig) -> torch.dtype:
    """Autocast dtype: the flags', else the base weights' when they are half precision."""
    if config.bf16:
        return torch.bfloat16
    if config.fp16:
        return torch.float16
    return parameter_dtype(model)


def check_output_dir(config: GlmtuneConfig) -> Path:
    output_dir = Path(config.output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()) and not (config.overwrite_output_dir or config.resume_from_checkpoint):
        raise GlmtuneError(f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir or choose another")
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


class _Loggers:
    """Loss to ``train_log.jsonl`` and, when installed, TensorBoard."""

    def __init__(self, output_dir: Path, report_to: str, append: bool):
        self.jsonl = open(output_dir / "train_log.jsonl", "a" if append else "w", encoding="utf-8")
        self.tensorboard = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tensorboard = SummaryWriter(str(output_dir / "runs"))
            except ImportError:
                logger.info("tensorboard is not installed; logging to train_log.jsonl only")

    def log(self, step: int, values: dict) -> None:
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        if self.tensorboard:
            for key, value in values.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()


def _loss(model: nn.Module, batch: dict, autocast: torch.autocast, label_only: bool = True) -> torch.Tensor:
    """Mean loss over the batch's label tokens; ``label_only=False`` lets the model compute its own
    (logits at every position), the slower path ``label_loss`` is checked against."""
    with autocast:
        # No KV cache in training: a checkpointed layer would append to it again when replayed.
        # No attention mask either: rows are right-padded, so under the causal mask no real token
        # sees a pad, and without a mask SDPA can take its fastest (flash) kernel.
        if label_only and supports_label_loss(model):
            return label_loss(model, batch["input_ids"], batch["labels"])
        outputs = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        return outputs.loss.float()


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, padding: int, autocast) -> float:
    """Token-weighted mean loss over ``examples``."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], padding).items()}
        count = int((batch["labels"][:, 1:] != -100).sum())
        total += _loss(model, batch, autocast).item() * count
        tokens += count
    model.train(was_training)
    return total / max(tokens, 1)


def train(
    model: nn.Module, tokenizer, method: Method, config: GlmtuneConfig, train_examples: list[Example],
    eval_examples: list[Example] | None = None, run_record: dict | None = None,
    generation_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
) -> TrainResult:
    """Train ``model`` (already prepared by ``method.apply``) and save the result in ``config.output_dir``.

    ``generation_metrics(model)``, when given, runs at each evaluation next to the validation loss.
    """
    group = process_group()
    output_dir = check_output_dir(config) if group.is_main else Path(config.output_dir)
    group.barrier()
    device = next(model.parameters()).device
    dtype = compute_dtype(model, config)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    if config.torch_compile:
        # Each layer's forward, compiled on its own: small graphs that compile fast, and the checkpoint
        # wrapper below stays outside the compiled region (inductor cannot partition a checkpoint inside one).
        for layer in decoder_layers(model):
            layer.forward = torch.compile(layer.forward, dynamic=True)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, config.gradient_checkpointing_layers)

    fsdp = config.fsdp and group.world_size > 1
    if config.fsdp and method.name not in ("full", "freeze"):
        raise GlmtuneError("--fsdp is for full and freeze fine-tuning; LoRA and P-Tuning v2 train with DDP (drop --fsdp)")
    # Wrap before the optimizer exists: FSDP replaces the parameters with their shards.
    model = wrap(model, group, fsdp)
    trained_model = unwrap(model)  # what the method saves; `model` is what steps
    trainable = method.trainable_parameters(trained_model)
    parameters = list(trainable.values())
    if not parameters:
        raise GlmtuneError("the method left no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = total_steps(config, len(train_examples))
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=steps)
    record = {**(run_record or {}), "finetuning_type": method.name, "config": config.to_dict()}

    start_step = 0
    if config.resume_from_checkpoint:
        checkpoint = resolve_resume(output_dir, config.resume_from_checkpoint)
        if is_sharded_checkpoint(checkpoint):  # written by FSDP ranks; resharded to this run's processes
            load_sharded(trained_model, optimizer, checkpoint, list(trainable))
        else:
            if fsdp:
                load_model_state(trained_model, method.read_state(checkpoint))
            else:
                method.restore(trained_model, checkpoint)
            load_optimizer_state(trained_model, optimizer, torch.load(checkpoint / "optimizer.pt", weights_only=False))
        scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
        rng_states = torch.load(checkpoint / "rng_state.pt", weights_only=False)
        # One state per rank; resumed on more ranks than were saved, the extra ranks take rank 0's.
        set_rng_state(rng_states[group.rank] if group.rank < len(rng_states) else rng_states[0])
        start_step = json.loads((checkpoint / "trainer_state.json").read_text())["step"]
        logger.info("resuming from %s at step %d", checkpoint, start_step)
    else:
        set_seed(config.seed + group.rank)  # ranks share the initial weights (DDP broadcasts) but not dropout

    def write_checkpoint(folder: Path, step: int) -> None:
        """Called by every rank. With FSDP each rank writes its shards of the trained tensors and optimizer
        state (no gather); otherwise rank 0 writes them whole. Rank 0 writes the rest."""
        rng_states = group.gather(rng_state())
        if fsdp:
            save_sharded(trained_model, optimizer, folder, list(trainable))
        else:
            optimizer_states = optimizer_state(trained_model, optimizer)
            if group.is_main:
                method.save(trained_model, folder)
                torch.save(optimizer_states, folder / "optimizer.pt")
        if group.is_main:
            torch.save(scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(rng_states, folder / "rng_state.pt")
            (folder / "trainer_state.json").write_text(json.dumps({"step": step, "max_steps": steps}))
            write_run_record(folder, record)

    loggers = _Loggers(output_dir, config.report_to, append=start_step > 0) if group.is_main else None
    padding = pad_id(tokenizer)
    lengths = [len(e.input_ids) for e in train_examples] if config.group_by_length else None
    data_order = DataOrder(len(train_examples), config.per_device_train_batch_size * group.world_size, config.seed, lengths)
    eval_every = config.eval_steps or config.save_steps
    result = TrainResult(output_dir, steps)
    best = BestWeights() if config.load_best_model_at_end else None
    model.train()
    started = time.perf_counter()
    window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
    progress = tqdm(total=steps, initial=start_step, desc="training", unit="step", disable=not group.is_main)
    try:
        for step in range(start_step + 1, steps + 1):
            step_loss = 0.0
            for micro in range(config.gradient_accumulation_steps):
                micro_index = (step - 1) * config.gradient_accumulation_steps + micro
                indices = data_order.batch(micro_index, group.rank, group.world_size)
                collated = collate([train_examples[i] for i in indices], padding)
                window_tokens += int(collated["attention_mask"].sum())  # this rank's, on the CPU: no sync
                batch = {k: v.to(device) for k, v in collated.items()}
                # Weight each rank's mean loss by its answer tokens, so the step's loss and gradients
                # are the mean over all answer tokens of the global batch, whatever the process count.
                local_tokens = (batch["labels"][:, 1:] != -100).sum()
                global_tokens = group.sum(local_tokens)
                loss_sum = _loss(model, batch, autocast) * local_tokens
                loss = group.sum(loss_sum.detach()) / global_tokens
                if not torch.isfinite(loss):
                    raise GlmtuneError(f"loss is {loss.item()} at step {step}; stopping (try a lower --learning_rate)")
                scaled = loss_sum * group.world_size / global_tokens  # DDP averages over ranks
                scaler.scale(scaled / config.gradient_accumulation_steps).backward()
                step_loss += loss.item() / config.gradient_accumulation_steps
            if config.max_grad_norm:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(step_loss)
            window_loss += step_loss
            window_seconds = max(time.perf_counter() - window_start, 1e-9)
            progress.update(1)
            # Summing the ranks' tokens is a collective, done at logging steps only; in between the bar shows
            # an estimate from rank 0's tokens, labelled as one.
            rate_label = "tokens_per_s" if group.world_size == 1 else "tokens_per_s_est"
            progress.set_postfix({"loss": f"{step_loss:.4f}",
                                  rate_label: f"{window_tokens * group.world_size / window_seconds:.0f}"})
            if step % config.logging_steps == 0 or step == steps:
                tokens_per_second = int(group.sum(torch.tensor(window_tokens, device=device))) / window_seconds
                if loggers:
                    interval = step % config.logging_steps or config.logging_steps
                    loggers.log(step, {"loss": window_loss / interval, "learning_rate": scheduler.get_last_lr()[0],
                                       "tokens_per_s": tokens_per_second})
                window_loss, window_tokens, window_start = 0.0, 0, time.perf_counter()
            evaluate_now = (eval_every and step % eval_every == 0) or (best is not None and step == steps)
            if config.do_eval and eval_examples and evaluate_now:
                eval_loss = evaluate_loss(trained_model, eval_examples, config.per_device_eval_batch_size or 8, padding, autocast)
                result.eval_losses.append((step, eval_loss))
                if best is not None:
                    best.observe(step, eval_loss, trainable)
                values = {"eval_loss": eval_loss}
                if generation_metrics:
                    with autocast:
                        values.update({f"eval_{k}": v for k, v in generation_metrics(trained_model).items()})
                    model.train()
                if loggers:
                    loggers.log(step, values)
                    progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
            if config.save_steps and step % config.save_steps == 0:
                save_checkpoint(output_dir, step, lambda folder: write_checkpoint(folder, step),
                                config.save_total_limit, group)
    finally:
        progress.close()
        if loggers:
            loggers.close()
    result.train_seconds = time.perf_counter() - started
    if best is not None and best.restore(trainable, steps):
        logger.warning("--load_best_model_at_end: the output holds step %d's weights (validation loss %.4f)",
                       best.step, best.loss)
        record["best_step"] = best.step
    # The output is one ordinary folder, whatever the process count: FSDP shards are gathered to rank 0.
    final_model_state = gather_model_state(trained_model) if fsdp else None
    if not group.is_main:
        return result
    method.save_output(trained_model, output_dir, final_model_state)
    write_run_record(output_dir, {**record, "steps": steps})
    if method.name == "full":
        tokenizer.save_pretrained(str(output_dir))
    (output_dir / "train_results.json").write_text(json.dumps({
        "steps": steps, "final_loss": result.losses[-1] if result.losses else None,
        "train_runtime": result.train_seconds, "eval_losses": result.eval_losses,
    }, indent=2))
    return result
