"""Probes for issue 12's memory target, measured by train_throughput.py before any of them becomes a flag.

  +fp8t      the previous --fp8: each frozen weight kept twice in FP8 (W and Wᵀ), so backward needs no transpose;
             beside today's --fp8 (one FP8 copy, transposed in backward) it prices the memory the copy saves
  +cppwrapper  inductor's C++ wrapper for the compiled layers (run 17 tried it on bf16 LoRA, which waits on its
             GEMMs; the FP8 rows wait on the host)
  +offload / +offloadN  the saved activations of all (or the first N) decoder layers to pinned host memory on a side
             stream, back on it in backward with prefetch (the design of torchtune's OffloadActivations, which imports
             torchao; written here for the measurement)
"""

from __future__ import annotations

import contextlib
import itertools

import torch
from torch import nn

from glmtune.models.fp8 import quantize_rows


class TwoCopyFp8Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, weight, weight_scale, weight_t, weight_t_scale):
        rows_fp8, rows_scale = quantize_rows(rows)
        ctx.save_for_backward(weight_t, weight_t_scale)
        return torch._scaled_mm(rows_fp8, weight.t(), scale_a=rows_scale, scale_b=weight_scale.t(), out_dtype=rows.dtype)

    @staticmethod
    def backward(ctx, grad_output):
        weight_t, weight_t_scale = ctx.saved_tensors
        grad_fp8, grad_scale = quantize_rows(grad_output)
        grad_rows = torch._scaled_mm(grad_fp8, weight_t.t(), scale_a=grad_scale, scale_b=weight_t_scale.t(),
                                     out_dtype=grad_output.dtype)
        return grad_rows, None, None, None, None


@contextlib.contextmanager
def two_copy_fp8():
    """glmtune's Fp8Linear with the second, transposed FP8 copy of its weight (the --fp8 of runs 18 and 19)."""
    from glmtune.models import fp8

    original = fp8.Fp8Linear

    class TwoCopyFp8Linear(original):
        def __init__(self, linear: nn.Linear, compute_dtype: torch.dtype):
            super().__init__(linear, compute_dtype)
            fp8_t, scale_t = quantize_rows(linear.weight.detach().t())
            self.register_buffer("weight_t_fp8", fp8_t.contiguous())
            self.register_buffer("weight_t_scale", scale_t)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            rows = x.reshape(-1, self.in_features).to(self.compute_dtype)
            out = TwoCopyFp8Function.apply(rows, self.weight_fp8, self.weight_scale, self.weight_t_fp8, self.weight_t_scale)
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*x.shape[:-1], self.out_features)

    fp8.Fp8Linear = TwoCopyFp8Linear
    try:
        yield
    finally:
        fp8.Fp8Linear = original


def cpp_wrapper():
    """Inductor's C++ wrapper: kernels launched from C++ instead of its Python wrapper (less host time a layer)."""
    return torch._inductor.config.patch(cpp_wrapper=True)


class OffloadedActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of the forward under it go to pinned host memory on a side stream and come back in backward.

    The model's parameters and buffers, small and non-contiguous tensors stay where they are. In backward each
    reload also starts the reloads of up to ``prefetch_bytes`` of the tensors saved before it (backward runs the
    layers in reverse), so the copies overlap the layer's backward instead of stalling it.
    """

    def __init__(self, model: nn.Module, min_bytes: int = 1 << 20, prefetch_bytes: int = 1 << 30):
        self.resident = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
        self.min_bytes, self.prefetch_bytes = min_bytes, prefetch_bytes
        self.stream = torch.cuda.Stream()
        self.saved: list[dict] = []  # this forward's offloaded tensors, in the order they were saved
        self.outstanding = 0
        self.offloaded_bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        if (tensor.device.type != "cuda" or size < self.min_bytes or not tensor.is_contiguous()
                or tensor.untyped_storage().data_ptr() in self.resident):
            return tensor
        if self.outstanding == 0:
            self.saved = []
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)
        tensor.record_stream(self.stream)  # its memory is reused only once the copy is done
        entry = {"host": host, "device": tensor.device, "bytes": size, "index": len(self.saved), "gpu": None, "ready": None}
        self.saved.append(entry)
        self.outstanding += 1
        self.offloaded_bytes += size
        return entry

    def _fetch(self, entry: dict) -> None:
        with torch.cuda.stream(self.stream):
            entry["gpu"] = entry["host"].to(entry["device"], non_blocking=True)
            entry["ready"] = torch.cuda.Event()
            entry["ready"].record(self.stream)

    def _unpack(self, entry):
        if isinstance(entry, torch.Tensor):
            return entry
        if entry["gpu"] is None:
            self._fetch(entry)
        ahead = 0
        for earlier in reversed(self.saved[: entry["index"]]):
            if ahead >= self.prefetch_bytes:
                break
            if earlier["host"] is not None and earlier["gpu"] is None:
                self._fetch(earlier)
            ahead += earlier["bytes"]
        current = torch.cuda.current_stream()
        current.wait_event(entry["ready"])
        tensor = entry["gpu"]
        tensor.record_stream(current)
        entry.update(host=None, gpu=None)
        self.outstanding -= 1
        return tensor


@contextlib.contextmanager
def offloaded_layers(count: int | None, report: dict):
    """glmtune's training with the first ``count`` decoder layers (all: None) under OffloadedActivations, wrapped
    outside their compiled forwards; ``report`` gets the GiB offloaded over the whole run."""
    from glmtune.models.introspect import decoder_layers
    from glmtune.train import trainer

    original = trainer._prepare_layers
    created: list[OffloadedActivations] = []

    def prepare(model, config, dtype):
        original(model, config, dtype)
        hooks = OffloadedActivations(model)
        created.append(hooks)
        for layer in list(decoder_layers(model))[:count]:
            forward = layer.forward

            def offloaded_forward(*args, _forward=forward, **kwargs):
                with hooks:
                    return _forward(*args, **kwargs)

            layer.forward = offloaded_forward

    trainer._prepare_layers = prepare
    try:
        yield
    finally:
        trainer._prepare_layers = original
        if created:
            report["offloaded_gib_total"] = round(sum(hooks.offloaded_bytes for hooks in created) / 2**30, 2)


def offload_check() -> float:
    """Largest gradient difference of a small compiled MLP with and without the hooks (0 if they are right)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 1024)).cuda()
    compiled = torch.compile(model)
    x = torch.randn(512, 1024, device="cuda", requires_grad=True)
    gradients = []
    for use_hooks in (False, True):
        context = OffloadedActivations(nn.Module()) if use_hooks else contextlib.nullcontext()
        with context:
            out = compiled(x)
        (gradient,) = torch.autograd.grad(out.square().sum(), x)
        gradients.append(gradient)
    return float((gradients[0] - gradients[1]).abs().max())
