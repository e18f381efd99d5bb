#!/usr/bin/env python3
"""Peak memory and speed of --quantization_bit 4/8 on a ChatGLM-6B-sized model, one GPU, one run (issue 5).

Model: native ChatGLM-6B (``glmtune.models.chatglm``, GLM v1) built from a config with ChatGLM-6B's
dimensions (hidden 4096, 28 layers, 32 heads, MLP 16384, vocabulary 130528; 6.2B parameters), random
init, bf16. Data: random ids in ChatGLM-6B's training layout, 64 prompt + 64 answer tokens
(``prompt [gMASK] <sop> answer <eop>``), loss on the answer.

  train  P-Tuning v2 (pre_seq_len 128) and LoRA (r8 on query_key_value) at bf16, INT8 and INT4, with
         micro-batches bs1×ga16 and bs16×ga1, through glmtune's own loop (bf16 autocast); last, INT4
         LoRA bs16 with --gradient_checkpointing and with --torch_compile (which fuses the dequantization).
         Peak torch.cuda.max_memory_allocated and reserved, tokens/s, and glmtune.memory.estimate_memory's
         prediction next to the measured peak.
  infer  greedy generation, 64-token prompts, 64 new tokens, batch 1 and 32, at bf16, INT8, INT4.
  bnb    with --bnb: LoRA and INT4 generation on bitsandbytes NF4 (Linear4bit) for comparison; needs
         the carried wheel (PYTHONPATH=/tmp/site) and stops at once when it cannot import it.

Reference: the seed-style bf16 baseline (HF Trainer + PEFT LoRA r8 q,v, bs1×ga16, Llama-shaped 7.66B
proxy) trains at 1,076 tokens/s (../shared/bench/baseline_h200.json, config A).

Run on the device:  PYTHONPATH=/tmp/site python3 benchmarks/quantization_memory.py [--bnb]
CPU check:          python3 benchmarks/quantization_memory.py --tiny [--bnb]
Writes $OUT/quantization_memory.json (else benchmarks/results/); stops starting runs after --budget seconds.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

from common import environment, sync, write_json  # noqa: E402

from glmtune.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration  # noqa: E402
from glmtune.models import quantization  # noqa: E402
from glmtune.models.quantization import quantize_model  # noqa: E402

SEED_BASELINE_TOKENS_PER_S = 1076
SOURCE, TARGET, PRE_SEQ_LEN = 64, 64, 128
UNIT = {"GiB": 2**30, "MiB": 2**20}
unit = "GiB"  # MiB with --tiny


def model_config(tiny: bool) -> ChatGLMConfig:
    if tiny:
        return ChatGLMConfig(vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256,
                             bos_token_id=994, eos_token_id=995, mask_token_id=990, gmask_token_id=991, max_sequence_length=512)
    return ChatGLMConfig()  # the defaults are ChatGLM-6B's


def build(config: ChatGLMConfig, device: str, dtype: torch.dtype, bits: int | None, backend: str = "glmtune",
          embeddings: bool = True):
    """A random-init model on ``device``, its decoder linears quantized by ``backend`` when ``bits`` is set
    (glmtune: with ``embeddings``, the word embeddings and LM head as int8 too)."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = ChatGLMForConditionalGeneration(copy.deepcopy(config))  # P-Tuning edits model.config
    finally:
        torch.set_default_dtype(default)
    if bits and backend == "glmtune":
        quantize_model(model, bits, embeddings=embeddings)
    elif bits:
        bnb_nf4(model, dtype)
    return model


def bnb_nf4(model, dtype: torch.dtype) -> None:
    """bitsandbytes NF4 (blocksize 64, bf16 compute) in place of every decoder-layer linear, as QLoRA loads them."""
    import bitsandbytes as bnb

    for layer in model.transformer.layers:
        for parent in list(layer.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                            compute_dtype=dtype, quant_type="nf4", device=child.weight.device)
                    new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                    if child.bias is not None:
                        new.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
                    setattr(parent, name, new.to(child.weight.device))  # .to() quantizes


def samples(config: ChatGLMConfig, count: int) -> list:
    """(input_ids, labels) in ChatGLM-6B's layout: prompt [gMASK] <sop> answer <eop>, loss from <sop> on."""
    from glmtune.data.preprocess import Example

    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(count):
        prompt = torch.randint(5, config.mask_token_id, (SOURCE - 1,), generator=generator).tolist()
        answer = torch.randint(5, config.mask_token_id, (TARGET - 2,), generator=generator).tolist()
        ids = prompt + [config.gmask_token_id, config.bos_token_id] + answer + [config.eos_token_id]
        context = ids.index(config.bos_token_id)
        examples.append(Example(ids, [-100] * context + ids[context:]))
    return examples


def memory(device: str) -> dict:
    if device != "cuda":
        return {}
    return {"peak_alloc": _size(torch.cuda.max_memory_allocated()), "peak_reserved": _size(torch.cuda.max_memory_reserved())}


def _size(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / UNIT[unit], 2)


def fresh(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def train_run(config, device, dtype, method, bits, micro, accumulation, args, checkpointing=False, backend="glmtune",
              compile_layers=False, embeddings=True) -> dict:
    from glmtune.config import GlmtuneConfig
    from glmtune.memory import estimate_memory
    from glmtune.methods import get_method
    from glmtune.train.trainer import train

    class Tokenizer:
        pad_token_id = config.pad_token_id
        eos_token_id = config.eos_token_id

    fresh(device)
    model = build(config, device, dtype, bits, backend, embeddings)
    weights = torch.cuda.memory_allocated() if device == "cuda" else None
    run_config = GlmtuneConfig(
        finetuning_type=method, lora_rank=8, lora_alpha=32, lora_dropout=0.1, lora_target="query_key_value",
        pre_seq_len=PRE_SEQ_LEN if method == "ptuning" else None, per_device_train_batch_size=micro,
        gradient_accumulation_steps=accumulation, max_steps=args.warmup + args.steps, logging_steps=1, save_steps=0,
        report_to="none", learning_rate=1e-4, output_dir=tempfile.mkdtemp(), overwrite_output_dir=True,
        bf16=device == "cuda", gradient_checkpointing=checkpointing, torch_compile=compile_layers,
    )
    method_object = get_method(method)
    prepared = method_object.apply(model, run_config)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    result = train(prepared, Tokenizer(), method_object, run_config, samples(config, 16 * (args.warmup + args.steps)))
    log = [json.loads(line) for line in (Path(run_config.output_dir) / "train_log.jsonl").read_text().splitlines()]
    estimate = estimate_memory(config, method, bits, micro, SOURCE, TARGET, pre_seq_len=PRE_SEQ_LEN, lora_rank=8,
                               lora_target="query_key_value", lora_dropout=0.1, gradient_checkpointing=checkpointing,
                               dtype="bfloat16" if dtype == torch.bfloat16 else "float32", device=device,
                               quantize_embeddings=embeddings)
    entry = {"method": method, "bits": bits, "backend": backend, "micro_batch": micro, "accumulation": accumulation,
             "gradient_checkpointing": checkpointing, "torch_compile": compile_layers,
             "quantize_embeddings": bool(bits) and embeddings and backend == "glmtune", **memory(device),
             "tokens_per_s": round(statistics.median(e["tokens_per_s"] for e in log[args.warmup:]), 1),
             "final_loss": round(result.losses[-1], 4),
             "weights": _size(weights), "estimate_weights": _size(estimate["weights"]),
             "estimate_peak": _size(estimate["peak"])}
    del prepared, model
    return entry


@torch.no_grad()
def generate_run(config, device, dtype, bits, batch_sizes, backend="glmtune", embeddings=True) -> list[dict]:
    fresh(device)
    model = build(config, device, dtype, bits, backend, embeddings).eval()
    generator = torch.Generator().manual_seed(1)
    entries = []
    for batch in batch_sizes:
        prompt = torch.randint(5, config.mask_token_id, (batch, SOURCE - 2), generator=generator)
        specials = torch.tensor([[config.gmask_token_id, config.bos_token_id]] * batch)
        input_ids = torch.cat([prompt, specials], dim=1).to(device)
        model.generate(input_ids, max_new_tokens=2, eos_token_id=[], pad_token_id=config.pad_token_id)  # warm-up
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync()
        start = time.perf_counter()
        model.generate(input_ids, max_new_tokens=TARGET, eos_token_id=[], pad_token_id=config.pad_token_id)
        sync()
        seconds = time.perf_counter() - start
        entries.append({"bits": bits, "backend": backend, "batch": batch,
                        "quantize_embeddings": bool(bits) and embeddings and backend == "glmtune", **memory(device),
                        "generated_tokens_per_s": round(batch * TARGET / seconds, 1)})
    del model
    return entries


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a CPU check")
    parser.add_argument("--bnb", action="store_true", help="also run bitsandbytes NF4 for comparison")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget", type=float, default=360, help="start no new run after this many seconds")
    parser.add_argument("--bits", default="bf16,8,4", help="which of bf16,8,4 to run")
    parser.add_argument("--eager_dequantize", action="store_true", help="dequantize eagerly on CUDA too (not compiled)")
    parser.add_argument("--core", action="store_true", help="only the main rows: no bf16-vocabulary, GC or compile rows")
    args = parser.parse_args()
    global unit
    unit = "MiB" if args.tiny else "GiB"
    if args.bnb:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as error:
            sys.exit(f"--bnb: cannot import bitsandbytes ({error}); carry its wheel and run with PYTHONPATH=/tmp/site")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = model_config(args.tiny)
    started = time.perf_counter()

    bit_settings = [None if b == "bf16" else int(b) for b in args.bits.split(",")]
    if args.eager_dequantize:
        quantization.COMPILE_ON_CUDA = False
    # (kind, method, bits, micro-batch, gradient checkpointing, backend, torch.compile, quantize embeddings),
    # most wanted first
    runs = [("train", method, bits, micro, False, "glmtune", False, True)
            for bits in bit_settings for method in ("ptuning", "lora") for micro in (1, 16)]
    runs += [("generate", None, bits, None, False, "glmtune", False, True) for bits in bit_settings]
    if 4 in bit_settings and not args.core:  # what int8 vocabulary matrices save: the same runs with them in bf16
        runs += [("train", method, 4, 1, False, "glmtune", False, False) for method in ("ptuning", "lora")]
        runs += [("generate", None, 4, None, False, "glmtune", False, False)]
    if args.bnb:
        runs += [("train", "lora", 4, micro, False, "bnb", False, False) for micro in (1, 16)]
        runs += [("generate", None, 4, None, False, "bnb", False, False)]
    if not args.core:
        runs += [("train", "lora", 4, 16, True, "glmtune", False, True), ("train", "lora", 4, 16, False, "glmtune", True, True)]

    results = {"env": environment(), "args": vars(args), "unit": unit,
               "dequantize": "compiled" if device == "cuda" and quantization.COMPILE_ON_CUDA else "eager", "seed_style_bf16_tokens_per_s": SEED_BASELINE_TOKENS_PER_S,
               "train": [], "generate": [], "skipped": []}
    for kind, method, bits, micro, checkpointing, backend, compile_layers, embeddings in runs:
        accumulation = 16 // micro if micro else None
        flags = (" gc" if checkpointing else "") + (" compile" if compile_layers else "")
        flags += " bf16-vocab" if bits and backend == "glmtune" and not embeddings else ""
        shape = f"{method} bs{micro}x{accumulation}{flags}" if kind == "train" else "bs1,32"
        name = f"{kind} {bits or 'bf16'} {backend} {shape}"
        if time.perf_counter() - started > args.budget:
            results["skipped"].append(name)
            continue
        if kind == "train":
            entry = train_run(config, device, dtype, method, bits, micro, accumulation, args, checkpointing, backend,
                              compile_layers, embeddings)
            results["train"].append(entry)
        else:
            entry = generate_run(config, device, dtype, bits, (1, 32), backend, embeddings)
            results["generate"] += entry
        print(name, entry, flush=True)
        write_json("quantization_memory.json", results)

    print(f"\nseed-style bf16 baseline: {SEED_BASELINE_TOKENS_PER_S:,} tokens/s (Llama proxy, HF Trainer + PEFT LoRA, bs1×ga16)")
    print(f"| method | bits | backend | micro×accum | flags | peak alloc {unit} | reserved {unit} | estimate {unit} | tokens/s | weights {unit} (est.) |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def flags(e: dict) -> str:
        return " ".join(f for f, on in (("GC", e.get("gradient_checkpointing")), ("compile", e.get("torch_compile")),
                                        ("bf16 vocab", e["bits"] and e["backend"] == "glmtune" and not e["quantize_embeddings"])) if on)

    for e in results["train"]:
        print(f"| {e['method']} | {e['bits'] or 'bf16'} | {e['backend']} | {e['micro_batch']}×{e['accumulation']} | "
              f"{flags(e)} | {e.get('peak_alloc')} | {e.get('peak_reserved')} | "
              f"{e['estimate_peak']} | {e['tokens_per_s']:,.0f} | {e['weights']} ({e['estimate_weights']}) |")
    print(f"\n| generation | bits | backend | flags | batch | peak alloc {unit} | reserved {unit} | generated tokens/s |\n|---|---|---|---|---|---|---|---|")
    for e in results["generate"]:
        print(f"| 64 → 64 greedy | {e['bits'] or 'bf16'} | {e['backend']} | {flags(e)} | {e['batch']} | {e.get('peak_alloc')} | "
              f"{e.get('peak_reserved')} | {e['generated_tokens_per_s']:,.0f} |")
    if results["skipped"]:
        print(f"\nskipped (over --budget {args.budget:.0f}s): {', '.join(results['skipped'])}")
    print(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
