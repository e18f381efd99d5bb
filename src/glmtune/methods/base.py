"""The one interface every fine-tuning method implements: apply, trainable parameters, save, restore."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError

TRAINABLE_FILE = "trainable_params.safetensors"


class Method:
    """A fine-tuning method. Subclasses set ``name`` and override ``apply``; saving defaults to the trained tensors."""

    name = ""

    def apply(self, model: nn.Module, config: GlmtuneConfig) -> nn.Module:
        """Prepare ``model`` for training: add adapters, set ``requires_grad``. Returns the model to train."""
        raise NotImplementedError

    def trainable_parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return {name: p for name, p in model.named_parameters() if p.requires_grad}

    def save(self, model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write only what this method trains. ``state_dict``: the full tensors, when the model is sharded (FSDP)."""
        trained = self.trainable_parameters(model)
        source = state_dict if state_dict is not None else {name: p.detach() for name, p in trained.items()}
        save_file({name: source[name].contiguous().cpu() for name in trained}, str(Path(directory) / TRAINABLE_FILE))

    def save_output(self, model: nn.Module, directory: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the final result of training; by default what ``save`` writes for a checkpoint."""
        if state_dict is None:
            self.save(model, directory)  # LoRA and P-Tuning v2 take no state_dict: they are never sharded
        else:
            self.save(model, directory, state_dict=state_dict)

    def read_state(self, directory: Path) -> dict[str, torch.Tensor]:
        """What ``save`` wrote, under the model's parameter names."""
        return load_file(str(Path(directory) / TRAINABLE_FILE))

    def restore(self, model: nn.Module, directory: Path) -> None:
        """Load saved trained tensors into a model that ``apply`` has prepared."""
        state = self.read_state(directory)
        parameters = dict(model.named_parameters())
        unknown = set(state) - set(parameters)
        if unknown:
            raise ValueError(f"{directory}: tensors not in this model: {sorted(unknown)[:3]}")
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)

    def load(self, model: nn.Module, directory: Path, config: GlmtuneConfig) -> nn.Module:
        """The base ``model`` with the trained tensors from ``directory``, ready for inference."""
        model = self.apply(model, config)
        self.restore(model, directory)
        return model.eval()

    @contextlib.contextmanager
    def base_view(self, model: nn.Module) -> Iterator[nn.Module | None]:
        """The base model under what this method added, without a copy (DPO's reference model); None
        where training overwrites the base's own weights (freeze, full)."""
        yield None


def upcast_trainable(model: nn.Module) -> None:
    """Trainable tensors in float32, so AdamW updates are not lost to bf16 rounding; autocast handles the mix."""
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()


def additional_targets(model: nn.Module, spec: str | None) -> list[str]:
    """The module names of ``--additional_target`` (e.g. ``embed_tokens,lm_head``), each checked to exist."""
    if not spec:
        return []
    names = [name.strip() for name in spec.split(",") if name.strip()]
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [name for name in names if name not in present]
    if missing:
        raise GlmtuneError(f"--additional_target {','.join(missing)}: no such module in {type(model).__name__}")
    return names


def train_additional_targets(model: nn.Module, names: list[str]) -> None:
    """Make the named modules trainable in full (freeze's ``--additional_target``)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in names:
            module.requires_grad_(True)
