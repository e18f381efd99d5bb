"""``--fp8``: the frozen base's linear layers compute in FP8 (e4m3) with row-wise scales.

Why: a frozen-base fine-tune (LoRA, P-Tuning v2, freeze) spends most of its time in the base's
matmuls, and Hopper/Ada tensor cores run FP8 at about twice the bf16 rate. Only frozen weights are
quantized, once; what trains (LoRA, prefixes, unfrozen layers) and the LM head stay in bf16/fp32.

Scales are per row on both sides of every product (``torch._scaled_mm`` row-wise scaling):
forward ``y = x · Wᵀ`` scales each token row of x and each output row of W; backward
``dx = dy · W`` scales each row of dy and each input column of W, so the weight is kept twice in
FP8 (as W and as Wᵀ, both 1 byte per value: the bf16 copy's memory) and no weight is dequantized.
A frozen weight needs no weight gradient, so there is no third product. The same code runs on the
CPU (``torch._scaled_mm`` has a CPU kernel), which is how the tests check it against bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from glmtune.errors import GlmtuneError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) in FP8 with one float32 scale per row: ``x ≈ fp8.float() * scale``."""
    amax = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


# The GEMM is a custom op with its own backward rather than an autograd.Function: dynamo failed to
# trace an autograd.Function over the FP8 casts inside a compiled layer under autocast (an internal
# AssertionError, torch 2.13). The row quantizations stay outside the op, as plain tensor code, so that
# inside a compiled layer inductor fuses each into one pass (run 10 had them inside the op, eager: six
# memory passes per GEMM made --fp8 slower than bf16).
@torch.library.custom_op("glmtune::fp8_matmul", mutates_args=())
def fp8_matmul(a: torch.Tensor, a_scale: torch.Tensor, b_rows: torch.Tensor, b_scale: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    """``a · Bᵀ`` for FP8 ``a`` [M, K] and B given as FP8 rows [N, K], with per-row scales [M, 1] and [N, 1]."""
    return torch._scaled_mm(a, b_rows.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=out_dtype)


@fp8_matmul.register_fake
def _(a, a_scale, b_rows, b_scale, out_dtype):
    return a.new_empty(a.shape[0], b_rows.shape[0], dtype=out_dtype)


@torch.library.custom_op("glmtune::fp8_linear", mutates_args=())
def fp8_linear(x: torch.Tensor, x_fp8: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
               weight_scale: torch.Tensor, weight_t: torch.Tensor, weight_t_scale: torch.Tensor) -> torch.Tensor:
    """``x · Wᵀ`` from ``x``'s FP8 rows; ``x`` itself only carries the gradient, ``weight_t`` (Wᵀ's FP8 rows) serves it."""
    return torch._scaled_mm(x_fp8, weight.t(), scale_a=x_scale, scale_b=weight_scale.t(), out_dtype=x.dtype)


@fp8_linear.register_fake
def _(x, x_fp8, x_scale, weight, weight_scale, weight_t, weight_t_scale):
    return x.new_empty(x.shape[0], weight.shape[0])


def _keep_transpose(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[5], inputs[6])


def _input_gradient(ctx, grad_output: torch.Tensor):
    weight_t, weight_t_scale = ctx.saved_tensors
    grad_fp8, grad_scale = quantize_rows(grad_output)
    # A frozen weight needs no gradient: dx = dy · W is the only backward product.
    return fp8_matmul(grad_fp8, grad_scale, weight_t, weight_t_scale, grad_output.dtype), None, None, None, None, None, None


fp8_linear.register_autograd(_input_gradient, setup_context=_keep_transpose)


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose matmuls run in FP8; inputs and outputs keep the compute dtype."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = linear.in_features, linear.out_features, compute_dtype
        weight = linear.weight.detach()
        fp8, scale = quantize_rows(weight)
        fp8_t, scale_t = quantize_rows(weight.t())
        self.register_buffer("weight_fp8", fp8)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_t_fp8", fp8_t.contiguous())
        self.register_buffer("weight_t_scale", scale_t)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        with torch.no_grad():
            rows_fp8, rows_scale = quantize_rows(rows)
        out = fp8_linear(rows, rows_fp8, rows_scale, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3 row-wise"


def check_fp8_device(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise GlmtuneError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+: L4, RTX 40xx, H100/H200); {name} has none")


def convert_frozen_linears(layers: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every frozen plain ``nn.Linear`` inside ``layers`` by an ``Fp8Linear``; return how many.

    Linears that train (LoRA's A and B, unfrozen layers) and glmtune's int8/int4 ``QuantizedLinear``
    (an ``nn.Linear`` subclass) are left as they are. Sizes must be multiples of 16 (the FP8 kernels').
    """
    converted = 0
    for parent in list(layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and not child.weight.requires_grad:
                if child.in_features % 16 or child.out_features % 16:
                    continue  # FP8 GEMMs need multiples of 16; such a layer stays in bf16
                setattr(parent, name, Fp8Linear(child, compute_dtype))
                converted += 1
    return converted
