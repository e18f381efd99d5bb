"""Several processes (``torchrun --nproc_per_node N glmtune train ...``): PyTorch DDP or FSDP2, rank-0 I/O.

glmtune adds no distributed machinery of its own: ``torch.distributed`` runs the processes and DDP
averages the gradients. One process (no ``WORLD_SIZE``) runs the same code with nothing to reduce.
Sharded (FSDP) checkpoints are written by every rank with ``torch.distributed.checkpoint`` (DCP).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class ProcessGroup:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            torch_dist.all_reduce(value)
        return value

    def gather(self, value) -> list:
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        torch_dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            torch_dist.barrier()


def process_group() -> ProcessGroup:
    """Join the process group torchrun describes in the environment (once), or run alone."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ProcessGroup()
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return ProcessGroup(torch_dist.get_rank(), world_size)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def wrap(model: nn.Module, group: ProcessGroup, fsdp: bool = False) -> nn.Module:
    """DDP over the trainable parameters, or FSDP2 (``fully_shard`` per transformer layer, then the whole
    model) when parameters, gradients and optimizer state must be split across processes."""
    if group.world_size == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        from glmtune.models.introspect import decoder_layers

        for layer in decoder_layers(model):
            fully_shard(layer)
        return fully_shard(model)
    device = next(model.parameters()).device
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def gather_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter in full on rank 0 (a collective: all ranks call it). For sharded (FSDP) models."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter names, in full: loadable at any process count (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options())


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options(strict=False))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_full_options())


def is_sharded_checkpoint(folder: Path) -> bool:
    """Whether ``folder`` was written by ``save_sharded`` (DCP writes its index to ``.metadata``)."""
    return (Path(folder) / ".metadata").is_file()


def _sharded_states(model: nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))
    return {"model": {name: model_state[name] for name in names}, "optimizer": optim_state}


def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, names: list[str]) -> None:
    """The tensors ``names`` and the optimizer state, each rank writing its own shards into ``folder``: no gather.

    A collective: every rank calls it with the same folder. Keys are parameter names, so
    ``load_sharded`` reshards them to any process count.
    """
    import torch.distributed.checkpoint as dcp

    dcp.save(_sharded_states(model, optimizer, names), checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path, names: list[str]) -> None:
    """Read a ``save_sharded`` checkpoint into this run's (sharded or whole) model and optimizer.

    Works at any process count, a lone process without a process group included: each rank reads
    the parts of the saved shards that its own tensors cover.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    states = _sharded_states(model, optimizer, names)  # this run's tensors, filled in place
    dcp.load(states, checkpoint_id=str(folder))
    set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"],
                   options=StateDictOptions(full_state_dict=False, strict=False))
