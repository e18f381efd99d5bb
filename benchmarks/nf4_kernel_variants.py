#!/usr/bin/env python3
"""Why the batch-1 NF4 kernel reads at ~500 GB/s where the int8 one reads at 3.5 TB/s (chat_decode_profile.py run 2):
variants of the code-to-level lookup, each timed on the proxy's three NF4 weight shapes, over a few block sizes.

- shipped: models/quantized_matvec.py: a 2D tile of code bytes, a scale looked up per byte, the levels from a
  16-entry table (the "flat" variant of run 2, the fastest there, and shipped since)
- tile3d: a 3D tile of whole groups (one scale per group of 32 bytes), the levels from the same table (run 2's
  "table16"; its "shipped" row was the same tile reading the levels from the first rows of ``nf4_pairs``)
- registers: the 3D tile, the table loaded once into registers and indexed with ``tl.gather``

Then INT4 chat on the proxy with the fastest variant patched in. Run on the device (CPU check: TRITON_INTERPRET=1 --tiny).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chat_decode_profile import SHAPE_CALLS, chat_row  # noqa: E402
from common import build_proxy, environment, microseconds, write_json  # noqa: E402

import glmtune.models.quantized_matvec as shipped  # noqa: E402
from glmtune.models import quantization  # noqa: E402


@triton.jit
def _tile3d(x_ptr, codes_ptr, scale_ptr, levels_ptr, out_ptr, rows, out_features, in_features,
            BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, REGISTERS: tl.constexpr):
    row, features, feature_ok = shipped.program_features(rows, out_features, BLOCK_N)
    groups_per_row = in_features // 64
    group_offsets = tl.arange(0, GROUPS)
    byte_offsets = tl.arange(0, 32)[None, None, :]
    table = tl.load(levels_ptr + tl.arange(0, 16))
    total = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    for first in range(0, groups_per_row, GROUPS):
        groups = first + group_offsets
        group_ok = groups < groups_per_row
        in_row = groups[None, :, None] * 32 + byte_offsets
        packed = tl.load(codes_ptr + features[:, None, None] * (in_features // 2) + in_row,
                         mask=feature_ok[:, None, None] & group_ok[None, :, None], other=0).to(tl.int32)
        if REGISTERS:
            flat = tl.reshape(packed, [BLOCK_N * GROUPS * 32])
            low = tl.reshape(tl.gather(table, flat & 15, 0), [BLOCK_N, GROUPS, 32])
            high = tl.reshape(tl.gather(table, flat >> 4, 0), [BLOCK_N, GROUPS, 32])
        else:
            low = tl.load(levels_ptr + (packed & 15))
            high = tl.load(levels_ptr + (packed >> 4))
        x_even = tl.load(x_ptr + row * in_features + 2 * in_row, mask=group_ok[None, :, None], other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + row * in_features + 2 * in_row + 1, mask=group_ok[None, :, None], other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + features[:, None] * groups_per_row + groups[None, :],
                        mask=feature_ok[:, None] & group_ok[None, :], other=0.0).to(tl.float32)
        total += tl.sum(low * x_even + high * x_odd, axis=2) * scale
    tl.store(out_ptr + row * out_features + features, tl.sum(total, axis=1), mask=feature_ok)


_LEVELS: dict = {}
SHIPPED = shipped.quantized_matvec


def levels_on(device) -> torch.Tensor:
    if device not in _LEVELS:
        _LEVELS[device] = torch.tensor(quantization.NF4_LEVELS, dtype=torch.float32, device=device)
    return _LEVELS[device]


def variant_matvec(name: str, blocks):
    """A ``quantized_matvec`` with the NF4 lookup ``name`` (int8 goes to the shipped kernel)."""

    def matvec(x, codes, scale, bits, _levels, _blocks=None):
        if bits == 8 or name == "shipped":
            return SHIPPED(x, codes, scale, bits, levels_on(x.device), None if bits == 8 else blocks)
        rows, in_features = x.shape
        out_features = codes.shape[0]
        levels = levels_on(x.device)
        x = x.contiguous()
        output = torch.empty(rows, out_features, dtype=torch.float32, device=x.device)
        block_n, block_k, warps = blocks
        grid = (rows * triton.cdiv(out_features, block_n),)
        _tile3d[grid](x, codes, scale, levels, output, rows, out_features, in_features, BLOCK_N=block_n,
                      GROUPS=block_k // 32, REGISTERS=name == "registers", num_warps=warps)
        return output.to(x.dtype)

    return matvec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--json", default="nf4_kernel_variants.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = [(128, 128), (64, 192), (128, 64)] if args.tiny else [(4096, 4096), (13696, 4096), (4096, 13696)]
    calls = dict(zip(shapes, SHAPE_CALLS.values()))
    variants = ["shipped", "tile3d", "registers"]
    blocks_tried = [(8, 256, 2), (4, 256, 2), (8, 128, 2), (16, 256, 4)]
    result = {"env": environment(), "per_shape": {}, "us_per_layer": {}}
    repeats = 3 if args.tiny else 50
    for out_features, in_features in shapes:
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
        codes, scale = quantization.quantize_weight(weight, 4)
        x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
        reference = torch.nn.functional.linear(x.float(), quantization.dequantize_weight(codes, scale, 4, torch.float32))
        packed_bytes = codes.numel() + scale.numel() * scale.element_size()
        for name in variants:
            for blocks in blocks_tried:
                label = "{}_n{}_k{}_w{}".format(name, *blocks)
                try:
                    run = variant_matvec(name, blocks)
                    error = ((run(x, codes, scale, 4, None).float() - reference).abs().max() / reference.abs().max()).item()
                    us = microseconds(lambda: run(x, codes, scale, 4, None), repeats)  # noqa: B023
                    result["per_shape"].setdefault(label, {})[f"{out_features}x{in_features}"] = {
                        "us": round(us, 2), "GB_per_s": round(packed_bytes / us / 1e3, 1), "relative_error": round(error, 5)}
                    result["us_per_layer"][label] = round(result["us_per_layer"].get(label, 0) + us * calls[(out_features, in_features)], 2)
                except Exception as failure:  # noqa: BLE001 - a variant this Triton refuses
                    result["per_shape"].setdefault(label, {})["error"] = repr(failure)[:300]
        print(result["us_per_layer"], flush=True)
        write_json(args.json, result)
    complete = {k: v for k, v in result["us_per_layer"].items() if "error" not in result["per_shape"][k]}
    best = min(complete, key=complete.get)
    result["best"] = best
    print("best", best, complete[best], flush=True)
    model = quantization.quantize_model(build_proxy(args.tiny, device).eval(), 4)
    model.generation_config.eos_token_id = None
    prompt = torch.randint(3, model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).tolist()
    name, _, rest = best.partition("_n")
    block_n, block_k, warps = (int(part[1:]) if i else int(part) for i, part in enumerate(rest.replace("_", " ").split()))
    shipped.quantized_matvec, original = variant_matvec(name, (block_n, block_k, warps)), shipped.quantized_matvec
    try:
        result["int4_chat_best_variant"] = chat_row(model, prompt, 256, False)
    finally:
        shipped.quantized_matvec = original
    print("int4", {k: v for k, v in result["int4_chat_best_variant"].items() if "kernels" not in k}, flush=True)
    print("wrote", write_json(args.json, result))


if __name__ == "__main__":
    main()
