"""Supervised fine-tuning: cross-entropy on the answer tokens (labels that are not -100)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from glmtune.data.preprocess import IGNORE_INDEX, Example, collate, pack
from glmtune.train.loss import label_loss_sum, label_rows, supports_label_loss


@dataclass(frozen=True)
class SFTObjective:
    """``label_only=False`` lets the model compute its own loss (logits at every position): the slower
    path the label-only loss is checked against, and the one model types without it take.
    ``packing``: each batch is one row of its examples end to end (``data.preprocess.pack``)."""

    label_only: bool = True
    packing: bool = False
    name: str = "sft"

    def length(self, example: Example) -> int:
        return len(example.input_ids)

    def collate(self, examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
        batch = (pack if self.packing else collate)(examples, pad_id)
        # Found here, on the CPU: on the device, nonzero() would wait for the GPU in every step.
        batch["label_rows"] = label_rows(batch["labels"])
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # No KV cache in training: a checkpointed layer would append to it again when replayed.
        # No attention mask either: rows are right-padded, so under the causal mask no real token
        # sees a pad, and without a mask SDPA can take its fastest (flash) kernel.
        # Packed rows: the model finds each example's span from where position_ids restart.
        positions = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
        if self.label_only and supports_label_loss(model):
            return label_loss_sum(model, batch["input_ids"], batch["labels"], batch.get("label_rows"), **positions), {}
        outputs = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False, **positions)
        units = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()  # on the device: no sync
        return outputs.loss.float() * units, {}
