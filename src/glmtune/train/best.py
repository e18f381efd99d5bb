"""--load_best_model_at_end: keep a copy of the trained tensors at the evaluation with the lowest validation loss.

A copy in CPU memory of only what the method trains (a LoRA adapter or a prefix is a few MB), so the end of the
run restores it without re-reading a checkpoint and without needing --save_steps to line up with --eval_steps.
"""

from __future__ import annotations

import torch
from torch import nn


class BestWeights:
    def __init__(self) -> None:
        self.step: int | None = None
        self.loss = float("inf")
        self._tensors: dict[str, torch.Tensor] = {}

    def observe(self, step: int, loss: float, trainable: dict[str, nn.Parameter]) -> None:
        if loss < self.loss:
            self.step, self.loss = step, loss
            self._tensors = {name: p.detach().to("cpu", copy=True) for name, p in trainable.items()}

    @torch.no_grad()
    def restore(self, trainable: dict[str, nn.Parameter], last_step: int) -> bool:
        """Copy the best tensors back; False when the last step was the best (nothing to do)."""
        if self.step is None or self.step == last_step:
            return False
        for name, parameter in trainable.items():
            parameter.copy_(self._tensors[name].to(parameter.device))
        return True
