"""The issue's "plain PEFT loop" baseline, reproduced independently of glmtune's training code.

PEFT LoRA r8 (alpha 16, dropout 0.05) on q/k/v/o of the bundled Gemma 3 270M, AdamW lr 2e-4 with linear decay,
prompt `{content}\n广告文案：`, full-length answers + EOS (loss on answers only), batch 8, 150 steps, then greedy
decoding of 96 new tokens on dev.json, scored with glmtune's THUDM-exact metrics.

Usage: python benchmarks/quality/plain_loop.py OUT_DIR [--data ../shared/data/adgen] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from glmtune.eval.generation import GenerationSettings, generate_texts
from glmtune.eval.metrics import compute_metrics
from glmtune.models.loading import default_device, default_model_folder

PROMPT = "{content}\n广告文案："


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--data", default="../shared/data/adgen")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dev_limit", type=int, default=None, help="score only the first N dev records (smoke tests)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    folder = default_model_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    device = default_device()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).to(device)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.05,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()

    examples = []
    for record in read(Path(args.data) / "train.json"):
        prompt = tokenizer(PROMPT.format(content=record["content"]))["input_ids"]  # BOS added by the tokenizer
        answer = tokenizer(record["summary"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt + answer, [-100] * len(prompt) + answer))

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=args.steps)
    order: list[int] = []
    model.train()
    started = time.perf_counter()
    log = []
    for step in range(1, args.steps + 1):
        if len(order) < args.batch:
            order += random.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[: args.batch]], order[args.batch :]
        length = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), length), tokenizer.pad_token_id)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for row, (ids, labs) in enumerate(batch):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, : len(ids)] = torch.tensor(labs)
            mask[row, : len(ids)] = 1
        loss = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        log.append({"step": step, "loss": loss.item(), "seconds": round(time.perf_counter() - started, 1)})
        if step % 10 == 0:
            print(json.dumps(log[-1]), flush=True)
    (out / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))

    dev = read(Path(args.data) / "dev.json")[: args.dev_limit]
    prompts = [tokenizer(PROMPT.format(content=r["content"]))["input_ids"] for r in dev]
    predictions, seconds = generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=96), 16)
    labels_text = [r["summary"] for r in dev]
    (out / "generated_predictions.txt").write_text(
        "".join(json.dumps({"labels": l, "predict": p}, ensure_ascii=False) + "\n" for l, p in zip(labels_text, predictions)),
        encoding="utf-8")
    metrics = {f"predict_{k}": v for k, v in compute_metrics(predictions, labels_text).items()}
    metrics["predict_runtime"] = round(seconds, 1)
    (out / "predict_results.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
