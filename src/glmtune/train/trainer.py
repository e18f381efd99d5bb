"""The training loop.

A lean loop of our own rather than HF Trainer: it lets a checkpoint hold only what the method
trains (Trainer saves whole models for custom wrappers), writes checkpoints atomically, resumes with
bit-identical losses from a stateless data order, and keeps the fast paths (packing, fused losses)
in plain sight.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
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
from glmtune.data.preprocess import Example, pad_id
from glmtune.errors import GlmtuneError
from glmtune.files import OUTPUT_TEMPORARY, prepare_output_dir, publish_output, write_run_record
from glmtune.methods import Method
from glmtune.models.fp8 import check_fp8_device, convert_frozen_linears
from glmtune.models.introspect import decoder_layers, parameter_dtype
from glmtune.train.distributed import (
    ProcessGroup,
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
    TRAINER_STATE,
    check_sharded_index,
    check_trained_weights,
    examples_hash,
    fingerprint,
    load_state,
    read_trainer_state,
    resolve_resume,
    rng_state,
    save_checkpoint,
    set_rng_state,
    start_run,
    truncate_log,
)
from glmtune.train.best import BestWeights
from glmtune.train.loss import causal_lm
from glmtune.train.objectives import Objective, SFTObjective
from glmtune.train.plot import plot_loss
from glmtune.train.trackers import Trackers

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
    return prepare_output_dir(output_dir)


def _loss(model: nn.Module, batch: dict, autocast: torch.autocast, label_only: bool = True) -> torch.Tensor:
    """Mean loss over one batch's label tokens; ``label_only=False`` lets the model compute its own
    (logits at every position), the slower path the label-only loss is checked against."""
    objective = SFTObjective(label_only)
    with autocast:
        loss_sum, _ = objective.loss(model, batch)
    return loss_sum / max(objective.units(batch), 1)


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy without waiting: from pageable memory ``.to("cuda")`` synchronizes the stream; from
    pinned memory with ``non_blocking`` it is queued behind the work already on the device."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _token_count(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a CPU batch, for tokens/s (the objective marks them with ``*attention_mask`` keys)."""
    return sum(int(value.sum()) for key, value in batch.items() if key.endswith("attention_mask"))


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: list[Example], batch_size: int, padding: int, autocast,
                  objective: Objective = SFTObjective()) -> float:
    """The objective's loss averaged over all its units in ``examples`` (label tokens for SFT)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, units = torch.zeros((), device=device), 0
    for start in range(0, len(examples), batch_size):
        collated = objective.collate(examples[start : start + batch_size], padding)
        units += objective.units(collated)
        with autocast:
            total += objective.loss(model, {k: _to_device(v, device) for k, v in collated.items()})[0].float()
    model.train(was_training)
    return total.item() / max(units, 1)


def _prepare_layers(model: nn.Module, config: GlmtuneConfig, dtype: torch.dtype) -> None:
    device = next(model.parameters()).device
    if config.fp8:
        check_fp8_device(device)
        converted = convert_frozen_linears(decoder_layers(model), dtype)
        if not converted:
            raise GlmtuneError("--fp8: the model has no frozen linear layers to run in FP8 (it is for LoRA, P-Tuning v2 and freeze)")
        logger.info("--fp8: %d frozen linear layers compute in FP8", converted)
    if config.activation_memory_budget < 1 and not config.torch_compile:
        raise GlmtuneError("--activation_memory_budget is the compiler's: add --torch_compile (or drop the flag)")
    if config.torch_compile:
        # Each layer's forward, compiled on its own: small graphs that compile fast, and the checkpoint
        # wrapper below stays outside the compiled region (inductor cannot partition a checkpoint inside one).
        for layer in decoder_layers(model):
            layer.forward = _compiled(layer.forward, config.activation_memory_budget)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, config.gradient_checkpointing_layers)


def _compiled(forward: Callable, memory_budget: float) -> Callable:
    """``forward`` through torch.compile; under 1, ``memory_budget`` is the share of the layer's saved activations
    the compiler's partitioner may keep: it recomputes the cheapest of the others in backward (H200, LoRA: 0.5 freed
    2.8 of 8.5 GiB of activations for 6-7% of the speed, where checkpointing half the layers cost 30%,
    benchmarks/NOTES.md). The partition is chosen when a shape first compiles, so the setting is patched around
    each call."""
    compiled = torch.compile(forward, dynamic=True)
    if memory_budget >= 1:
        return compiled

    def under_budget(*args, **kwargs):
        with torch._functorch.config.patch(activation_memory_budget=memory_budget):
            return compiled(*args, **kwargs)

    return under_budget


def _packed_attention(model: nn.Module, device: torch.device) -> str | None:
    """``--packing``: attention that keeps packed examples apart (transformers masks it from where position_ids
    restart). On a GPU flex attention, which skips the masked blocks: SDPA with the block-diagonal mask computes
    the whole score matrix (packing ran 43% slower that way, benchmarks/NOTES.md). On the CPU the model's own
    attention (flex attention has no CPU backward). Returns the implementation to restore after training."""
    lm = causal_lm(model)
    if lm is None or lm.config.model_type == "chatglm":
        raise GlmtuneError("--packing needs a transformers model: native ChatGLM builds its own attention masks; drop --packing")
    if device.type != "cuda":
        return None
    previous = lm.config._attn_implementation
    lm.set_attn_implementation("flex_attention")
    return previous


@dataclass
class _TrainingState:
    """What a checkpoint holds and a resume restores, and who holds it (rank 0, or every rank's shards)."""

    trained_model: nn.Module  # what the method saves (the model without DDP/FSDP wrappers)
    method: Method
    trainable: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    group: ProcessGroup
    fsdp: bool
    record: dict
    steps: int
    config: GlmtuneConfig
    fingerprint: dict
    run_id: str | None = None


def _resume(state: _TrainingState, checkpoint: Path) -> int:
    """Load the trained tensors, optimizer, scheduler and RNG state of ``checkpoint``; return its step."""
    if is_sharded_checkpoint(checkpoint):  # written by FSDP ranks; resharded to this run's processes
        check_sharded_index(checkpoint)
        load_sharded(state.trained_model, state.optimizer, checkpoint, list(state.trainable))
    else:
        if state.fsdp:
            load_model_state(state.trained_model, state.method.read_state(checkpoint))
        else:
            state.method.restore(state.trained_model, checkpoint)
        load_optimizer_state(state.trained_model, state.optimizer, load_state(checkpoint / "optimizer.pt"))
    state.scheduler.load_state_dict(load_state(checkpoint / "scheduler.pt"))
    _apply_optimizer_settings(state)
    rng_states = load_state(checkpoint / "rng_state.pt")
    # One state per rank; resumed on more ranks than were saved, the extra ranks take rank 0's.
    group = state.group
    set_rng_state(rng_states[group.rank] if group.rank < len(rng_states) else rng_states[0])
    step = read_trainer_state(checkpoint)["global_step"]
    logger.info("resuming from %s at step %d", checkpoint, step)
    return step


def _apply_optimizer_settings(state: _TrainingState) -> None:
    """This run's --learning_rate and --weight_decay over the checkpoint's (a no-op when they are unchanged):
    the optimizer and scheduler states restore the values they were created with."""
    scheduler, config = state.scheduler, state.config
    scheduler.base_lrs = [config.learning_rate] * len(state.optimizer.param_groups)
    for index, param_group in enumerate(state.optimizer.param_groups):
        param_group["initial_lr"] = config.learning_rate
        param_group["weight_decay"] = config.weight_decay
        param_group["lr"] = config.learning_rate * scheduler.lr_lambdas[index](scheduler.last_epoch)
    scheduler._last_lr = [param_group["lr"] for param_group in state.optimizer.param_groups]


def _write_checkpoint(state: _TrainingState, folder: Path, step: int, log_window: list, log_history: list) -> None:
    """Called by every rank. With FSDP each rank writes its shards of the trained tensors and optimizer
    state (no gather); otherwise rank 0 writes them whole. Rank 0 writes the rest."""
    group = state.group
    rng_states = group.gather(rng_state())
    if state.fsdp:
        save_sharded(state.trained_model, state.optimizer, folder, list(state.trainable))
    else:
        optimizer_states = optimizer_state(state.trained_model, state.optimizer)
        if group.is_main:
            state.method.save(state.trained_model, folder)
            torch.save(optimizer_states, folder / "optimizer.pt")
    if group.is_main:
        torch.save(state.scheduler.state_dict(), folder / "scheduler.pt")
        torch.save(rng_states, folder / "rng_state.pt")
        # HF Trainer's schema (global_step, log_history), so tools that read its trainer_state.json read this one;
        # log_window: the losses since the last logged step, so a resumed run logs the same first window.
        (folder / TRAINER_STATE).write_text(json.dumps({
            "global_step": step, "max_steps": state.steps, "log_history": log_history, "run_id": state.run_id,
            "fingerprint": state.fingerprint, "log_window": log_window}, indent=1))
        write_run_record(folder, state.record)


def _save_output(state: _TrainingState, tokenizer, output_dir: Path, result: TrainResult) -> None:
    """The final output: one ordinary folder, whatever the process count (FSDP shards are gathered to rank 0)."""
    final_model_state = gather_model_state(state.trained_model) if state.fsdp else None
    if not state.group.is_main:
        return
    # Written aside and moved in, glmtune.json last: a kill leaves the old output or one a rerun completes.
    temporary = output_dir / OUTPUT_TEMPORARY
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    state.method.save_output(state.trained_model, temporary, final_model_state)
    if state.method.name == "full":
        tokenizer.save_pretrained(str(temporary))
    (temporary / "train_results.json").write_text(json.dumps({
        "steps": state.steps, "final_loss": result.losses[-1] if result.losses else None,
        "train_runtime": result.train_seconds, "eval_losses": result.eval_losses,
    }, indent=2))
    write_run_record(temporary, {**state.record, "steps": state.steps})
    publish_output(temporary, output_dir)


def _check_weights(state: _TrainingState, batch: dict | None, autocast, step: int) -> None:
    """Before any save: the trained tensors are finite, and so are the logits of one row of ``batch`` with
    them (1e30 weights are finite, their outputs are not). Eval mode: no dropout, so the RNG stream, and
    with it an exact resume, is untouched."""
    probe_loss = None
    if batch is not None:
        model = state.trained_model
        device = next(model.parameters()).device
        input_ids = next(value for key, value in batch.items() if key.endswith("input_ids"))[:1]
        model.eval()
        with torch.no_grad(), autocast:
            probe_loss = model(input_ids=_to_device(input_ids, device), use_cache=False).logits.float().abs().amax()
        model.train()
    check_trained_weights(state.trainable, probe_loss, step, state.group)


class _StepLosses:
    """Each step's loss (and metrics), kept on the device until ``collect`` reads them all in one sync.

    Reading a loss with ``.item()`` makes the CPU wait for the GPU to finish the step, and the GPU then
    idles while the CPU collates and queues the next one; so the loop reads them only at logging,
    evaluation and saving steps. A non-finite loss still stops the run, naming its step.
    """

    def __init__(self):
        self.pending: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []

    def add(self, step: int, loss: torch.Tensor, metrics: dict[str, torch.Tensor]) -> None:
        self.pending.append((step, loss.detach(), {k: v.detach() for k, v in metrics.items()}))

    def collect(self) -> list[tuple[float, dict[str, float]]]:
        if not self.pending:
            return []
        names = list(self.pending[0][2])
        values = torch.stack([torch.stack([loss, *(metrics[n] for n in names)]).float()
                              for _, loss, metrics in self.pending]).tolist()
        steps = [step for step, _, _ in self.pending]
        self.pending = []
        for step, (loss, *_) in zip(steps, values):
            if not math.isfinite(loss):
                raise GlmtuneError(f"loss is {loss} at step {step}; stopping (try a lower --learning_rate)")
        return [(loss, dict(zip(names, metrics))) for loss, *metrics in values]


def _accumulate(model: nn.Module, objective: Objective, batches: list[dict], scale: torch.Tensor | float, autocast,
                scaler, device) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Forward and backward of one step's micro-batches: the loss and metric sums on the device (no sync)
    and this rank's token count (counted on the CPU)."""
    step_loss, step_metrics, tokens = torch.zeros((), device=device), {}, 0
    for collated in batches:
        tokens += _token_count(collated)
        with autocast:
            loss_sum, metric_sums = objective.loss(model, {k: _to_device(v, device) for k, v in collated.items()})
        scaler.scale(loss_sum * scale).backward()
        step_loss += loss_sum.detach()
        for name, value in metric_sums.items():
            step_metrics[name] = step_metrics.get(name, 0) + value.detach()
    return step_loss, step_metrics, tokens


def _optimizer_step(optimizer, scheduler, scaler, parameters: list[nn.Parameter], max_grad_norm: float) -> None:
    if max_grad_norm:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


class _LogWindow:
    """The steps since the last logged one: their losses and metrics, and the tokens/s shown and logged."""

    def __init__(self, entries: list | None = None):
        self.entries: list[tuple[float, dict[str, float]]] = entries or []
        self.tokens, self.started = 0, time.perf_counter()

    def show(self, progress, last_loss: float | None, world_size: int) -> None:
        # Summing the ranks' tokens is a collective, done at logging steps only; in between the bar shows
        # an estimate from rank 0's tokens, labelled as one.
        rate_label = "tokens_per_s" if world_size == 1 else "tokens_per_s_est"
        postfix = {rate_label: f"{self.tokens * world_size / self._seconds():.0f}"}
        progress.set_postfix({"loss": f"{last_loss:.4f}", **postfix} if last_loss is not None else postfix)

    def log(self, step: int, loggers: Trackers | None, learning_rate: float, group, device) -> None:
        tokens_per_second = int(group.sum(torch.tensor(self.tokens, device=device))) / self._seconds()
        if loggers:
            values = {"loss": sum(loss for loss, _ in self.entries) / len(self.entries)}
            values.update({name: sum(m[name] for _, m in self.entries) / len(self.entries) for name in self.entries[0][1]})
            loggers.log(step, {**values, "learning_rate": learning_rate, "tokens_per_s": tokens_per_second})
        self.entries, self.tokens, self.started = [], 0, time.perf_counter()

    def _seconds(self) -> float:
        return max(time.perf_counter() - self.started, 1e-9)


def _without_cudnn_attention(function: Callable) -> Callable:
    """Run ``function`` with PyTorch's cuDNN attention backend off (the flag is process-wide, so it is restored).

    Why: cuDNN's SDPA builds a plan on the first step at each new padded length (+0.10-0.15 s each on an H200);
    with varying batch lengths that cost 0.7 of 6.4 s over 60 steps. Without it SDPA takes the flash or
    memory-efficient kernel, which need no per-shape setup: 15,095 -> 16,488 tokens/s wall on the same run
    (benchmarks/RESULTS.md, run 13).
    """

    @functools.wraps(function)
    def without_cudnn(*args, **kwargs):
        enabled = torch.backends.cuda.cudnn_sdp_enabled()
        torch.backends.cuda.enable_cudnn_sdp(False)
        try:
            return function(*args, **kwargs)
        finally:
            torch.backends.cuda.enable_cudnn_sdp(enabled)

    return without_cudnn


@_without_cudnn_attention
def train(
    model: nn.Module, tokenizer, method: Method, config: GlmtuneConfig, train_examples: list[Example],
    eval_examples: list[Example] | None = None, run_record: dict | None = None,
    generation_metrics: Callable[[nn.Module], dict[str, float]] | None = None,
    objective: Objective = SFTObjective(),
) -> TrainResult:
    """Train ``model`` (already prepared by ``method.apply``) on ``objective`` and save the result in
    ``config.output_dir``.

    ``generation_metrics(model)``, when given, runs at each evaluation next to the validation loss.
    """
    group = process_group()
    output_dir = check_output_dir(config) if group.is_main else Path(config.output_dir)
    group.barrier()
    device = next(model.parameters()).device
    dtype = compute_dtype(model, config)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16 and device.type == "cuda")
    _prepare_layers(model, config, dtype)
    # What the batches are decides it (stage pt ignores --packing: its blocks are packed documents).
    packed = isinstance(objective, SFTObjective) and objective.packing
    attention_after_training = _packed_attention(model, device) if packed else None
    fsdp = config.fsdp and group.world_size > 1
    if config.fsdp and method.name not in ("full", "freeze"):
        raise GlmtuneError("--fsdp is for full and freeze fine-tuning; LoRA and P-Tuning v2 train with DDP (drop --fsdp)")
    # Wrap before the optimizer exists: FSDP replaces the parameters with their shards.
    model = wrap(model, group, fsdp)  # `model` is what steps
    trained_model = unwrap(model)
    trainable = method.trainable_parameters(trained_model)
    parameters = list(trainable.values())
    if not parameters:
        raise GlmtuneError("the method left no trainable parameters")
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = total_steps(config, len(train_examples))
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps or math.ceil(config.warmup_ratio * steps),
                              num_training_steps=steps)
    record = {**(run_record or {}), "finetuning_type": method.name, "config": config.to_dict()}
    run_fingerprint = fingerprint(method.name, trainable, record.get("base_model"), examples_hash(train_examples))
    state = _TrainingState(trained_model, method, trainable, optimizer, scheduler, group, fsdp, record, steps, config,
                           run_fingerprint)
    window = _LogWindow()
    if config.resume_from_checkpoint:
        checkpoint, trainer_state = resolve_resume(output_dir, config.resume_from_checkpoint, run_fingerprint,
                                                   config.to_dict(), steps)
        start_step = _resume(state, checkpoint)
        state.run_id = trainer_state.get("run_id")
        window = _LogWindow([tuple(entry) for entry in trainer_state.get("log_window", [])])
        log_history = trainer_state.get("log_history", [])
        if group.is_main:
            truncate_log(output_dir / "train_log.jsonl", start_step)
    else:
        start_step, log_history = 0, []
        set_seed(config.seed + group.rank)  # ranks share the initial weights (DDP broadcasts) but not dropout
    if group.is_main:
        state.run_id = start_run(output_dir, state.run_id)
    state.run_id = group.gather(state.run_id)[0]
    group.barrier()

    loggers = Trackers(output_dir, config.report_to, start_step > 0, config.to_dict(), log_history) if group.is_main else None
    padding = pad_id(tokenizer)
    lengths = [objective.length(e) for e in train_examples] if config.group_by_length else None
    data_order = DataOrder(len(train_examples), config.per_device_train_batch_size * group.world_size, config.seed, lengths)
    accumulation = config.gradient_accumulation_steps
    eval_every = config.eval_steps or config.save_steps
    result = TrainResult(output_dir, steps)
    step_losses = _StepLosses()
    best = BestWeights() if config.load_best_model_at_end else None
    model.train()
    started = time.perf_counter()
    window.started = started
    batches = None
    progress = tqdm(total=steps, initial=start_step, desc="training", unit="step", disable=not group.is_main)
    try:
        for step in range(start_step + 1, steps + 1):
            batches = [objective.collate([train_examples[i] for i in data_order.batch(micro_index, group.rank, group.world_size)], padding)
                       for micro_index in range((step - 1) * accumulation, step * accumulation)]
            # The loss of a step is its sum over the units (answer tokens) of all micro-batches on all ranks
            # divided by their count, whatever the process count and accumulation; DDP averages over ranks.
            units = max(sum(objective.units(batch) for batch in batches), 1)
            if group.world_size > 1:  # on the device, as NCCL needs; the division below stays there too
                units = group.sum(_to_device(torch.tensor(float(units)), device))
            step_loss, step_metrics, tokens = _accumulate(model, objective, batches, group.world_size / units, autocast,
                                                          scaler, device)
            window.tokens += tokens
            step_losses.add(step, group.sum(step_loss) / units, {name: group.sum(value) / units for name, value in step_metrics.items()})
            _optimizer_step(optimizer, scheduler, scaler, parameters, config.max_grad_norm)
            progress.update(1)
            logging_step = step % config.logging_steps == 0 or step == steps
            # With --load_best_model_at_end the last step is evaluated too, so it can be the best.
            evaluation_step = bool(config.do_eval and eval_examples
                                   and ((eval_every and step % eval_every == 0) or (best is not None and step == steps)))
            saving_step = bool(config.save_steps and step % config.save_steps == 0)
            if logging_step or evaluation_step or saving_step:  # read the losses (one sync), check them before a save
                collected = step_losses.collect()
                result.losses.extend(loss for loss, _ in collected)
                window.entries.extend(collected)
            window.show(progress, result.losses[-1] if result.losses else None, group.world_size)
            if logging_step:
                window.log(step, loggers, scheduler.get_last_lr()[0], group, device)
            if evaluation_step:
                eval_loss = _evaluate(trained_model, model, eval_examples, config, padding, autocast, objective,
                                      generation_metrics, step, result, loggers, progress)
                if best is not None:
                    best.observe(step, eval_loss, trainable)
            if saving_step:
                _check_weights(state, batches[-1], autocast, step)
                save_checkpoint(output_dir, step, lambda folder: _write_checkpoint(state, folder, step, window.entries, loggers.history if loggers else []),
                                config.save_total_limit, group)
    finally:
        progress.close()
        if loggers:
            loggers.close()
    result.train_seconds = time.perf_counter() - started
    if attention_after_training:  # generation after training takes its usual path
        causal_lm(trained_model).set_attn_implementation(attention_after_training)
    if best is not None and best.restore(trainable, steps):
        logger.warning("--load_best_model_at_end: the output holds step %d's weights (validation loss %.4f)",
                       best.step, best.loss)
        state.record["best_step"] = best.step
    _check_weights(state, batches[-1] if batches else None, autocast, steps)
    _save_output(state, tokenizer, output_dir, result)
    if group.is_main and config.plot_loss:
        plot_loss(loggers.history, output_dir / "training_loss.png")
    return result


def _evaluate(trained_model: nn.Module, model: nn.Module, eval_examples: list[Example], config: GlmtuneConfig, padding: int,
              autocast, objective: Objective, generation_metrics, step: int, result: TrainResult, loggers, progress) -> float:
    eval_loss = evaluate_loss(trained_model, eval_examples, config.per_device_eval_batch_size or 8, padding, autocast, objective)
    result.eval_losses.append((step, eval_loss))
    values = {"eval_loss": eval_loss}
    if generation_metrics:
        with autocast:
            values.update({f"eval_{k}": v for k, v in generation_metrics(trained_model).items()})
        model.train()
    if loggers:
        loggers.log(step, values)
        progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return eval_loss
