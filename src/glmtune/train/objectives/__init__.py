"""Training objectives: what one training stage computes, beside the one training loop.

A stage (supervised fine-tuning, pre-training, preference optimization) is a small object the loop
calls, never a second trainer. The loop owns batching order, devices, autocast, scaling, the optimizer,
logging and checkpoints; an objective owns how examples become tensors and what the loss is.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from glmtune.errors import GlmtuneError
from glmtune.train.objectives.dpo import DPOObjective
from glmtune.train.objectives.pt import PretrainObjective
from glmtune.train.objectives.sft import SFTObjective


class Objective(Protocol):
    """What the training loop needs from a stage.

    ``collate`` returns CPU tensors; keys ending in ``attention_mask`` mark the real (non-pad) tokens,
    which the loop counts for its tokens/s. ``units`` counts, on the CPU, what the loss averages over.
    ``loss`` runs inside the loop's autocast on the device batch and returns the loss and metrics
    SUMMED over the batch's units, as device tensors, without synchronizing with the device: the loop
    divides by the step's global unit count (all ranks, all micro-batches) and logs ``metric / units``.
    """

    name: str

    def length(self, example: Any) -> int: ...

    def collate(self, examples: list, pad_id: int) -> dict[str, torch.Tensor]: ...

    def units(self, batch: dict[str, torch.Tensor]) -> int: ...

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...


OBJECTIVES: dict[str, type] = {"sft": SFTObjective, "pt": PretrainObjective, "dpo": DPOObjective}


def get_objective(stage: str) -> Objective:
    if stage not in OBJECTIVES:
        raise GlmtuneError(f"--stage {stage}: unknown training stage (choose from {', '.join(OBJECTIVES)})")
    return OBJECTIVES[stage]()


__all__ = ["OBJECTIVES", "DPOObjective", "Objective", "PretrainObjective", "SFTObjective", "get_objective"]
