#!/usr/bin/env python3
"""Generation throughput: the seed's batch-1 `generate` against glmtune's predict path, in one run.

Setup (issue "Evaluate like the seed's evaluate.sh"): the ChatGLM-6B-sized random-init proxy in bf16,
1,070 ADGEN-dev-shaped prompts of 64 tokens, 64 new tokens each, greedy, no early stop.
The seed-style batch-1 loop is timed on --baseline_prompts prompts (25 minutes for all 1,070 at
its speed) and its tokens/s extrapolated; glmtune runs all 1,070.

Run on the device: python benchmarks/generation_throughput.py      (CPU check: --tiny)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_proxy, environment, timed, write_json  # noqa: E402

from glmtune.eval.generation import GenerationSettings, generate_batch, generate_texts  # noqa: E402


class IdTokenizer:
    """Stands in for a tokenizer: the benchmark measures generation, so 'decoding' joins ids."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompts", type=int, default=1070)
    parser.add_argument("--source", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--baseline_prompts", type=int, default=12)
    parser.add_argument("--batch_size", type=int, default=None, help="default: glmtune's choice from free memory")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_proxy(args.tiny, device).eval()
    model.generation_config.eos_token_id = None  # no early stop: every prompt gets exactly --new tokens
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.prompts, args.source), generator=generator).tolist()
    result = {"env": environment(), "args": vars(args)}

    # Seed style: one prompt at a time through HF generate.
    def seed_style(count):
        outputs = []
        for prompt in prompts[:count]:
            ids = torch.tensor([prompt], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                                 min_new_tokens=args.new, do_sample=False, num_beams=1, pad_token_id=0)
            outputs.append(out[0, args.source:].tolist())
        return outputs

    seed_style(1)  # warm-up
    seed_outputs, seconds = timed(lambda: seed_style(args.baseline_prompts))
    seed_rate = args.baseline_prompts * args.new / seconds
    result["seed_batch1"] = {"prompts": args.baseline_prompts, "seconds": round(seconds, 3),
                             "tokens_per_s": round(seed_rate, 1),
                             "extrapolated_seconds_for_all": round(args.prompts * args.new / seed_rate, 1)}
    print("seed-style batch 1:", result["seed_batch1"], flush=True)

    settings = GenerationSettings(max_new_tokens=args.new)
    generate_texts(model, IdTokenizer(), prompts[:8], settings, batch_size=8, show_progress=False)  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    (texts, _), seconds = timed(lambda: generate_texts(model, IdTokenizer(), prompts, settings, args.batch_size, show_progress=False))
    generated = sum(len(t.split()) for t in texts)
    result["glmtune"] = {"prompts": args.prompts, "generated_tokens": generated, "seconds": round(seconds, 3),
                         "tokens_per_s": round(generated / seconds, 1), "speedup_vs_seed": round(generated / seconds / seed_rate, 1),
                         "peak_alloc_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None}
    print("glmtune predict path:", result["glmtune"], flush=True)

    # Same greedy tokens? A random-init model's logits are nearly flat, so bf16 rounding differences between
    # batch shapes flip argmaxes; exactness is checked in float32 below, here we count agreement.
    count = args.baseline_prompts
    batched = generate_batch(model, prompts[:count], 0, [], settings)
    singles = [generate_batch(model, [p], 0, [], settings)[0] for p in prompts[:count]]
    result["bf16_rows_equal"] = {
        "glmtune_batch1_vs_seed_batch1": sum(a == b for a, b in zip(singles, seed_outputs)) / count,
        "glmtune_batched_vs_seed_batch1": sum(a == b for a, b in zip(batched, seed_outputs)) / count,
        "first_token_batched_vs_seed": sum(a[0] == b[0] for a, b in zip(batched, seed_outputs)) / count,
    }
    print("bf16 agreement:", result["bf16_rows_equal"], flush=True)
    del model
    small = build_proxy(args.tiny, device, dtype=torch.float32, num_hidden_layers=2).eval()
    small.generation_config.eos_token_id = None
    reference = []
    for prompt in prompts[:count]:
        ids = torch.tensor([prompt], device=device)
        out = small.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                             do_sample=False, num_beams=1, pad_token_id=0)
        reference.append(out[0, args.source:].tolist())
    varied = [p[: args.source - 7 * (i % 5)] for i, p in enumerate(prompts[:count])]  # mixed lengths: left padding in play
    reference_varied = []
    for prompt in varied:
        ids = torch.tensor([prompt], device=device)
        out = small.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new, min_new_tokens=args.new,
                             do_sample=False, num_beams=1, pad_token_id=0)
        reference_varied.append(out[0, len(prompt):].tolist())
    result["fp32_2layer_rows_equal_to_hf_generate"] = {
        "same_length_batch": sum(a == b for a, b in zip(generate_batch(small, prompts[:count], 0, [], settings), reference)) / count,
        "mixed_length_batch": sum(a == b for a, b in zip(generate_batch(small, varied, 0, [], settings), reference_varied)) / count,
    }
    print("fp32 exactness:", result["fp32_2layer_rows_equal_to_hf_generate"], flush=True)
    print("wrote", write_json("generation_throughput.json", result))


if __name__ == "__main__":
    main()
