"""Shared pieces of the benchmark scripts: the ChatGLM-6B-sized proxy model, timing, environment record."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def proxy_config(tiny: bool, **overrides):
    """The baseline's random-init Llama with ChatGLM-6B dims (../shared/bench/baseline_hf_peft.py)."""
    from transformers import LlamaConfig

    if tiny:
        sizes = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     intermediate_size=172, vocab_size=1000)
    else:
        sizes = dict(hidden_size=4096, num_hidden_layers=28, num_attention_heads=32, num_key_value_heads=32,
                     intermediate_size=13696, vocab_size=130528)
    return LlamaConfig(max_position_embeddings=2048, tie_word_embeddings=False, rms_norm_eps=1e-5, hidden_act="silu",
                       use_cache=True, pad_token_id=0, bos_token_id=1, eos_token_id=2, **{**sizes, **overrides})


def build_proxy(tiny: bool, device: str, dtype=torch.bfloat16, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(proxy_config(tiny, **overrides), dtype=dtype, attn_implementation="sdpa")
    return model


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(function):
    sync()
    start = time.perf_counter()
    value = function()
    sync()
    return value, time.perf_counter() - start


def environment() -> dict:
    import peft
    import transformers

    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(),
    }


def write_json(name: str, data: dict) -> Path:
    folder = Path(os.environ.get("OUT", "benchmarks/results"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(data, indent=1))
    return path


def microseconds(function, repeats: int) -> float:
    """Mean µs of ``function`` over ``repeats`` calls, on CUDA replayed from one CUDA graph: launched one by one
    from Python, a call of a few microseconds of work costs tens."""
    function()
    sync()
    if not torch.cuda.is_available():
        _, seconds = timed(lambda: [function() for _ in range(repeats)])
        return seconds / repeats * 1e6
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            function()
    graph.replay()
    _, seconds = timed(lambda: [graph.replay() for _ in range(5)])
    return seconds / (5 * repeats) * 1e6
