#!/usr/bin/env python3
"""Generation speed in one run (issue 13): HF `generate` (dynamic and static cache) against glmtune's
decoding core at the same batch size, batch-1 chat in bf16 and INT4, and `glmtune serve` under load.

Setup: the ChatGLM-6B-sized random-init proxy (7.66B, bf16), 1,070 prompts of 64 tokens, 64 new tokens
each, greedy, no early stop. glmtune's batch size is its own choice from free memory (evened out over
the prompts); the HF rows use the same. The seed-style batch-1 loop is timed on --baseline_prompts.
The serve row starts the real OpenAI-compatible server on loopback and lets --clients streaming
clients send --serve_requests chat completions of --serve_tokens tokens (benchmarks/serve_load.py).
The JSON is rewritten after every row, so a run cut short keeps what it measured.

Run on the device: python benchmarks/generation_throughput.py      (CPU check: --tiny)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_proxy, environment, timed, write_json  # noqa: E402

from glmtune.eval.generation import (GenerationSettings, auto_batch_size, decoder_for, generate_batch,  # noqa: E402
                                     generate_texts)

ROWS = ("seed", "hf_dynamic", "hf_static", "chat_bf16", "ptuning", "lora", "eager", "compiled", "serve", "exactness",
        "chat_int4")


class IdTokenizer:
    """Stands in for a tokenizer: the benchmark measures generation, so 'decoding' joins ids."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def proxy_tokenizer(vocab_size: int):
    """One token per character of the serve queries and the template, the rest of the proxy's vocabulary
    filler tokens, so every id the random model picks decodes to text."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from serve_load import QUERIES

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    characters = sorted(set("".join(QUERIES)) | set("abcdefghijklmnopqrstuvwxyz0123456789 \n[]#*：，。问答Round"))
    tokens = specials + characters
    tokens += [f"<t{i}>" for i in range(vocab_size - len(tokens))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def hf_generate(model, prompts, batch_size, new, static):
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids = torch.tensor(prompts[start : start + batch_size], device=model.device)
        extra = {"cache_implementation": "static"} if static else {}
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, num_beams=1, pad_token_id=0, **extra)
        outputs += out[:, ids.shape[1] :].tolist()
    return outputs


def peak_gib():
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--prompts", type=int, default=1070)
    parser.add_argument("--source", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--baseline_prompts", type=int, default=4)
    parser.add_argument("--chat_tokens", type=int, default=256)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--serve_requests", type=int, default=256)
    parser.add_argument("--serve_tokens", type=int, default=64)
    parser.add_argument("--pre_seq_len", type=int, default=128)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"Comma-separated subset of {ROWS}.")
    parser.add_argument("--batch_size", type=int, default=None, help="default: glmtune's choice from free memory")
    parser.add_argument("--json", default="generation_throughput.json")
    args = parser.parse_args()
    rows = args.rows.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_proxy(args.tiny, device).eval()
    model.generation_config.eos_token_id = None  # no early stop: every prompt gets exactly --new tokens
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.prompts, args.source), generator=generator).tolist()
    batch_size = args.batch_size or auto_batch_size(model, args.source, args.new, args.prompts)
    result = {"env": environment(), "args": vars(args), "batch_size": batch_size}
    settings = GenerationSettings(max_new_tokens=args.new)
    total = args.prompts * args.new

    def record(name, value):
        result[name] = value
        print(name, value, flush=True)
        write_json(args.json, result)

    def attempt(name, function):
        """One row; a failure is recorded and the run goes on to the next row."""
        if name.split(":")[0] not in rows:
            return None
        try:
            return function()
        except Exception as error:  # noqa: BLE001 - the table keeps the rows that worked
            traceback.print_exc()
            record(name.split(":")[-1] + "_error", repr(error)[:500])
            return None
        finally:  # the next row starts with the memory of this one returned
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def seed_row():
        hf_generate(model, prompts[:1], 1, args.new, static=False)  # warm-up
        _, seconds = timed(lambda: hf_generate(model, prompts[: args.baseline_prompts], 1, args.new, static=False))
        record("seed_batch1", {"prompts": args.baseline_prompts, "tokens_per_s": round(args.baseline_prompts * args.new / seconds, 1)})

    def hf_row(name, static):
        reset_peak()
        warm_started = time.perf_counter()
        hf_generate(model, prompts[:batch_size], batch_size, args.new, static)  # warm-up (static: compiles)
        warm_up = time.perf_counter() - warm_started
        _, seconds = timed(lambda: hf_generate(model, prompts, batch_size, args.new, static))
        record(name, {"batch_size": batch_size, "seconds": round(seconds, 3), "tokens_per_s": round(total / seconds, 1),
                      "warm_up_s": round(warm_up, 1), "peak_alloc_gib": peak_gib()})

    def chat_row(name, chat_model):
        """Batch-1 decoding as chat and serve run it: one decoder kept across answers (its graphs made once)."""
        reset_peak()
        prompt = prompts[:1]
        chat_settings = GenerationSettings(max_new_tokens=args.chat_tokens)
        cold, cold_seconds = timed(lambda: generate_batch(chat_model, prompt, 0, [], chat_settings))
        decoder = decoder_for(chat_model, 1, args.source, chat_settings)
        generate_batch(chat_model, prompt, 0, [], chat_settings, decoder=decoder)  # warm-up: graphs made
        short = GenerationSettings(max_new_tokens=8)
        _, short_seconds = timed(lambda: generate_batch(chat_model, prompt, 0, [], short, decoder=decoder))
        tokens, seconds = timed(lambda: generate_batch(chat_model, prompt, 0, [], chat_settings, decoder=decoder))
        record(name, {"new_tokens": len(tokens[0]), "seconds": round(seconds, 3),
                      "tokens_per_s": round(len(tokens[0]) / seconds, 1),
                      "decode_tokens_per_s": round((args.chat_tokens - 8) / (seconds - short_seconds), 1),
                      "first_call_tokens_per_s": round(len(cold[0]) / cold_seconds, 1), "peak_alloc_gib": peak_gib()})

    def compiled_row(name, tuned):
        """predict --compile_generation: the first call compiles (its time recorded), the second is timed."""
        compiled = GenerationSettings(max_new_tokens=args.new, compile_steps=True)
        reset_peak()
        (_, _), first_seconds = timed(lambda: generate_texts(tuned, IdTokenizer(), prompts, compiled, batch_size,
                                                             show_progress=False))
        (texts, _), seconds = timed(lambda: generate_texts(tuned, IdTokenizer(), prompts, compiled, batch_size,
                                                           show_progress=False))
        generated = sum(len(t.split()) for t in texts)
        record(name, {"batch_size": batch_size, "generated_tokens": generated, "seconds": round(seconds, 3),
                      "tokens_per_s": round(generated / seconds, 1), "first_call_s_with_compilation": round(first_seconds, 1),
                      "first_call_tokens_per_s": round(generated / first_seconds, 1), "peak_alloc_gib": peak_gib()})

    def predict_row(name, tuned):
        generate_texts(tuned, IdTokenizer(), prompts[:8], settings, batch_size=8, show_progress=False)  # warm-up
        reset_peak()
        (texts, _), seconds = timed(lambda: generate_texts(tuned, IdTokenizer(), prompts, settings, batch_size,
                                                           show_progress=False))
        generated = sum(len(t.split()) for t in texts)
        one = GenerationSettings(max_new_tokens=1)
        _, prefill_seconds = timed(lambda: generate_texts(tuned, IdTokenizer(), prompts, one, batch_size, show_progress=False))
        record(name, {"batch_size": batch_size, "generated_tokens": generated, "seconds": round(seconds, 3),
                      "tokens_per_s": round(generated / seconds, 1), "prefill_only_s": round(prefill_seconds, 3),
                      "peak_alloc_gib": peak_gib()})

    def ptuning_rows():
        from glmtune.methods.ptuning import PrefixTuningModel

        ptuned = PrefixTuningModel(model, args.pre_seq_len, projection=False, projection_hidden=None).to(device)
        with torch.no_grad():
            ptuned.prefix_encoder.embedding.weight.normal_(0, 1)
        predict_row(f"glmtune_ptuning{args.pre_seq_len}", ptuned)
        attempt("compiled:glmtune_ptuning_compiled", lambda: compiled_row(f"glmtune_ptuning{args.pre_seq_len}_compiled", ptuned))

    def lora_rows(lora):
        predict_row("glmtune_lora", lora)
        attempt("compiled:glmtune_lora_compiled", lambda: compiled_row("glmtune_lora_compiled", lora))
        os.environ["GLMTUNE_CUDA_GRAPHS"] = "0"
        try:
            attempt("eager:glmtune_lora_eager_decode", lambda: predict_row("glmtune_lora_eager_decode", lora))
        finally:
            os.environ.pop("GLMTUNE_CUDA_GRAPHS")
        count = args.baseline_prompts
        batched = generate_batch(lora, prompts[:count], 0, [], settings)
        reference = hf_generate(lora, prompts[:count], 1, args.new, static=False)
        singles = [generate_batch(lora, [p], 0, [], settings)[0] for p in prompts[:count]]
        def agreement(ours):
            first_difference = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) for x, y in zip(ours, reference)]
            return {"rows_equal": sum(a == b for a, b in zip(ours, reference)) / count,
                    "first_tokens_equal": sum(x[0] == y[0] for x, y in zip(ours, reference)) / count,
                    "mean_tokens_before_first_difference": sum(first_difference) / count}

        record("bf16_agreement_with_hf_batch1", {"glmtune_batch1": agreement(singles), "glmtune_batched": agreement(batched)})

    def int4_row():
        from glmtune.models.quantization import quantize_model

        quantize_model(model, 4)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        chat_row("chat_int4_batch1", model)

    attempt("seed", seed_row)
    attempt("hf_dynamic", lambda: hf_row("hf_dynamic", False))
    attempt("hf_static", lambda: hf_row("hf_static", True))
    attempt("chat_bf16", lambda: chat_row("chat_bf16_batch1", model))
    attempt("ptuning", ptuning_rows)
    lora = None
    if "lora" in rows or "serve" in rows:
        from peft import LoraConfig, get_peft_model

        # The adapter in the base's dtype, as glmtune loads a trained adapter for predict/chat/serve (methods/lora.py).
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                              autocast_adapter_dtype=False).eval()
    attempt("lora", lambda: lora_rows(lora))
    attempt("serve", lambda: record("serve", serve_row(lora, args)))
    if lora is not None:
        model = lora.unload()
        del lora
    attempt("exactness", lambda: record("fp32_2layer_rows_equal_to_hf_generate", exactness(args, prompts, device, settings)))
    attempt("chat_int4", int4_row)
    print("wrote", write_json(args.json, result))


def serve_row(lora, args) -> dict:
    from serve_load import percentile, run_load, start_server

    from glmtune.config import GlmtuneConfig
    from glmtune.data.templates import get_template
    from glmtune.methods.loading import ModelBundle
    from glmtune.serve.engine import Engine

    tokenizer = proxy_tokenizer(lora.config.vocab_size)
    config = GlmtuneConfig(max_new_tokens=args.serve_tokens, template="chatglm")
    engine = Engine(ModelBundle(lora, tokenizer, get_template("chatglm", tokenizer), None), config, True, "proxy-lora")
    engine.stop_ids = []  # no early stop, as in the predict rows
    server, url = start_server(engine)
    asyncio.run(run_load(url, engine.name, args.clients, args.clients, args.serve_tokens))  # warm-up: graphs made
    results, errors, seconds = asyncio.run(run_load(url, engine.name, args.clients, args.serve_requests, args.serve_tokens))
    server.should_exit = True
    engine.close()
    latencies = [r["latency"] for r in results]
    first = [r["first_token"] for r in results if r["first_token"] is not None]
    return {"clients": args.clients, "requests": args.serve_requests, "max_tokens": args.serve_tokens, "ok": len(results),
            "errors": len(errors), "error_sample": sorted(set(errors))[:3], "seconds": round(seconds, 2),
            "tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 1),
            **{f"latency_p{q}_s": round(percentile(latencies, q), 3) for q in (50, 99) if latencies},
            **{f"first_token_p{q}_s": round(percentile(first, q), 3) for q in (50, 99) if first}}


def exactness(args, prompts, device, settings) -> dict:
    """In float32 (a 2-layer model of the same width) batched glmtune must equal HF generate row for row."""
    small = build_proxy(args.tiny, device, dtype=torch.float32, num_hidden_layers=2).eval()
    small.generation_config.eos_token_id = None
    count = args.baseline_prompts
    varied = [p[: args.source - 7 * (i % 5)] for i, p in enumerate(prompts[:count])]  # mixed lengths: left padding
    reference = [hf_generate(small, [p], 1, args.new, static=False)[0] for p in prompts[:count]]
    reference_varied = [hf_generate(small, [p], 1, args.new, static=False)[0] for p in varied]
    return {
        "same_length_batch": sum(a == b for a, b in zip(generate_batch(small, prompts[:count], 0, [], settings), reference)) / count,
        "mixed_length_batch": sum(a == b for a, b in zip(generate_batch(small, varied, 0, [], settings), reference_varied)) / count,
    }


if __name__ == "__main__":
    main()
