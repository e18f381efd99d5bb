"""Issue #18's experiments, several at once on one GPU: each job trains (glmtune or the plain loop) on ADGEN
train.json and predicts dev.json, once per decoding variant. Everything is measured on dev.json only.

    python benchmarks/quality/sweep.py --data ../shared/data/adgen --work /tmp/q --out results/q --parallel 8 JOB...

Jobs that name a learning rate ran before the defaults changed to the winners (LoRA 2e-3, P-Tuning v2 5e-2,
predict's --no_repeat_ngram_size 4): "lora_default"/"pt_default" then meant 5e-4/1e-2 and greedy decoding; the
"greedy" variant is --no_repeat_ngram_size 0 now, so reruns compare like for like.

JOB names come from JOBS below (or a group: defaults, ptuning, lora, moonshot). Each job's logs, run record and
predict_results.json go to OUT/JOB/ (weights stay in WORK, which may be large); `summary.md` collects the metrics.
A job that is still running at --deadline seconds is stopped, so a time-limited call still returns what finished.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

STEPS = ["--max_steps", "150", "--per_device_train_batch_size", "8"]  # the budget: 150 steps x batch 8
DECODING = {  # predict-only variants, each scored on the same adapter
    "greedy": ["--no_repeat_ngram_size", "0"],
    "rp1.1": ["--repetition_penalty", "1.1", "--no_repeat_ngram_size", "0"],
    "rp1.2": ["--repetition_penalty", "1.2", "--no_repeat_ngram_size", "0"],
    "nrng4": ["--no_repeat_ngram_size", "4"],  # predict's default now
    "rp1.1_nrng4": ["--repetition_penalty", "1.1", "--no_repeat_ngram_size", "4"],
    "thudm_sample": ["--do_sample", "--top_p", "0.7", "--temperature", "0.95", "--no_repeat_ngram_size", "0"],
    "beam4": ["--num_beams", "4", "--no_repeat_ngram_size", "0"],
}
ALL_DECODING = list(DECODING)
FIVE_EPOCHS = ["--max_steps", "500", "--per_device_train_batch_size", "8"]


def glmtune(train: list[str], decodings: list[str] = ["greedy"], steps: list[str] = STEPS) -> dict:
    return {"train": steps + train, "decodings": decodings}


JOBS: dict[str, dict] = {
    "untuned": {"untuned": True, "decodings": ["greedy", "rp1.2"]},
    "plain_loop": {"plain_loop": []},
    "plain_loop_seed2": {"plain_loop": ["--seed", "2"]},
    # issue #17: 100 DPO steps on ADGEN pairs, held-out rewards/accuracies
    "dpo_adgen": {"script": ["benchmarks/dpo_adgen.py", "--adgen", "{data}", "--work", "{work}", "--steps", "100"]},
    "lora_default": glmtune([], ALL_DECODING),
    "lora_default_seed2": glmtune(["--seed", "2"], ["greedy", "rp1.1", "nrng4"]),
    "pt_default": glmtune(["--finetuning_type", "ptuning"], ALL_DECODING),
    "pt_default_seed2": glmtune(["--finetuning_type", "ptuning", "--seed", "2"], ["greedy", "rp1.1", "nrng4"]),
    # P-Tuning v2: lr, pre_seq_len, prefix_projection, searched one at a time around the defaults
    "pt_lr3e-3": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "3e-3"]),
    "pt_lr5e-3": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "5e-3"]),
    "pt_lr2e-2": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "2e-2"]),
    "pt_lr3e-2": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "3e-2"]),
    "pt_lr5e-2": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "5e-2"], ["greedy", "nrng4", "rp1.1"]),
    "pt_lr5e-2_s2": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "5e-2", "--seed", "2"],
                            ["greedy", "nrng4", "rp1.1"]),
    "pt_lr7e-2": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "7e-2"], ["greedy", "nrng4"]),
    "pt_lr1e-1": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "1e-1"], ["greedy", "nrng4", "rp1.1"]),
    "pt_lr3e-2_len64": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "3e-2", "--pre_seq_len", "64"],
                               ["greedy", "nrng4"]),
    "pt_lr3e-2_proj": glmtune(["--finetuning_type", "ptuning", "--learning_rate", "3e-2", "--prefix_projection"],
                              ["greedy", "nrng4"]),
    "pt_proj_lr1e-3": glmtune(["--finetuning_type", "ptuning", "--prefix_projection", "--learning_rate", "1e-3"],
                              ["greedy", "nrng4"]),
    "pt_proj_lr5e-3": glmtune(["--finetuning_type", "ptuning", "--prefix_projection", "--learning_rate", "5e-3"],
                              ["greedy", "nrng4"]),
    "pt_len32": glmtune(["--finetuning_type", "ptuning", "--pre_seq_len", "32"]),
    "pt_len64": glmtune(["--finetuning_type", "ptuning", "--pre_seq_len", "64"]),
    "pt_len256": glmtune(["--finetuning_type", "ptuning", "--pre_seq_len", "256"]),
    "pt_proj_lr1e-2": glmtune(["--finetuning_type", "ptuning", "--prefix_projection"]),
    "pt_proj_lr2e-3": glmtune(["--finetuning_type", "ptuning", "--prefix_projection", "--learning_rate", "2e-3"]),
    # LoRA: lr, rank, targets
    "lora_lr2e-4": glmtune(["--learning_rate", "2e-4"]),
    "lora_lr1e-3": glmtune(["--learning_rate", "1e-3"]),
    "lora_lr2e-3": glmtune(["--learning_rate", "2e-3"]),
    "lora_lr2e-3_dec": glmtune(["--learning_rate", "2e-3"], ["greedy", "nrng4", "rp1.1", "rp1.1_nrng4"]),
    "lora_lr2e-3_s2": glmtune(["--learning_rate", "2e-3", "--seed", "2"], ["greedy", "nrng4", "rp1.1"]),
    "lora_lr3e-3": glmtune(["--learning_rate", "3e-3"], ["greedy", "nrng4"]),
    "lora_r16": glmtune(["--lora_rank", "16", "--lora_alpha", "32"]),
    "lora_r32": glmtune(["--lora_rank", "32", "--lora_alpha", "64"]),
    "lora_qkvo": glmtune(["--lora_target", "q_proj,k_proj,v_proj,o_proj"]),
    "lora_seed_lengths": glmtune(["--max_source_length", "64", "--max_target_length", "64"]),
    "lora_chatglm_template": glmtune(["--template", "chatglm"]),
    # the moonshot: more epochs, more capacity, full fine-tuning
    "moon_lora_r32_10ep": glmtune(["--lora_rank", "32", "--lora_alpha", "64"], ["greedy", "rp1.1", "nrng4"],
                                  ["--max_steps", "1000", "--per_device_train_batch_size", "8"]),
    "moon_lora_5ep": glmtune([], ["greedy", "rp1.1", "nrng4"], FIVE_EPOCHS),
    "moon_full_lr2e-5_3ep": glmtune(["--finetuning_type", "full", "--learning_rate", "2e-5"], ["greedy", "rp1.1", "nrng4"],
                                    ["--max_steps", "300", "--per_device_train_batch_size", "8"]),
    "moon_full_lr5e-5_3ep": glmtune(["--finetuning_type", "full", "--learning_rate", "5e-5"], ["greedy", "rp1.1", "nrng4"],
                                    ["--max_steps", "300", "--per_device_train_batch_size", "8"]),
    "moon_full_lr2e-5_10ep": glmtune(["--finetuning_type", "full", "--learning_rate", "2e-5"], ["greedy", "rp1.1", "nrng4"],
                                     ["--max_steps", "1000", "--per_device_train_batch_size", "8"]),
    "moon_lora_lr2e-3_5ep": glmtune(["--learning_rate", "2e-3"], ["greedy", "nrng4", "rp1.1"], FIVE_EPOCHS),
    "moon_lora_r32_lr1e-3_5ep": glmtune(["--learning_rate", "1e-3", "--lora_rank", "32", "--lora_alpha", "64"],
                                        ["greedy", "nrng4"], FIVE_EPOCHS),
    "moon_full_lr1e-5_5ep": glmtune(["--finetuning_type", "full", "--learning_rate", "1e-5"], ["greedy", "rp1.1"], FIVE_EPOCHS),
    "moon_pt_10ep": glmtune(["--finetuning_type", "ptuning"], ["greedy", "rp1.1", "nrng4"],
                            ["--max_steps", "1000", "--per_device_train_batch_size", "8"]),
}
GROUPS = {
    "defaults": ["untuned", "plain_loop", "plain_loop_seed2", "lora_default", "lora_default_seed2", "pt_default",
                 "pt_default_seed2", "dpo_adgen"],
    "ptuning": [name for name in JOBS if name.startswith("pt_") and "default" not in name],
    "lora": [name for name in JOBS if name.startswith("lora_") and "default" not in name],
    "moonshot": [name for name in JOBS if name.startswith("moon_")],
}


def run(command: list[str], log: Path, deadline: float) -> int:
    with log.open("a", encoding="utf-8") as handle:
        handle.write("$ " + " ".join(command) + "\n")
        handle.flush()
        try:
            return subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, deadline - time.time())).returncode
        except subprocess.TimeoutExpired:
            handle.write("stopped at the deadline\n")
            return 124


def run_job(name: str, args: argparse.Namespace, deadline: float) -> None:
    job, out, work = JOBS[name], args.out / name, args.work / name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "log.txt"
    started = time.time()
    python = [sys.executable, "-m", "glmtune"]
    if (work / "done").exists():  # finished in an earlier call on this machine
        return
    if "script" in job:
        run([sys.executable, *(a.format(data=args.data, work=work, out=out) for a in job["script"])], log, deadline)
        for small in work.rglob("*.json*"):
            if small.stat().st_size < 2_000_000:
                shutil.copy(small, out / small.name)
    elif "plain_loop" in job:
        run([sys.executable, "benchmarks/quality/plain_loop.py", str(out / "greedy"), "--data", str(args.data),
             *job["plain_loop"], *(["--steps", "1", "--batch", "1", "--dev_limit", "2"] if args.smoke else [])], log, deadline)
    else:
        model: list[str] = []
        if not job.get("untuned"):
            model = ["--model_name_or_path", str(work / "model")]
            smoke = ["--max_steps", "1", "--per_device_train_batch_size", "1"] if args.smoke else []
            code = run(python + ["train", "--train_file", str(args.data / "train.json"), "--save_steps", "0",
                                 "--report_to", "none", "--overwrite_output_dir", "--output_dir", str(work / "model"),
                                 "--logging_steps", "10", *job["train"], *smoke], log, deadline)
            for small in (work / "model").glob("*"):
                if small.is_file() and small.stat().st_size < 2_000_000 and small.suffix not in {".safetensors", ".bin", ".pt"}:
                    shutil.copy(small, out / small.name)
            if code:
                return
        for decoding in job["decodings"]:
            run(python + ["predict", *model, "--test_file", str(args.data / "dev.json"), "--output_dir",
                          str(out / decoding), "--per_device_eval_batch_size", "16", *DECODING[decoding],
                          *(["--max_predict_samples", "2"] if args.smoke else [])], log, deadline)
    (out / "seconds").write_text(f"{time.time() - started:.0f}\n")
    if time.time() < deadline:
        work.mkdir(parents=True, exist_ok=True)
        (work / "done").touch()


def summary(out: Path) -> str:
    rows = ["| job | decoding | R-1 | R-2 | R-L | BLEU-4 |", "|---|---|---|---|---|---|"]
    for result in sorted(out.glob("*/*/predict_results.json")):
        metrics = json.loads(result.read_text())
        values = " | ".join(f"{metrics.get(f'predict_{k}', float('nan')):.2f}" for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"))
        rows.append(f"| {result.parent.parent.name} | {result.parent.name} | {values} |")
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with ADGEN train.json and dev.json")
    parser.add_argument("--work", type=Path, required=True, help="weights (large) go here")
    parser.add_argument("--out", type=Path, required=True, help="logs and metrics go here")
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds from the start; later jobs are stopped")
    parser.add_argument("--smoke", action="store_true", help="1 step at batch 1, 2 dev records: checks the plumbing")
    parser.add_argument("jobs", nargs="+")
    args = parser.parse_args()
    names = [name for item in args.jobs for name in GROUPS.get(item, [item])]
    unknown = [name for name in names if name not in JOBS]
    if unknown:
        parser.error(f"unknown job(s) {unknown}; known: {list(JOBS)} and groups {list(GROUPS)}")
    deadline = time.time() + args.deadline
    with ThreadPoolExecutor(args.parallel) as pool:
        list(pool.map(lambda name: run_job(name, args, deadline), names))
    (args.out / "summary.md").write_text(summary(args.out))
    print(summary(args.out))


if __name__ == "__main__":
    main()
