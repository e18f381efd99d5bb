"""``x @ W.T`` for a few rows ``x`` and a quantized ``W`` (NF4 or int8, ``models/quantization.py``'s layouts) as
one Triton kernel that reads the packed weight once and never writes a dequantized copy.

Why our own kernel: batch-1 decoding (chat, serve) is a matrix-vector product per linear, bound by how fast the
weight is read. bitsandbytes (its NF4 GEMV ran batch-1 generation at 28 tokens/s, QUANTIZATION.md) and the GPU
machine's libraries have no kernel for these layouts, and the reduction that ``torch.compile`` writes for the
same arithmetic ran INT4 chat at 50 tokens/s (110 with this kernel) and INT8 at 144 (run 2 of
benchmarks/chat_decode_profile.py, RESULTS.md issue 13).

Row offsets into the codes are 64-bit: a 262,144 x 8,192 int8 head has more than 2**31 codes.

Each program owns a block of output features of one input row and walks the inputs a block at a time: it
loads the codes (two NF4 codes or one int8 code a byte), looks the NF4 levels up, scales them by their group's
(NF4) or row's (int8) scale and accumulates ``x * w`` in float32. Programs of the same features but different
rows run side by side, so the second row's weight reads come from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block sizes (features per program, code bytes per loop step, warps), the fastest of the sweeps of
# benchmarks/chat_decode_profile.py and nf4_kernel_variants.py on the H200.
INT8_BLOCKS = (16, 256, 4)
NF4_BLOCKS = (4, 256, 2)


@triton.jit
def program_features(rows, out_features, BLOCK_N: tl.constexpr):
    """The input row and the block of output features this program computes, and which of them exist."""
    program = tl.program_id(0)
    features = (program // rows) * BLOCK_N + tl.arange(0, BLOCK_N)
    return program % rows, features, features < out_features


@triton.jit
def _int8_kernel(x_ptr, codes_ptr, scale_ptr, out_ptr, rows, out_features, in_features,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    row, features, feature_ok = program_features(rows, out_features, BLOCK_N)
    total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, in_features, BLOCK_K):
        offsets = start + tl.arange(0, BLOCK_K)
        offset_ok = offsets < in_features
        codes = tl.load(codes_ptr + features.to(tl.int64)[:, None] * in_features + offsets[None, :],
                        mask=feature_ok[:, None] & offset_ok[None, :], other=0)
        x = tl.load(x_ptr + row * in_features + offsets, mask=offset_ok, other=0.0).to(tl.float32)
        total += codes.to(tl.float32) * x[None, :]
    result = tl.sum(total, axis=1) * tl.load(scale_ptr + features, mask=feature_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_features + features, result, mask=feature_ok)


@triton.jit
def _nf4_kernel(x_ptr, codes_ptr, scale_ptr, levels_ptr, out_ptr, rows, out_features, in_features,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_BYTES: tl.constexpr):
    # Two level lookups a byte bound it at 550-650 GB/s on the H200, against 3.5 TB/s for the int8 kernel:
    # a table in registers (tl.gather) or in one cache line changed little (nf4_kernel_variants.py).
    row, features, feature_ok = program_features(rows, out_features, BLOCK_N)
    bytes_per_row = in_features // 2
    groups_per_row = bytes_per_row // GROUP_BYTES
    total = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for start in range(0, bytes_per_row, BLOCK_K):
        offsets = start + tl.arange(0, BLOCK_K)
        offset_ok = offsets < bytes_per_row
        ok = feature_ok[:, None] & offset_ok[None, :]
        packed = tl.load(codes_ptr + features.to(tl.int64)[:, None] * bytes_per_row + offsets[None, :], mask=ok,
                         other=0).to(tl.int32)
        low = tl.load(levels_ptr + (packed & 15)).to(tl.float32)
        high = tl.load(levels_ptr + (packed >> 4)).to(tl.float32)
        x_even = tl.load(x_ptr + row * in_features + 2 * offsets, mask=offset_ok, other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row * in_features + 2 * offsets + 1, mask=offset_ok, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + features[:, None] * groups_per_row + offsets[None, :] // GROUP_BYTES, mask=ok, other=0.0)
        total += (low * x_even[None, :] + high * x_odd[None, :]) * scale.to(tl.float32)
    tl.store(out_ptr + row * out_features + features, tl.sum(total, axis=1), mask=feature_ok)


def quantized_matvec(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, levels: torch.Tensor | None,
                     blocks: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ W.T`` (``[rows, out]`` in ``x``'s dtype) for ``x`` ``[rows, in]`` and ``W`` given as ``codes`` and
    ``scale`` of ``quantize_weight(W, bits)``; ``levels``: the 16 NF4 levels on ``x``'s device (4 bits).
    ``blocks``: (features per program, code bytes per step, warps), to compare block sizes."""
    rows, in_features = x.shape
    out_features = codes.shape[0]
    x = x.contiguous()
    output = torch.empty(rows, out_features, dtype=torch.float32, device=x.device)
    block_n, block_k, warps = blocks or (INT8_BLOCKS if bits == 8 else NF4_BLOCKS)
    grid = (rows * triton.cdiv(out_features, block_n),)
    if bits == 8:
        _int8_kernel[grid](x, codes, scale, output, rows, out_features, in_features,
                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    else:  # the group size as the scales give it: 64 weights, or a whole row that 64 does not divide
        group_bytes = in_features // scale.shape[1] // 2
        _nf4_kernel[grid](x, codes, scale, levels, output, rows, out_features, in_features,
                          BLOCK_N=block_n, BLOCK_K=block_k, GROUP_BYTES=group_bytes, num_warps=warps)
    return output.to(x.dtype)
