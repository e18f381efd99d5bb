#!/usr/bin/env python3
"""Load test of `glmtune serve` on loopback: concurrent streaming chat clients, a fixed number of requests.

Starts the OpenAI-compatible server in this process on a free 127.0.0.1 port, lets --clients clients
send --requests streamed chat completions between them (each client sends its next request when the
last one ends), and prints latency percentiles, throughput and the error count. It stops by itself:
the request count is fixed and every request has a time limit. Exits 1 if any request failed.

    python benchmarks/serve_load.py --tiny                                   # tiny random Llama, seconds
    python benchmarks/serve_load.py --model_name_or_path output/run1 --clients 64 --requests 256
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import environment, write_json  # noqa: E402

from glmtune.config import parse_config  # noqa: E402
from glmtune.serve.api import create_app  # noqa: E402
from glmtune.serve.engine import Engine  # noqa: E402

QUERIES = ["类型#上衣*颜色#白色", "类型#裙*风格#复古", "类型#裤*版型#宽松*风格#休闲*图案#格子", "你好",
           "写一句广告语"]
REQUEST_TIMEOUT_S = 120


def start_server(engine: Engine):
    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return server, f"http://127.0.0.1:{port}/v1"


async def one_request(client: httpx.AsyncClient, url: str, model: str, index: int, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": QUERIES[index % len(QUERIES)]}],
            "max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    first_token, tokens, done = None, 0, False
    async with client.stream("POST", f"{url}/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first_token is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first_token = time.perf_counter() - started
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return {"latency": time.perf_counter() - started, "first_token": first_token, "tokens": tokens}


async def run_load(url: str, model: str, clients: int, requests: int,
                   max_tokens: int) -> tuple[list[dict], list[str], float]:
    results: list[dict] = []
    errors: list[str] = []
    next_index = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(client: httpx.AsyncClient) -> None:
        for index in next_index:
            try:
                request = one_request(client, url, model, index, max_tokens)
                results.append(await asyncio.wait_for(request, REQUEST_TIMEOUT_S))
            except Exception as error:  # counted and reported, the load goes on
                errors.append(f"{type(error).__name__}: {error}")

    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=REQUEST_TIMEOUT_S) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
    return results, errors, time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max_tokens", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="Serve a tiny random Llama built on the spot.")
    parser.add_argument("--json", default=None, help="Also write the results to benchmarks/results/NAME.")
    args, model_flags = parser.parse_known_args()
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from tiny_models import build_model_folder

        model_flags += ["--model_name_or_path", str(build_model_folder(Path(tempfile.mkdtemp()) / "tiny", "llama"))]
    engine = Engine.from_config(parse_config(model_flags))
    server, url = start_server(engine)
    results, errors, seconds = asyncio.run(run_load(url, engine.name, args.clients, args.requests, args.max_tokens))
    server.should_exit = True
    latencies = [r["latency"] for r in results]
    first = [r["first_token"] for r in results if r["first_token"] is not None]
    summary = {
        "model": engine.name, "clients": args.clients, "requests": args.requests, "max_tokens": args.max_tokens,
        "ok": len(results), "errors": len(errors), "seconds": round(seconds, 2),
        "requests_per_s": round(len(results) / seconds, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in results) / seconds, 1),
        **{f"latency_p{q}_s": round(percentile(latencies, q), 3) for q in (50, 90, 99) if latencies},
        **{f"first_token_p{q}_s": round(percentile(first, q), 3) for q in (50, 90, 99) if first},
        "environment": environment(),
    }
    print(json.dumps(summary, indent=1))
    for error in sorted(set(errors))[:5]:
        print("error:", error, file=sys.stderr)
    if args.json:
        print("wrote", write_json(args.json, summary))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
