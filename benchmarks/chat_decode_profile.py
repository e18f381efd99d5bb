#!/usr/bin/env python3
"""Where a batch-1 decode step's time goes (issue 13's chat rows), in one process on the 7.66B proxy.

For bf16, bf16 with compiled decode steps (as chat's --compile_generation runs them: over the whole context,
prefills eager), INT4 and INT8: chat tokens/s as generation_throughput.py's chat rows time them (one decoder
kept, 256 new tokens, decode-only rate from a 256- and an 8-token answer) and the kernel table of one decode
step (device time by kind, the top kernels, how many), replayed from its CUDA graph and launched eagerly.
Then each weight shape's batch-1 product alone: bf16 cuBLAS, torch.compile's reduction of the dequantized
product (glmtune's path before models/quantized_matvec.py) and the Triton kernels over a sweep of block
sizes, in microseconds and GB/s of weight read; INT4 is timed again with the sweep's best blocks if they
are not the shipped ones.

Run on the device: python benchmarks/chat_decode_profile.py          (CPU check: --tiny)
"""

from __future__ import annotations

import argparse
import gc
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_proxy, environment, microseconds, timed, write_json  # noqa: E402
from generation_profile import kernel_table  # noqa: E402

import glmtune.models.quantization as quantization  # noqa: E402
from glmtune.eval.decoding import SlotDecoder  # noqa: E402
from glmtune.eval.generation import GenerationSettings, generate_batch  # noqa: E402


def chat_row(model, prompt, tokens: int, compile_steps: bool, capacity: int | None = None) -> dict:
    """Tokens/s of a kept decoder, as generation_throughput.py's chat_row, and the kernels of one of its decode
    steps replayed from the graph (and, uncompiled, launched one by one)."""
    settings = GenerationSettings(max_new_tokens=tokens, compile_steps=compile_steps)
    decoder = SlotDecoder(model, 1, capacity or len(prompt[0]) + tokens, compile_steps=compile_steps, compile_prefill=False)
    _, first_s = timed(lambda: generate_batch(model, prompt, 0, [], settings, decoder=decoder))  # graphs made
    short = GenerationSettings(max_new_tokens=8, compile_steps=compile_steps)
    _, short_s = timed(lambda: generate_batch(model, prompt, 0, [], short, decoder=decoder))
    answer, seconds = timed(lambda: generate_batch(model, prompt, 0, [], settings, decoder=decoder))
    row = {"tokens_per_s": round(len(answer[0]) / seconds, 1),
           "decode_tokens_per_s": round((tokens - 8) / (seconds - short_s), 1), "first_call_s": round(first_s, 1),
           "decode_step_ms": round((seconds - short_s) / (tokens - 8) * 1000, 3)}
    decoders = {"graph" if decoder.use_graphs else "eager": decoder}
    if not compile_steps and decoder.use_graphs:
        decoders["eager"] = SlotDecoder(model, 1, len(prompt[0]) + tokens, use_graphs=False)
    token = torch.full((1,), 5, dtype=torch.long, device=decoder.device)
    for name, kept in decoders.items():
        kept.start_batch(len(prompt[0]), tokens)
        kept.prefill([0], prompt, 0)
        kept.step(token)
        kept.step(token)
        row[f"{name}_step_kernels"] = kernel_table(lambda: kept.step(token), 3)  # noqa: B023 - called at once
    return row


def dequantize_matvec(x, codes, scale, bits: int, dtype, pairs):
    """The batch-1 product as torch.compile's reduction of the same arithmetic: what glmtune ran before its kernel."""
    weight = quantization.dequantize_weight(codes, scale, bits, dtype, pairs)
    return (x[:, None, :].float() * weight[None].float()).sum(-1).to(dtype)


NF4_SWEEP = [(n, k, 4) for n in (2, 4, 8, 16) for k in (128, 256, 512)] + [(4, 256, 2), (8, 256, 2), (8, 512, 8), (16, 512, 8)]
INT8_SWEEP = [(16, 256, 4), (8, 512, 4), (32, 256, 4), (16, 512, 8)]
# How often each NF4 shape runs in a layer of the proxy: q, k, v, o; gate and up; down.
SHAPE_CALLS = {"4096x4096": 4, "13696x4096": 2, "4096x13696": 1}


def product_rows(shapes: list[tuple[int, int, int]], device: str, repeats: int) -> dict:
    """Each weight shape's batch-1 product alone, per kernel (``common.microseconds``)."""
    from glmtune.models.quantized_matvec import quantized_matvec

    compiled = torch.compile(dequantize_matvec, dynamic=False)
    results = {}
    for out_features, in_features, bits in shapes:
        weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
        codes, scale = quantization.quantize_weight(weight, bits)
        pairs = quantization.nf4_pairs().to(device) if bits == 4 else None
        levels = torch.tensor(quantization.NF4_LEVELS, device=device) if bits == 4 else None
        x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
        packed_bytes = codes.numel() * codes.element_size() + scale.numel() * scale.element_size()
        row = {"bf16_bytes": weight.numel() * 2, "packed_bytes": packed_bytes}
        bf16_us = microseconds(lambda: torch.nn.functional.linear(x, weight), repeats)
        row["bf16_cublas"] = {"us": round(bf16_us, 2), "GB_per_s": round(weight.numel() * 2 / bf16_us / 1e3, 1)}
        compiled_us = microseconds(lambda: compiled(x, codes, scale, bits, torch.bfloat16, pairs), repeats)
        row["compiled_reduction"] = {"us": round(compiled_us, 2), "GB_per_s": round(packed_bytes / compiled_us / 1e3, 1)}
        reference = torch.nn.functional.linear(x.float(), quantization.dequantize_weight(codes, scale, bits, torch.float32))
        for blocks in NF4_SWEEP if bits == 4 else INT8_SWEEP:
            name = "triton_n{}_k{}_w{}".format(*blocks)
            try:
                run = lambda: quantized_matvec(x, codes, scale, bits, levels, blocks)  # noqa: E731, B023
                error = ((run().float() - reference).abs().max() / reference.abs().max()).item()
                us = microseconds(run, repeats)
                row[name] = {"us": round(us, 2), "GB_per_s": round(packed_bytes / us / 1e3, 1),
                             "max_error_relative_to_largest_output": round(error, 5)}
            except Exception as failure:  # noqa: BLE001 - a block size this build refuses
                row[name] = repr(failure)[:200]
        timed_rows = {k: v for k, v in row.items() if k.startswith("triton") and isinstance(v, dict)}
        row["best_triton"] = min(timed_rows, key=lambda k: timed_rows[k]["us"]) if timed_rows else None
        results[f"{out_features}x{in_features}_int{bits}"] = row
        del weight, codes, scale
    per_layer = {}
    for blocks in NF4_SWEEP:
        name = "triton_n{}_k{}_w{}".format(*blocks)
        rows = [(results.get(f"{shape}_int4", {}).get(name), calls) for shape, calls in SHAPE_CALLS.items()]
        if all(isinstance(r, dict) for r, _ in rows):
            per_layer[name] = round(sum(r["us"] * calls for r, calls in rows), 2)
    results["nf4_us_per_layer"] = per_layer
    if per_layer:
        best = min(per_layer, key=per_layer.get)
        results["nf4_best"] = {"name": best, "blocks": NF4_SWEEP[list(per_layer).index(best)]}
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--source", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rows", default="bf16,bf16_compiled,products,int4,int8")
    parser.add_argument("--json", default="chat_decode_profile.json")
    args = parser.parse_args()
    wanted = args.rows.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_proxy(args.tiny, device).eval()
    model.generation_config.eos_token_id = None
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, model.config.vocab_size, (1, args.source), generator=generator).tolist()
    config = model.config
    shapes = [(config.hidden_size, config.hidden_size, 4), (config.intermediate_size, config.hidden_size, 4),
              (config.hidden_size, config.intermediate_size, 4), (config.vocab_size, config.hidden_size, 8)]
    result = {"env": environment(), "args": vars(args)}

    def record(name, function):
        if name not in wanted:
            return
        try:
            with torch.no_grad():
                result[name] = function()
        except Exception as error:  # noqa: BLE001 - the other rows still run
            traceback.print_exc()
            result[name + "_error"] = repr(error)[:600]
        print(name, result.get(name), flush=True)
        write_json(args.json, result)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    record("bf16", lambda: chat_row(model, prompt, args.tokens, False))
    # As chat's engine runs --compile_generation: decode steps compiled over the whole context, prefills eager.
    record("bf16_compiled", lambda: chat_row(model, prompt, args.tokens, True, capacity=model.config.max_position_embeddings))
    record("products", lambda: product_rows(shapes, device, 3 if args.tiny else 50))
    if "int4" in wanted:
        from glmtune.models import quantized_matvec

        quantization.quantize_model(model, 4)
        record("int4", lambda: chat_row(model, prompt, args.tokens, False))
        best = result.get("products", {}).get("nf4_best")
        if best and tuple(best["blocks"]) != quantized_matvec.NF4_BLOCKS:
            quantized_matvec.NF4_BLOCKS = tuple(best["blocks"])
            wanted.append("int4_best_blocks")
            record("int4_best_blocks", lambda: {"blocks": best["blocks"], **chat_row(model, prompt, args.tokens, False)})
    if "int8" in wanted:
        del model
        gc.collect()
        model = quantization.quantize_model(build_proxy(args.tiny, device).eval(), 8)
        model.generation_config.eos_token_id = None
        record("int8", lambda: chat_row(model, prompt, args.tokens, False))
    print("wrote", write_json(args.json, result))


if __name__ == "__main__":
    main()
