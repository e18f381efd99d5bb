"""A candidate for ``--fp8`` timed beside the shipped one: the FP8 GEMMs in an ``autograd.Function`` instead of
two Python custom ops (``train_throughput.py``'s ``+fp8fn`` row).

Why: run 16's profile had the FP8 step's kernels at 64 ms of a 115-150 ms step; one suspect is the Python each
custom op runs per call (~400 a step), which inductor cannot see through. Traced as an ``autograd.Function``,
``torch._scaled_mm`` is called by the compiled code directly. Dynamo's old failure on this form
("lift_tracked_freevar_to_input should not be called on root SubgraphTracer", torch 2.13) came from reading the
module-level float ``FP8_MAX`` inside the function; ``quantize`` below writes 448.0 out. If this row wins on the
GPU, it replaces the custom ops in ``glmtune/models/fp8.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from glmtune.models import fp8


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fp8.quantize_rows`` with its constants written out (see the module docstring)."""
    scale = x.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
    return (x.float() / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn), scale


class Fp8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, weight_scale, weight_t, weight_t_scale):
        rows_fp8, rows_scale = quantize(rows)
        ctx.save_for_backward(weight_t, weight_t_scale)
        return torch._scaled_mm(rows_fp8, weight.t(), scale_a=rows_scale, scale_b=weight_scale.t(), out_dtype=rows.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight_t, weight_t_scale = ctx.saved_tensors
        grad_fp8, grad_scale = quantize(grad_output)
        grad_rows = torch._scaled_mm(grad_fp8, weight_t.t(), scale_a=grad_scale, scale_b=weight_t_scale.t(),
                                     out_dtype=grad_output.dtype)
        return grad_rows, None, None, None, None


def _forward(self: fp8.Fp8Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
    out = Fp8LinearFunction.apply(rows, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale)
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.out_features)


@contextlib.contextmanager
def function_fp8() -> Iterator[None]:
    """Every ``Fp8Linear`` computes through ``Fp8LinearFunction`` inside the block."""
    shipped = fp8.Fp8Linear.forward
    fp8.Fp8Linear.forward = _forward
    try:
        yield
    finally:
        fp8.Fp8Linear.forward = shipped
