#!/usr/bin/env python3
"""--fp8 against bf16 on the real default model (Gemma 3 270M): the same LoRA run twice, loss curves compared.

On the CPU ``torch._scaled_mm`` runs FP8 e4m3 with the same row-wise scales as on the GPU, so the numbers are
those of the GPU path up to accumulation order. Usage: python benchmarks/fp8_quality.py --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from common import environment, write_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    from glmtune.config import GlmtuneConfig
    from glmtune.recipes.train import run_train

    demo = HERE.parent / "src" / "glmtune" / "demo_data" / "demo_train.jsonl"
    curves = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        started = time.perf_counter()
        result = run_train(GlmtuneConfig(
            do_train=True, train_file=str(demo), output_dir=tempfile.mkdtemp(), max_steps=args.steps,
            per_device_train_batch_size=args.batch, save_steps=0, logging_steps=1, report_to="none",
            torch_dtype="bfloat16", bf16=True, learning_rate=1e-3, seed=0, fp8=fp8))
        curves[name] = {"losses": result.losses, "seconds": round(time.perf_counter() - started, 1)}
    bf16, fp8 = curves["bf16"]["losses"], curves["fp8"]["losses"]
    relative = [abs(a - b) / abs(a) for a, b in zip(bf16, fp8)]
    summary = {"steps": args.steps, "batch": args.batch, "max_relative_difference": max(relative),
               "mean_relative_difference": sum(relative) / len(relative),
               "final_loss": {"bf16": bf16[-1], "fp8": fp8[-1]}}
    write_json("fp8_quality.json", {"env": environment(), "args": vars(args), "summary": summary, "curves": curves})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
