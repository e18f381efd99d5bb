"""Full fine-tuning: every parameter trains; saves a complete transformers folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods.base import Method, upcast_trainable
from glmtune.models.quantization import is_quantized


class FullMethod(Method):
    name = "full"

    def apply(self, model: nn.Module, config: GlmtuneConfig) -> nn.Module:
        if is_quantized(model):
            raise GlmtuneError("--finetuning_type full trains every weight; it cannot use --quantization_bit")
        model.requires_grad_(True)
        upcast_trainable(model)
        return model

    def save(self, model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model.save_pretrained(str(directory), state_dict=state_dict)

    def read_state(self, directory: Path) -> dict[str, torch.Tensor]:
        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise ValueError(f"{directory}: no safetensors weights")
        state = {}
        for file in files:
            state.update(load_file(str(file)))
        return state

    def restore(self, model: nn.Module, directory: Path) -> None:
        # Tied weights (e.g. an lm_head tied to the embeddings) are saved once; the rest must all be there.
        result = model.load_state_dict(self.read_state(directory), strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{directory}: tensors not in this model: {result.unexpected_keys[:3]}")

    def load(self, model: nn.Module, directory: Path, config: GlmtuneConfig) -> nn.Module:
        self.restore(model, directory)
        return model.eval()
