#!/usr/bin/env python3
"""--fp8 against the same LoRA run without it on the real default model (Gemma 3 270M): loss curves compared, and
the validation loss on held-out records at the end.

Data: ADGEN ``train.json`` and the first ``--eval_records`` of ``dev.json`` from ``../shared/data/adgen`` when that
folder exists, else the bundled sample (training loss only). On the CPU ``torch._scaled_mm`` runs FP8 e4m3 with the
same row-wise scales as on the GPU, so the FP8 products are the GPU path's up to accumulation order. ``--dtype
float32`` (the default on a CPU) computes everything else in float32: a bf16 run's backward on a CPU without bf16
units takes minutes a step here, and float32 is the stricter baseline (it has no rounding of its own to hide FP8's).
Usage: python benchmarks/fp8_quality.py --steps 200
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
    parser.add_argument("--eval_records", type=int, default=100)
    parser.add_argument("--max_length", type=int, default=64,
                        help="--max_source_length and --max_target_length of both runs (the 262k-vocabulary head "
                             "dominates a CPU step, and it runs once per answer token)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype of both runs (default: bfloat16 on a GPU, float32 on a CPU)")
    parser.add_argument("--baseline_from", default=None,
                        help="an earlier fp8_quality JSON whose baseline curve to reuse (same arguments; the baseline's "
                             "code unchanged since), so that only the FP8 run is trained again")
    parser.add_argument("--output", default="fp8_quality.json")
    args = parser.parse_args()
    from glmtune.config import GlmtuneConfig
    from glmtune.recipes.train import run_train

    import torch

    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() else "float32")
    adgen = HERE.parent.parent / "shared" / "data" / "adgen"
    if adgen.is_dir():
        data = dict(train_file=str(adgen / "train.json"), do_eval=True, validation_file=str(adgen / "dev.json"),
                    max_eval_samples=args.eval_records, eval_steps=args.steps)
    else:
        data = dict(train_file=str(HERE.parent / "src" / "glmtune" / "demo_data" / "demo_train.jsonl"))
    curves = {}
    runs = ((dtype, False), ("fp8", True))
    if args.baseline_from:
        earlier = json.loads(Path(args.baseline_from).read_text())
        keys = ("steps", "batch", "eval_records", "max_length")
        if [earlier["args"][k] for k in keys] != [getattr(args, k) for k in keys]:
            raise SystemExit(f"--baseline_from {args.baseline_from} ran with other arguments: {earlier['args']}")
        curves[dtype] = {**earlier["curves"][dtype], "from": f"{args.baseline_from} ({earlier['env']['date']})"}
        runs = runs[1:]
    for name, fp8 in runs:
        started = time.perf_counter()
        result = run_train(GlmtuneConfig(
            do_train=True, output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
            save_steps=0, logging_steps=1, report_to="none", torch_dtype=dtype, bf16=dtype == "bfloat16",
            learning_rate=1e-3, seed=0, fp8=fp8, max_source_length=args.max_length, max_target_length=args.max_length,
            **data))
        curves[name] = {"losses": result.losses, "eval_losses": result.eval_losses,
                        "seconds": round(time.perf_counter() - started, 1)}
    plain, fp8 = curves[dtype]["losses"], curves["fp8"]["losses"]
    relative = [abs(a - b) / abs(a) for a, b in zip(plain, fp8)]
    # Step losses differ by batch; the curves are compared as 10-step means too (what a loss plot shows).
    window = 10
    means = [(sum(plain[i:i + window]), sum(fp8[i:i + window])) for i in range(0, len(plain) - window + 1, window)]
    relative_means = [abs(a - b) / abs(a) for a, b in means]
    summary = {"baseline": dtype, "data": data, "steps": args.steps, "batch": args.batch,
               "max_relative_difference": max(relative), "mean_relative_difference": sum(relative) / len(relative),
               "max_relative_difference_of_10_step_means": max(relative_means, default=None),
               "final_loss": {dtype: plain[-1], "fp8": fp8[-1]},
               "validation_loss": {name: curve["eval_losses"] for name, curve in curves.items()}}
    write_json(args.output, {"env": environment(), "args": vars(args), "summary": summary, "curves": curves})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
