"""``--fp8``: the frozen base's linear layers compute in FP8 (e4m3) with row-wise scales.

Why: a frozen-base fine-tune (LoRA, P-Tuning v2, freeze) spends most of its time in the base's
matmuls, and Hopper/Ada tensor cores run FP8 at about twice the bf16 rate. Only frozen weights are
quantized, once; what trains (LoRA, prefixes, unfrozen layers) and the LM head stay in bf16/fp32.

Scales are per row on both sides of every product (``torch._scaled_mm`` row-wise scaling). Forward
``y = x · Wᵀ`` scales each token row of x and each output row of W. Backward ``dx = dy · W`` sums over
W's output rows, so W's row scales multiply dy's columns before dy's rows are quantized, and the one
FP8 copy of W is transposed for the product (Hopper's FP8 GEMMs take both operands K-major): the frozen
weights take half the bf16 copy's memory. A frozen weight needs no weight gradient, so there is no
third product. The same code runs on the CPU (``torch._scaled_mm`` has a CPU kernel), which is how the
tests check it against bf16.
"""

from __future__ import annotations

import torch
from torch import nn

from glmtune.errors import GlmtuneError

FP8 = torch.float8_e4m3fn


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (2-D) in FP8 with one float32 scale per row: ``x ≈ fp8.float() * scale``."""
    # 448.0 (e4m3's largest value) is written out rather than kept in a module-level constant: dynamo fails to
    # trace an autograd.Function that reads a module-level float ("lift_tracked_freevar_to_input should not be called on root SubgraphTracer",
    # torch 2.11-2.13).
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(FP8), scale


class Fp8LinearFunction(torch.autograd.Function):
    """``rows · Wᵀ`` in FP8, and the input gradient ``dy · W`` from the same FP8 W; a frozen W gets no gradient.

    An autograd.Function that dynamo traces, so inside a compiled layer inductor fuses each row quantization
    into one pass and calls ``torch._scaled_mm`` itself. It replaced two Python custom ops, which inductor
    cannot see through: same numbers (bit-identical on the CPU), and on the H200 19,224 tokens/s against the
    custom ops' 13,875 (benchmarks/RESULTS.md, runs 14 and 18; 17,857 against 16,247 in one run, run 17).
    """

    @staticmethod
    def forward(ctx, rows, weight, weight_scale, input_ones):
        rows_fp8, rows_scale = quantize_rows(rows)
        ctx.save_for_backward(weight, weight_scale, input_ones)
        return torch._scaled_mm(rows_fp8, weight.t(), scale_a=rows_scale, scale_b=weight_scale.t(), out_dtype=rows.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight, weight_scale, input_ones = ctx.saved_tensors
        grad_fp8, grad_scale = quantize_rows(grad_output.float() * weight_scale.t())
        weight_k_major = weight.t().contiguous().t()  # [out, in] laid out column-major
        grad_rows = torch._scaled_mm(grad_fp8, weight_k_major, scale_a=grad_scale, scale_b=input_ones,
                                     out_dtype=grad_output.dtype)
        return grad_rows, None, None, None


class Fp8Linear(nn.Module):
    """A frozen ``nn.Linear`` whose matmuls run in FP8; inputs and outputs keep the compute dtype."""

    def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = linear.in_features, linear.out_features, compute_dtype
        fp8, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_fp8", fp8)
        self.register_buffer("weight_scale", scale)
        # W's scales are folded into dy in backward; _scaled_mm still takes row-wise scales on both sides. A buffer,
        # not a torch.ones per call: one kernel launch less per layer and step, where the FP8 steps wait on the host.
        self.register_buffer("input_ones", torch.ones((1, self.in_features), device=fp8.device), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(compute_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
        out = Fp8LinearFunction.apply(rows, self.weight_fp8, self.weight_scale, self.input_ones)
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
    # Names, not modules, are collected first: a list of the modules would keep every replaced bf16 weight
    # alive until the end, the whole model's weights twice over at the peak.
    names = [name for name, module in layers.named_modules()
             if type(module) is nn.Linear and not module.weight.requires_grad
             and not (module.in_features % 16 or module.out_features % 16)]  # FP8 GEMMs need multiples of 16
    for name in names:
        parent_name, _, child_name = name.rpartition(".")
        parent = layers.get_submodule(parent_name)
        setattr(parent, child_name, Fp8Linear(getattr(parent, child_name), compute_dtype))
    return len(names)
