"""--quantization_bit 4|8: the frozen base's decoder-layer linears hold 8-bit or 4-bit weights.

Our own weight-only quantization in plain PyTorch rather than bitsandbytes or torchao, chosen by
measurement (``benchmarks/QUANTIZATION.md``): the same code on CPU and CUDA with no extra package
(the GPU machine has neither library), any ``nn.Linear`` (native ChatGLM and transformers models
alike), and no inference-layout repacking that silently stops gradients (bitsandbytes on CPU).

- 8 bits: int8 with one absmax scale per output row, as ChatGLM's own ``quantize(8)``.
- 4 bits: NF4 codes (QLoRA's 16 normal-quantile levels), two per byte, one absmax scale per group of
  64 inputs, as bitsandbytes' NF4 with blocksize 64 (a row whose length 64 does not divide is one group).

A ``QuantizedLinear`` is an ``nn.Linear`` subclass, so PEFT's LoRA wraps it like any linear and
glmtune's module lookups see it. Its ``weight`` is an integer buffer, not a parameter: nothing can
train it, and optimizers and dtype lookups over ``parameters()`` never meet it. Forward and backward
each dequantize the weight for the one matmul; the autograd function saves no dequantized weight, so
a training step holds 8-bit or 4-bit weights, not bf16 copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.errors import GlmtuneError
from glmtune.models.introspect import decoder_layers

BITS = (4, 8)
GROUP_SIZE = 64
# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E), the values bitsandbytes uses.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171066284, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)


def nf4_pairs() -> torch.Tensor:
    """[256, 2]: the two NF4 levels a packed byte holds (low nibble first), so unpacking is one lookup."""
    levels = torch.tensor(NF4_LEVELS)
    codes = torch.arange(256)
    return torch.stack([levels[codes & 15], levels[codes >> 4]], dim=-1)


def group_size(in_features: int) -> int:
    return GROUP_SIZE if in_features % GROUP_SIZE == 0 else in_features


def quantized_nbytes(out_features: int, in_features: int, bits: int) -> int:
    """Bytes a quantized ``[out, in]`` weight takes: codes plus float32 scales."""
    if bits == 8:
        return out_features * in_features + 4 * out_features
    return out_features * in_features // 2 + 4 * out_features * (in_features // group_size(in_features))


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, float32 scales) of a ``[out, in]`` weight; ``dequantize_weight`` inverts it up to the step."""
    weight = weight.detach().float()
    if bits == 8:
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        codes = torch.round(weight / scale.clamp(min=torch.finfo(torch.float32).tiny)).to(torch.int8)
        return codes, scale
    out_features, in_features = weight.shape
    groups = weight.view(out_features, -1, group_size(in_features))
    scale = groups.abs().amax(dim=-1, keepdim=True)
    normalized = groups / scale.clamp(min=torch.finfo(torch.float32).tiny)
    levels = torch.tensor(NF4_LEVELS, device=weight.device)
    # Nearest level: levels are sorted, so compare with the midpoints between neighbours.
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2).to(torch.uint8).view(out_features, in_features)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed, scale.squeeze(-1)


def dequantize_weight(
    codes: torch.Tensor, scale: torch.Tensor, bits: int, dtype: torch.dtype, pairs: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``[out, in]`` weight in ``dtype``; ``pairs``: ``nf4_pairs()`` on the codes' device (4 bits)."""
    if bits == 8:
        return codes.to(dtype) * scale.to(dtype)
    out_features = codes.shape[0]
    pairs = (nf4_pairs() if pairs is None else pairs).to(device=codes.device, dtype=dtype)
    values = F.embedding(codes.int(), pairs).view(out_features, scale.shape[1], -1)
    return (values * scale.to(dtype).unsqueeze(-1)).view(out_features, -1)


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` for a frozen quantized ``W``: backward dequantizes again instead of saving ``W``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        ctx.module, ctx.dtype, ctx.input_dtype = module, dtype, x.dtype
        with torch.autocast(device_type, enabled=False):
            return F.linear(x.to(dtype), module.dequantize(dtype))

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight = ctx.module.dequantize(ctx.dtype)
        return (grad_output.to(ctx.dtype) @ weight).to(ctx.input_dtype), None


class QuantizedLinear(nn.Linear):
    """A frozen linear layer with int8 (8 bits) or packed NF4 (4 bits) weights."""

    def __init__(self, linear: nn.Linear, bits: int):
        nn.Module.__init__(self)
        if bits == 4 and linear.in_features % 2:
            raise GlmtuneError(f"--quantization_bit 4 packs weights in pairs; {linear.in_features} inputs is odd")
        self.in_features, self.out_features, self.bits = linear.in_features, linear.out_features, bits
        self.original_dtype = linear.weight.dtype
        codes, scale = quantize_weight(linear.weight, bits)
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)
        # Kept on the module so that it follows the model's device and torch.compile sees a tensor.
        self.register_buffer("nf4_pairs", nf4_pairs() if bits == 4 else None, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, self.bits, dtype, self.nf4_pairs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A full-precision weight (a full fine-tune loaded onto a quantized base) is quantized on the way in.
        weight = state_dict.get(prefix + "weight")
        if weight is not None and weight.is_floating_point():
            state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(weight, self.bits)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = _QuantizedMatmul.apply(x, self)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


def quantize_model(model: nn.Module, bits: int, device: torch.device | str | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` inside the decoder layers by a ``QuantizedLinear``, in place.

    Embeddings, the LM head and anything outside the layers stay as they are (as ChatGLM's and
    bitsandbytes' quantization leave them). With ``device``, each layer is moved there before it is
    quantized, so the full-precision model never has to fit on the device.
    """
    if bits not in BITS:
        raise GlmtuneError(f"--quantization_bit must be 4 or 8, got {bits}")
    for layer in decoder_layers(model):
        if device is not None:
            layer.to(device)
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear:
                    setattr(parent, name, QuantizedLinear(child, bits))
    return model


def dequantize(module: nn.Module) -> nn.Module:
    """Turn every ``QuantizedLinear`` in ``module`` back into an ``nn.Linear`` (with the rounded weights), in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.original_dtype)
                linear.weight.data = child.dequantize(child.original_dtype)
                if child.bias is not None:
                    linear.bias.data = child.bias.data
                setattr(parent, name, linear)
    return module


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model as loaded, counting each quantized weight (a buffer, not a parameter) once."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return sum(p.numel() for p in model.parameters()) + quantized
