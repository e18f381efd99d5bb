"""A candidate for ``--compile_generation`` timed beside the shipped one: the prefill through ``torch.compile``
too (``generation_throughput.py``'s ``compiled_prefill`` row). Automatic dynamic shapes: the first prefill shape
compiles static, a second one recompiles with dynamic sizes (``dynamic=True`` from the start failed in inductor's
CPU SDPA lowering, torch 2.13). On the CPU, in float32, it decodes the eager path's tokens, first and second shape.

Why: in run 2's profile the prefill of 535 × 64 tokens was an eager forward whose GEMMs ran at the limit but
whose unfused elementwise kernels (norms, rotary, SiLU, residual adds) took 223 ms and copies 171 ms of 1.07 s;
15,000 tokens/s needs about 0.2 s less per batch than compiled decode steps plus the eager prefill give. If this
row gets there, the prefill's compilation moves into ``glmtune/eval/decoding.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from glmtune.eval import decoding, generation


class CompiledPrefillDecoder(decoding.SlotDecoder):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Decode steps keep what __init__ chose (self._step_forward); only prefill calls go through this.
        self._forward = torch.compile(self._forward, dynamic=None)


@contextlib.contextmanager
def compiled_prefill() -> Iterator[None]:
    """Decoders made by predict's path (``generation.decoder_for``) compile their prefill inside the block."""
    shipped = generation.SlotDecoder
    generation.SlotDecoder = CompiledPrefillDecoder
    try:
        yield
    finally:
        generation.SlotDecoder = shipped
