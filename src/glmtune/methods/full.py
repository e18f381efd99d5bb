"""Full fine-tuning: every parameter trains; saves a complete transformers folder."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods.base import Method, upcast_trainable
from glmtune.models.introspect import parameter_dtype
from glmtune.models.quantization import is_quantized


class FullMethod(Method):
    name = "full"
    output_dtype: torch.dtype | None = None  # the dtype the model was loaded in, set by apply

    def apply(self, model: nn.Module, config: GlmtuneConfig) -> nn.Module:
        if is_quantized(model):
            raise GlmtuneError("--finetuning_type full trains every weight; it cannot use --quantization_bit")
        model.requires_grad_(True)
        self.output_dtype = parameter_dtype(model)
        upcast_trainable(model)
        return model

    def save(self, model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        model.save_pretrained(str(directory), state_dict=state_dict)

    def save_output(self, model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """The trained weights in the dtype the model was loaded in: training keeps float32 copies (and
        checkpoints keep them, for an exact resume), but a bf16 base gives a bf16 output, half the size."""
        dtype = self.output_dtype
        if dtype is None or dtype == torch.float32:
            return self.save(model, directory, state_dict=state_dict)
        state = state_dict if state_dict is not None else model.state_dict()
        self.save(model, directory, state_dict={name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()})
        model.config.dtype = dtype  # save_pretrained recorded the float32 training weights' dtype
        model.config.save_pretrained(str(directory))

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
