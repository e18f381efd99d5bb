#!/usr/bin/env python3
"""Where a predict batch's time goes (issue 13): the prefill and one decode step, kernel by kernel, and the
levers tried on them, all in one process on the proxy of generation_throughput.py.

Rows: the kernel table of a prefill and of an eager decode step (top kernels and time by kind); a decode
step replayed from its CUDA graph, eagerly, and compiled (torch.compile inside the graph) with and without
the visible-length buckets; a plain causal forward of the same prompts (what a flash prefill could do);
SDPA alone at the decode and prefill shapes per backend.

Run on the device: python benchmarks/generation_profile.py        (CPU check: --tiny)
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
import traceback
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import build_proxy, environment, sync, timed, write_json  # noqa: E402

import glmtune.eval.decoding as decoding  # noqa: E402
from glmtune.eval.generation import GenerationSettings, decode  # noqa: E402

KINDS = (("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul")), ("attention", ("fmha", "flash", "attention", "sdpa")),
         ("copy/index", ("copy", "cat", "index", "scatter", "gather", "fill")))


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KINDS if any(k in lowered for k in keys)), "elementwise/other")


def kernel_table(function, repeats: int) -> dict:
    """Device time of each kernel over ``repeats`` calls of ``function`` (per call), top 15 and by kind."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    sync()
    with profile(activities=activities) as prof:
        for _ in range(repeats):
            function()
        sync()
    per_kernel: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        on_device = event.device_type == torch.autograd.DeviceType.CUDA if cuda else not event.cpu_children
        if not on_device:
            continue
        record = per_kernel[event.name]
        record[0] += event.device_time if cuda else event.self_cpu_time_total
        record[1] += 1
    kinds: dict[str, float] = defaultdict(float)
    for name, (microseconds, _) in per_kernel.items():
        kinds[kind_of(name)] += microseconds / repeats / 1000
    top = sorted(per_kernel.items(), key=lambda item: -item[1][0])[:15]
    return {"total_ms": round(sum(kinds.values()), 3), "kernels_per_call": sum(c for _, c in per_kernel.values()) // repeats,
            "by_kind_ms": {k: round(v, 3) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": name[:110], "ms": round(us / repeats / 1000, 3), "calls": calls // repeats}
                    for name, (us, calls) in top]}


def step_ms(decoder, tokens, steps: int) -> float:
    """Mean ms of ``steps`` decode steps (the decoder's position moves on; call it on a fresh prefill)."""
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        decoder.step(tokens)
    sync()
    return round((time.perf_counter() - started) / steps * 1000, 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--batch", type=int, default=535)
    parser.add_argument("--source", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--rows", default="prefill,decode,compiled,fixed_visible", help="and sdpa")
    parser.add_argument("--json", default="generation_profile.json")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_proxy(args.tiny, device).eval()
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
                          autocast_adapter_dtype=False).eval()  # as methods/lora.py loads a trained adapter
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, model.config.vocab_size, (args.batch, args.source), generator=generator).tolist()
    settings = GenerationSettings(max_new_tokens=args.new)
    capacity = args.source + args.new
    tokens = torch.full((args.batch,), 5, dtype=torch.long, device=device)
    result = {"env": environment(), "args": vars(args)}

    def record(name, value):
        result[name] = value
        print(name, value, flush=True)
        write_json(args.json, result)

    wanted = set(args.rows.split(","))
    wanted |= {"varlen"} if "sdpa" in wanted else set()
    wanted |= {"graphs_whole_batch"} if "decode" in wanted else set()

    def attempt(name, function):
        if name not in wanted:
            return
        try:
            with torch.no_grad():
                record(name, function())
        except Exception as error:  # noqa: BLE001 - the other rows still run
            traceback.print_exc()
            record(name + "_error", repr(error)[:600])
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            result.setdefault("peak_alloc_gib", {})[name] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            torch.cuda.reset_peak_memory_stats()

    def fresh(use_graphs=None, compile_steps=False):
        decoder = decoding.SlotDecoder(lora, args.batch, capacity, use_graphs=use_graphs, compile_steps=compile_steps)
        decoder.position = args.source
        decoder.prefill(list(range(args.batch)), prompts, 0)
        return decoder

    def whole(decoder_factory) -> dict:
        first, first_s = timed(lambda: decode(decoder_factory(), prompts, 0, [], settings))
        decoder = decoder_factory()
        _, second_s = timed(lambda: decode(decoder, prompts, 0, [], settings))
        _, third_s = timed(lambda: decode(decoder, prompts, 0, [], settings))
        return {"first_call_s": round(first_s, 3), "warm_s": round(third_s, 3), "second_s": round(second_s, 3),
                "tokens_per_s_warm": round(args.batch * args.new / third_s, 1)}

    def prefill_rows():
        decoder = decoding.SlotDecoder(lora, args.batch, capacity, use_graphs=False)

        def prefill():
            decoder.position = args.source
            decoder.prefill(list(range(args.batch)), prompts, 0)

        prefill()
        _, seconds = timed(prefill)
        ids = torch.tensor(prompts, device=device)

        def plain():  # no cache, no mask: SDPA's causal flash path
            lora(input_ids=ids, use_cache=False, logits_to_keep=1)

        plain()
        _, plain_seconds = timed(plain)
        return {"prefill_s": round(seconds, 4), "plain_causal_forward_s": round(plain_seconds, 4),
                "prefill_kernels": kernel_table(prefill, 1), "plain_kernels": kernel_table(plain, 1)}

    def decode_rows():
        eager = fresh(use_graphs=False)
        eager.step(tokens)
        eager_ms = step_ms(eager, tokens, 5)
        table = kernel_table(lambda: eager.step(tokens), 3)
        graphs = fresh()
        graphs.step(tokens)
        return {"eager_step_ms_at_visible_80": eager_ms, "graph_step_ms": step_ms(graphs, tokens, 20),
                "eager_step_kernels": table}

    def compiled_rows():
        started = time.perf_counter()
        decoder = fresh(compile_steps=True)
        decoder.step(tokens)
        first = time.perf_counter() - started
        compiled_eager = fresh(use_graphs=False, compile_steps=True)
        compiled_eager.step(tokens)
        return {"first_step_with_compile_s": round(first, 1), "compiled_graph_step_ms": step_ms(decoder, tokens, 20),
                "whole_batch": whole(lambda: decoding.SlotDecoder(lora, args.batch, capacity, compile_steps=True)),
                "compiled_eager_step_kernels": kernel_table(lambda: compiled_eager.step(tokens), 3)}

    def fixed_visible_rows():
        original = decoding._round_up_visible
        decoding._round_up_visible = lambda length, capacity: capacity
        try:
            return {"graphs_eager_kernels": whole(lambda: decoding.SlotDecoder(lora, args.batch, capacity)),
                    "compiled": whole(lambda: decoding.SlotDecoder(lora, args.batch, capacity, compile_steps=True))}
        finally:
            decoding._round_up_visible = original

    def sdpa_rows():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        dtype = torch.bfloat16
        out = {}
        cache = torch.randn(args.batch, heads, capacity + 64, dim, device=device, dtype=dtype)
        q1 = torch.randn(args.batch, heads, 1, dim, device=device, dtype=dtype)
        keys = cache[:, :, :capacity]
        mask = torch.ones(args.batch, 1, 1, capacity, dtype=torch.bool, device=device)
        mask[:, :, :, :8] = False
        qp = torch.randn(args.batch, heads, args.source, dim, device=device, dtype=dtype)
        causal = torch.ones(args.source, args.source, dtype=torch.bool, device=device).tril()
        mask4 = causal[None, None].expand(args.batch, 1, -1, -1).contiguous()
        cases = {"decode_masked_sliced_cache": lambda: sdpa(q1, keys, keys, attn_mask=mask),
                 "decode_masked_contiguous": lambda: sdpa(q1, keys.contiguous(), keys.contiguous(), attn_mask=mask),
                 "decode_unmasked_sliced_cache": lambda: sdpa(q1, keys, keys),
                 "prefill_4d_mask": lambda: sdpa(qp, qp, qp, attn_mask=mask4),
                 "prefill_causal": lambda: sdpa(qp, qp, qp, is_causal=True)}
        backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH, "default": None}
        for case, function in cases.items():
            for backend_name, backend in backends.items():
                try:
                    if backend is None:
                        function()
                        _, seconds = timed(lambda: [function() for _ in range(10)])
                    else:
                        with sdpa_kernel(backend):
                            function()
                            _, seconds = timed(lambda: [function() for _ in range(10)])
                    out[f"{case}/{backend_name}"] = round(seconds / 10 * 1000, 4)
                except Exception as error:  # noqa: BLE001 - a backend that refuses the case
                    out[f"{case}/{backend_name}"] = type(error).__name__
        return {"ms_per_call_one_layer": out}

    def attention_rows():
        """Decode attention alone (one layer, q_len 1, masked cache slice): SDPA against the alternatives."""
        from torch.nn.attention.flex_attention import flex_attention
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        heads, dim = model.config.num_attention_heads, model.config.hidden_size // model.config.num_attention_heads
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        flex = torch.compile(flex_attention, dynamic=False)
        out = {}
        for visible in (80, 128):
            cache = torch.randn(2, args.batch, heads, capacity, dim, device=device, dtype=dtype)
            keys, values = cache[0, :, :, :visible], cache[1, :, :, :visible]
            query = torch.randn(args.batch, heads, 1, dim, device=device, dtype=dtype)
            valid = torch.ones(args.batch, visible, dtype=torch.bool, device=device)
            valid[::3, :9] = False
            mask = valid[:, None, None, :]

            def manual():
                scores = torch.matmul(query, keys.transpose(-1, -2)) * dim**-0.5
                scores = scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(dtype)
                return torch.matmul(scores, values)

            def score_mod(score, b, h, q_idx, kv_idx):
                return torch.where(valid[b, kv_idx], score, -float("inf"))

            compiled_manual = torch.compile(manual, dynamic=False)
            reference = sdpa(query, keys, values, attn_mask=mask)
            cases = {"sdpa_masked": lambda: sdpa(query, keys, values, attn_mask=mask),
                     "sdpa_unmasked": lambda: sdpa(query, keys, values),
                     "manual_eager": manual, "manual_compiled": compiled_manual,
                     "flex_score_mod": lambda: flex(query, keys, values, score_mod=score_mod)}
            for case, function in cases.items():
                try:
                    value = function()
                    error = (value.float() - reference.float()).abs().max().item() if case != "sdpa_unmasked" else None
                    _, seconds = timed(lambda: [function() for _ in range(20)])
                    out[f"v{visible}/{case}"] = {"ms": round(seconds / 20 * 1000, 4), "max_error": error}
                except Exception as error:  # noqa: BLE001 - a candidate that fails on this build
                    traceback.print_exc()
                    out[f"v{visible}/{case}"] = repr(error)[:300]
        read = 2 * args.batch * heads * 128 * dim * torch.empty(0, dtype=dtype).element_size()
        return {"one_layer": out, "kv_bytes_at_128": read}

    def head_rows():
        """The LM head on the last position: the sliced (strided) hidden states HF passes, and a contiguous copy."""
        head = lora.get_output_embeddings()
        hidden = torch.randn(args.batch, args.source, model.config.hidden_size, device=device, dtype=head.weight.dtype)
        last = hidden[:, -1:, :]
        out = {}
        for name, function in {"strided": lambda: head(last), "contiguous": lambda: head(last.contiguous())}.items():
            function()
            _, seconds = timed(lambda: [function() for _ in range(5)])
            out[name + "_ms"] = round(seconds / 5 * 1000, 3)
        return out

    def varlen_row():
        import torch.nn.attention.varlen as varlen

        return {"signature": str(inspect.signature(varlen.varlen_attn))}

    attempt("attention", attention_rows)
    attempt("head", head_rows)
    attempt("sdpa", sdpa_rows)
    attempt("varlen", varlen_row)
    attempt("prefill", prefill_rows)
    attempt("decode", decode_rows)
    attempt("graphs_whole_batch", lambda: whole(lambda: decoding.SlotDecoder(lora, args.batch, capacity)))
    attempt("compiled", compiled_rows)
    attempt("fixed_visible", fixed_visible_rows)
    print("wrote", write_json(args.json, result))


if __name__ == "__main__":
    main()
