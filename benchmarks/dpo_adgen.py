"""DPO on preference pairs built from ADGEN: does tuning raise rewards/accuracies on held-out pairs?

Pairs: the prompt is an ADGEN record's `content`, chosen = its real `summary`, rejected = the summary of
another record (a fluent answer about a different product). Train pairs come from train.json, held-out
pairs from dev.json. Writes the pair files to --work (never into the repository), trains with
`glmtune train --stage dpo`, then measures the held-out rewards before (base = reference: accuracy is
undefined, all rewards 0) and after training.

    python benchmarks/dpo_adgen.py --adgen ../shared/data/adgen --work /tmp/dpo_adgen --steps 100
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path


def build_pairs(source: Path, count: int, seed: int) -> list[dict]:
    records = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    chosen = rng.sample(records, count)
    pairs = []
    for record in chosen:
        other = rng.choice(records)
        while other["summary"] == record["summary"]:
            other = rng.choice(records)
        pairs.append({"prompt": record["content"], "chosen": record["summary"], "rejected": other["summary"]})
    return pairs


def write(pairs: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adgen", type=Path, required=True, help="folder with ADGEN train.json and dev.json")
    parser.add_argument("--work", type=Path, required=True, help="where pairs and the run go")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train_pairs", type=int, default=400)
    parser.add_argument("--eval_pairs", type=int, default=64)
    parser.add_argument("--model", default=None, help="default: the bundled Gemma 3 270M")
    parser.add_argument("extra", nargs="*", help="more glmtune train flags, after --")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    train_file = write(build_pairs(args.adgen / "train.json", args.train_pairs, 0), args.work / "train_pairs.jsonl")
    eval_file = write(build_pairs(args.adgen / "dev.json", args.eval_pairs, 1), args.work / "dev_pairs.jsonl")
    command = [sys.executable, "-m", "glmtune", "train", "--stage", "dpo", "--finetuning_type", "lora",
               "--train_file", str(train_file), "--do_eval", "--validation_file", str(eval_file),
               "--output_dir", str(args.work / "run"), "--overwrite_output_dir", "--max_steps", str(args.steps),
               "--eval_steps", str(args.steps // 2), "--save_steps", str(args.steps), "--logging_steps", "10",
               "--per_device_train_batch_size", "2", "--learning_rate", "5e-5", "--pref_beta", "0.1",
               "--max_source_length", "64", "--max_target_length", "64", "--report_to", "none", *args.extra]
    if args.model:
        command += ["--model_name_or_path", args.model]
    print(" ".join(command), flush=True)
    subprocess.run(command, check=True)
    log = [json.loads(line) for line in (args.work / "run" / "train_log.jsonl").read_text().splitlines()]
    evaluations = [entry for entry in log if "eval_loss" in entry]
    print(json.dumps({"train_last": [e for e in log if "rewards/accuracies" in e][-1], "held_out": evaluations}, indent=2))


if __name__ == "__main__":
    main()
