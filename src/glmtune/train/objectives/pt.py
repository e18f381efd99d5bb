"""Continued pre-training (``--stage pt``): next-token cross-entropy on every token of packed text blocks.

The blocks come from ``glmtune.data.pretrain`` with their labels equal to their inputs, so the loss is
SFT's label loss (label rows only, chunked) over the whole block; only the stage's name and its data
differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.train.objectives.sft import SFTObjective


@dataclass(frozen=True)
class PretrainObjective(SFTObjective):
    name: str = "pt"
