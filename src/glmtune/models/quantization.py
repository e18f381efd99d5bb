"""--quantization_bit 4|8: the frozen base's decoder-layer linears hold 8-bit or 4-bit weights,
its input embedding and (untied) LM head int8 weights.

Our own weight-only quantization in plain PyTorch rather than bitsandbytes or torchao, chosen by
measurement (``benchmarks/QUANTIZATION.md``): the same code on CPU and CUDA with no extra package
(the GPU machine has neither library), any ``nn.Linear`` (native ChatGLM and transformers models
alike), and no inference-layout repacking that silently stops gradients (bitsandbytes on CPU).

- 8 bits: int8 with one absmax scale per output row, as ChatGLM's own ``quantize(8)``.
- 4 bits: NF4 codes (QLoRA's 16 normal-quantile levels), two per byte, one absmax scale per group of
  64 inputs, as bitsandbytes' NF4 with blocksize 64 (a row whose length 64 does not divide is one group).
  The scales are stored in the base's half dtype when it has one (float32 scales would add 1/16 byte
  per weight: 0.16 GiB on ChatGLM-6B).
- Vocabulary matrices (``--quantize_embeddings``, on by default): int8 per row at either setting. On
  ChatGLM-6B they are 1.0 GiB each in bf16, as much as 14 of its 28 INT4 layers; bitsandbytes and
  ChatGLM's ``quantize`` leave them in bf16, which is why their INT4 runs need over 5 GiB. A lookup
  dequantizes only the rows it reads; the LM head dequantizes a slice of rows at a time. Only a plain
  ``nn.Embedding`` and an ``nn.Linear`` head that does not share its weight are converted (Gemma's
  scaled embedding and tied heads stay as they are).

A ``QuantizedLinear`` is an ``nn.Linear`` subclass, so PEFT's LoRA wraps it like any linear and
glmtune's module lookups see it. Its ``weight`` is an integer buffer, not a parameter: nothing can
train it, and optimizers and dtype lookups over ``parameters()`` never meet it. Forward and backward
each dequantize the weight for the one matmul; the autograd function saves no dequantized weight, so
a training step holds 8-bit or 4-bit weights, not bf16 copies. On CUDA the dequantization is one
``torch.compile``d kernel per weight (eager, it is three kernels and two full-size temporaries).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from glmtune.errors import GlmtuneError
from glmtune.models.introspect import decoder_layers

BITS = (4, 8)
GROUP_SIZE = 64
VOCABULARY_BITS = 8
# Dequantize at most this many weights at once (128 MiB in bf16): an LM head of 130k rows goes in slices.
CHUNK_ELEMENTS = 2**26
COMPILE_ON_CUDA = True  # benchmarks/quantization_memory.py --eager_dequantize turns it off to compare
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


def rows_per_slice(in_features: int) -> int:
    """How many rows of a weight with ``in_features`` inputs are dequantized at once (``CHUNK_ELEMENTS``)."""
    return max(1, CHUNK_ELEMENTS // in_features)


def scale_dtype(weight_dtype: torch.dtype, bits: int) -> torch.dtype:
    """4-bit group scales take the base's half dtype; 8-bit row scales (one per row: negligible) stay float32."""
    return weight_dtype if bits == 4 and weight_dtype in (torch.bfloat16, torch.float16) else torch.float32


def quantized_nbytes(out_features: int, in_features: int, bits: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes a quantized ``[out, in]`` weight of base dtype ``dtype`` takes: codes plus scales."""
    scale_bytes = torch.empty(0, dtype=scale_dtype(dtype, bits)).element_size()
    if bits == 8:
        return out_features * in_features + scale_bytes * out_features
    return out_features * in_features // 2 + scale_bytes * out_features * (in_features // group_size(in_features))


def quantize_weight(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, scales) of a ``[out, in]`` weight; ``dequantize_weight`` inverts it up to the step."""
    stored_scale = scale_dtype(weight.dtype, bits)
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
    return packed, scale.squeeze(-1).to(stored_scale)


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


@functools.cache
def _compiled_dequantize_weight():
    # Static shapes: one specialized kernel per weight shape (a model has a handful). With dynamic shapes
    # the kernels index with symbolic sizes and, on the H200, ran slower than the three eager kernels.
    return torch.compile(dequantize_weight, dynamic=False)


def _dequantizer(device: torch.device):
    """The fused (compiled) dequantization on CUDA with Triton, else the eager one (CPU: tests and demos)."""
    if device.type == "cuda" and COMPILE_ON_CUDA:
        from torch.utils._triton import has_triton

        if has_triton():
            return _compiled_dequantize_weight()
    return dequantize_weight


# Inputs of at most this many rows (decoding a few sequences) take the batch-1 kernel on CUDA
# (models/quantized_matvec.py), which reads the packed weight once: batch-1 decoding with the separate
# dequantize kernel wrote and re-read a full bf16 copy of every weight per token.
MATVEC_ROWS = 4


def _use_matvec(x: torch.Tensor, in_features: int) -> bool:
    return (x.device.type == "cuda" and COMPILE_ON_CUDA and not torch.is_grad_enabled()
            and x.numel() // in_features <= MATVEC_ROWS and _dequantizer(x.device) is not dequantize_weight)


class _QuantizedMatmul(torch.autograd.Function):
    """``x @ W.T`` for a frozen quantized ``W``: backward dequantizes again instead of saving ``W``.

    A weight larger than ``CHUNK_ELEMENTS`` (an LM head) is dequantized and multiplied a slice of rows
    at a time, so no full-precision copy of it ever exists.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: QuantizedLinear) -> torch.Tensor:
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        ctx.module, ctx.dtype, ctx.input_dtype = module, dtype, x.dtype
        x = x.to(dtype)
        with torch.autocast(device_type, enabled=False):
            slices = module.row_slices()
            if len(slices) == 1:
                return F.linear(x, module.dequantize(dtype))
            return torch.cat([F.linear(x, module.dequantize(dtype, rows)) for rows in slices], dim=-1)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        module, grad_output = ctx.module, grad_output.to(ctx.dtype)
        grad_input = None
        for rows in module.row_slices():
            part = grad_output[..., rows] @ module.dequantize(ctx.dtype, rows)
            grad_input = part if grad_input is None else grad_input.add_(part)
        return grad_input.to(ctx.input_dtype), None


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
        # Kept on the module so that they follow the model's device and torch.compile sees tensors.
        self.register_buffer("nf4_pairs", nf4_pairs() if bits == 4 else None, persistent=False)
        self.register_buffer("nf4_levels", torch.tensor(NF4_LEVELS) if bits == 4 else None, persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def row_slices(self) -> list[slice]:
        rows = rows_per_slice(self.in_features)
        return [slice(start, start + rows) for start in range(0, self.out_features, rows)]

    def dequantize(self, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
        """The weight (or the slice ``rows`` of its rows) in ``dtype``."""
        return _dequantizer(self.weight.device)(self.weight[rows], self.weight_scale[rows], self.bits, dtype, self.nf4_pairs)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _quantize_loaded_weight(state_dict, prefix, self.bits, self.original_dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _use_matvec(x, self.in_features):
            from glmtune.models.quantized_matvec import quantized_matvec

            if self.nf4_levels is not None and self.nf4_levels.device != x.device:  # made after the move to the GPU
                self.nf4_levels = self.nf4_levels.to(x.device)
            rows = x.reshape(-1, self.in_features)
            output = quantized_matvec(rows, self.weight, self.weight_scale, self.bits, self.nf4_levels)
            output = output.view(*x.shape[:-1], self.out_features)
        else:
            output = _QuantizedMatmul.apply(x, self)
        return output if self.bias is None else output + self.bias.to(output.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


class QuantizedEmbedding(nn.Embedding):
    """A frozen embedding table with int8 rows and one float32 scale per row; a lookup dequantizes only its rows."""

    def __init__(self, embedding: nn.Embedding):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = embedding.padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.original_dtype = embedding.weight.dtype
        codes, scale = quantize_weight(embedding.weight, VOCABULARY_BITS)
        self.register_buffer("weight", codes)
        self.register_buffer("weight_scale", scale)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, VOCABULARY_BITS, dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        _quantize_loaded_weight(state_dict, prefix, VOCABULARY_BITS, self.original_dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids, self.weight).float() * F.embedding(input_ids, self.weight_scale)
        return rows.to(self.original_dtype)


def _quantize_loaded_weight(state_dict: dict, prefix: str, bits: int, dtype: torch.dtype) -> None:
    """A full-precision weight loaded into a quantized module (a full fine-tune onto a quantized base) is
    quantized on the way in."""
    weight = state_dict.get(prefix + "weight")
    if weight is not None and weight.is_floating_point():
        state_dict[prefix + "weight"], state_dict[prefix + "weight_scale"] = quantize_weight(weight.to(dtype), bits)


def vocabulary_modules(model: nn.Module) -> list[str]:
    """Names of the input embedding and the LM head when ``quantize_model`` can store them as int8: a plain
    ``nn.Embedding`` and an ``nn.Linear`` head without bias whose weight it does not share."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = embedding is not None and head is not None and head.weight is embedding.weight
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    if type(embedding) is nn.Embedding and not tied and id(embedding) in names:
        found.append(names[id(embedding)])
    if type(head) is nn.Linear and head.bias is None and not tied and id(head) in names:
        found.append(names[id(head)])
    return found


def quantize_model(
    model: nn.Module, bits: int, device: torch.device | str | None = None, embeddings: bool = True
) -> nn.Module:
    """Replace every ``nn.Linear`` inside the decoder layers by a ``QuantizedLinear`` of ``bits``, in place,
    and with ``embeddings`` the input embedding and LM head (``vocabulary_modules``) by int8 ones.

    Norms, biases and anything else stay as they are. With ``device``, each module is moved there before
    it is quantized, so the full-precision model never has to fit on the device.
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
    for name in vocabulary_modules(model) if embeddings else []:
        module = model.get_submodule(name)
        if device is not None:
            module.to(device)
        quantized = QuantizedEmbedding(module) if isinstance(module, nn.Embedding) else QuantizedLinear(module, VOCABULARY_BITS)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, quantized)
    return model


def dequantize(module: nn.Module) -> nn.Module:
    """Turn every ``QuantizedLinear`` and ``QuantizedEmbedding`` in ``module`` back into an ``nn.Linear`` or
    ``nn.Embedding`` (with the rounded weights), in place."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QuantizedEmbedding):
                embedding = nn.Embedding(child.num_embeddings, child.embedding_dim, child.padding_idx,
                                         device=child.weight.device, dtype=child.original_dtype)
                embedding.weight.data = child.dequantize(child.original_dtype)
                setattr(parent, name, embedding)
            elif isinstance(child, QuantizedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight.device, dtype=child.original_dtype)
                linear.weight.data = child.dequantize(child.original_dtype)
                if child.bias is not None:
                    linear.bias.data = child.bias.data
                setattr(parent, name, linear)
    return module


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (QuantizedLinear, QuantizedEmbedding)) for m in model.modules())


def parameter_count(model: nn.Module) -> int:
    """Parameters of the model as loaded, counting each quantized weight (a buffer, not a parameter) once."""
    quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantizedLinear))
    quantized += sum(m.weight.numel() for m in model.modules() if isinstance(m, QuantizedEmbedding))
    return sum(p.numel() for p in model.parameters()) + quantized
