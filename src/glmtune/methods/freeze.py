"""Freeze: train only chosen parts of the last N transformer layers; everything else stays frozen."""

from __future__ import annotations

from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods.base import Method, additional_targets, train_additional_targets, upcast_trainable
from glmtune.models.introspect import decoder_layers
from glmtune.models.quantization import dequantize

MLP_NAMES = ("mlp", "feed_forward", "ffn")


def _chosen_modules(layer: nn.Module, spec: str) -> list[nn.Module]:
    if spec == "all":
        return [layer]
    children = dict(layer.named_children())
    names = MLP_NAMES if spec == "mlp" else tuple(s.strip() for s in spec.split(","))
    chosen = [children[n] for n in names if n in children]
    if not chosen:
        raise GlmtuneError(f"--freeze_trainable_modules {spec}: the layers have only {', '.join(children)}")
    return chosen


class FreezeMethod(Method):
    name = "freeze"

    def apply(self, model: nn.Module, config: GlmtuneConfig) -> nn.Module:
        layers = decoder_layers(model)
        count = config.freeze_trainable_layers
        if not 1 <= count <= len(layers):
            raise GlmtuneError(f"--freeze_trainable_layers must be between 1 and {len(layers)}")
        model.requires_grad_(False)
        for layer in layers[len(layers) - count :]:
            for module in _chosen_modules(layer, config.freeze_trainable_modules):
                dequantize(module)  # on a quantized base the trained parts train in full precision
                module.requires_grad_(True)
        train_additional_targets(model, additional_targets(model, config.additional_target))
        upcast_trainable(model)
        return model
