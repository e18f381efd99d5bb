"""``glmtune serve``: an OpenAI-compatible HTTP API (FastAPI) in front of one ``Engine``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, plain or
streamed as server-sent events. Errors use OpenAI's shape (``{"error": {"message", "type", ...}}``),
so the official clients raise their usual exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.eval.generation import GenerationSettings
from glmtune.kb.qa import NO_ANSWER, KnowledgeQA, embedder_for
from glmtune.serve.engine import Engine, Output

BASE_SUFFIX = ":base"


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request bodies (unknown OpenAI parameters are accepted and ignored) ----

class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stream_options: dict | None = None
    seed: int | None = None
    stop: str | list[str] | None = None

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


def conversation_of(messages: list[Message]) -> tuple[str | None, list[tuple[str, str]], str]:
    """(system, earlier (query, answer) pairs, last query) of an OpenAI message list."""
    system = "\n\n".join(m.text() for m in messages if m.role in ("system", "developer")) or None
    pairs, query = [], None
    for message in (m for m in messages if m.role in ("user", "assistant")):
        if message.role == "user":
            query = message.text() if query is None else f"{query}\n\n{message.text()}"
        elif query is None:
            raise ApiError(400, "an assistant message must follow a user message", param="messages")
        else:
            pairs.append((query, message.text()))
            query = None
    if query is None:
        raise ApiError(400, "the last message must be from the user", param="messages")
    return system, pairs, query


# ---- generation ----

@dataclass
class Piece:
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


class StopScanner:
    """Cuts streamed text at the first stop string, holding back what could be the start of one."""

    def __init__(self, stop: str | list[str] | None):
        self.stops = [s for s in ([stop] if isinstance(stop, str) else stop or []) if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        self.held += text
        hits = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if hits:
            return self.held[: min(hits)], True
        cut = max(0, len(self.held) - self.hold)
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


async def generate(engine: Engine, prompt: list[int], settings: GenerationSettings, base: bool,
                   stop: str | list[str] | None) -> AsyncIterator[Piece]:
    """Pieces of the answer; the last one carries the finish reason. Leaving early cancels the job."""
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue[Output] = asyncio.Queue()

    def deliver(output: Output) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone: nobody is listening any more
            loop.call_soon_threadsafe(outputs.put_nowait, output)

    job = engine.submit(prompt, settings, deliver, base)
    scanner = StopScanner(stop)
    try:
        while True:
            output = await outputs.get()
            if output.error:
                raise ApiError(500, output.error, kind="server_error")
            text, hit = scanner.feed(output.text)
            if hit or output.finish_reason:
                tail = "" if hit else scanner.flush()
                yield Piece(text + tail, "stop" if hit else output.finish_reason, job.completion_tokens)
                return
            if text:
                yield Piece(text)
    finally:
        job.cancelled.set()


async def _fixed(text: str) -> AsyncIterator[Piece]:
    """An answer that needs no model (the knowledge base found nothing): one piece that ends it."""
    yield Piece(text, "stop")


def create_app(engine: Engine, api_key: str | None = None, knowledge: KnowledgeQA | None = None,
               embedder=None) -> FastAPI:
    """The FastAPI app serving ``engine``; with ``api_key`` every /v1 route needs ``Authorization: Bearer KEY``.
    With ``knowledge`` chat answers come from it and carry ``sources``; ``embedder`` serves /v1/embeddings."""
    app = FastAPI(title="glmtune", docs_url=None, redoc_url=None)
    models = [engine.name] + ([engine.name + BASE_SUFFIX] if engine.tuned else [])
    created = int(time.time())

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(ApiError(400, "the request body is not valid JSON").body(), status_code=400)
        param = ".".join(str(part) for part in first["loc"] if part != "body") or None
        return JSONResponse(ApiError(400, f"{param}: {first['msg']}", param=param).body(), status_code=400)

    def check_key(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created, "owned_by": "glmtune"}

    @router.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card(name) for name in models]}

    @router.get("/models/{name:path}")
    async def get_model(name: str) -> dict:
        if name not in models:
            raise ApiError(404, f"model {name!r} does not exist", param="model", code="model_not_found")
        return model_card(name)

    def settings_for(body: _Request, prompt: list[int], max_tokens: int | None) -> GenerationSettings:
        if body.model not in models:
            raise ApiError(400, f"unknown model {body.model!r}; this server has {', '.join(models)}",
                           param="model", code="model_not_found")
        room = engine.context_length - len(prompt)
        if max_tokens is None:
            if room < 1:
                raise ApiError(400, f"the prompt is {len(prompt)} tokens, the model's context is "
                                    f"{engine.context_length}", code="context_length_exceeded")
            max_tokens = min(engine.default_settings().max_new_tokens, room)
        try:
            engine.check_fits(prompt, max_tokens)
        except GlmtuneError as error:
            raise ApiError(400, str(error), param="max_tokens", code="context_length_exceeded") from None
        sampling = body.temperature > 0 if body.temperature is not None else engine.config.do_sample
        return engine.default_settings(
            max_new_tokens=max_tokens, do_sample=sampling, temperature=body.temperature or None, top_p=body.top_p,
            seed=body.seed if body.seed is not None else secrets.randbits(31),
        )

    def usage(prompt: list[int], completion_tokens: int) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens}

    async def respond(body: _Request, prompt: list[int], max_tokens: int | None, chat: bool,
                      sources: list[dict] | None = None, fixed: str | None = None) -> dict | StreamingResponse:
        settings = settings_for(body, prompt, max_tokens)
        base = body.model.endswith(BASE_SUFFIX) and engine.tuned
        pieces = _fixed(fixed) if fixed is not None else generate(engine, prompt, settings, base, body.stop)
        identity = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": body.model}
        if not body.stream:
            text, last = "", Piece("")
            async for last in pieces:
                text += last.text
            choice = {"index": 0, "finish_reason": last.finish_reason, "logprobs": None}
            choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            return {**identity, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                    "usage": usage(prompt, last.completion_tokens)} | ({"sources": sources} if sources is not None else {})
        return StreamingResponse(events(identity, pieces, chat, prompt, body.include_usage(), sources),
                                 media_type="text/event-stream")

    async def events(identity: dict, pieces: AsyncIterator[Piece], chat: bool, prompt: list[int], with_usage: bool,
                     sources: list[dict] | None = None):
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(text: str | None, finish_reason: str | None = None, role: bool = False) -> str:
            if chat:
                delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
            return _sse({**identity, "object": kind, "choices": [choice]})

        if chat:
            yield event("", role=True)
        try:
            async for piece in pieces:
                if piece.text:
                    yield event(piece.text)
                if piece.finish_reason:
                    yield event(None, piece.finish_reason)
                    if with_usage:
                        yield _sse({**identity, "object": kind, "choices": [],
                                    "usage": usage(prompt, piece.completion_tokens)})
                    if sources is not None:
                        yield _sse({**identity, "object": kind, "choices": [], "sources": sources})
        except ApiError as error:  # the status line is already sent: report it in the stream
            yield _sse(error.body())
        yield "data: [DONE]\n\n"

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest):
        system, history, query = conversation_of(body.messages)
        if knowledge is None:
            prompt = engine.chat_prompt(history, query, system)
            return await respond(body, prompt, body.max_completion_tokens or body.max_tokens, chat=True)
        grounding = await asyncio.to_thread(knowledge.ground, query)
        prompt = engine.chat_prompt(history, grounding.prompt or query, system)
        return await respond(body, prompt, body.max_completion_tokens or body.max_tokens, chat=True,
                             sources=grounding.sources(), fixed=NO_ANSWER if grounding.prompt is None else None)

    @router.post("/embeddings")
    async def embeddings(body: EmbeddingRequest) -> dict:
        if embedder is None:
            raise ApiError(404, "this server has no embedding model (start it with --embedding_model or a --kb "
                                "built with one)", code="model_not_found")
        if body.model != embedder.name:
            raise ApiError(400, f"unknown embedding model {body.model!r}; this server has {embedder.name}",
                           param="model", code="model_not_found")
        texts = [body.input] if isinstance(body.input, str) else body.input
        if any(not text for text in texts):
            raise ApiError(400, "input: empty text", param="input")
        vectors = await asyncio.to_thread(embedder.embed, texts)
        encode = ((lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if body.encoding_format == "base64"
                  else (lambda v: v.tolist()))
        tokens = embedder.token_count(texts)
        return {"object": "list", "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(vectors)]}

    @router.post("/completions")
    async def completions(body: CompletionRequest):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        return await respond(body, engine.text_prompt(prompts[0]), body.max_tokens, chat=False)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.include_router(router)
    return app


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(host: str, port: int, api_key: str | None) -> None:
    """Refuse an open server without a key, and a port that is taken, before loading the model."""
    if not is_loopback(host) and not api_key:
        raise GlmtuneError(f"refusing to serve on {host} without --api-key (anyone who reaches it could use the "
                           "model); set --api-key KEY or use --host 127.0.0.1")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise GlmtuneError(f"cannot listen on {host}:{port}: {error.strerror}") from None


def run_serve(config: GlmtuneConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> None:
    """Serve the OpenAI-compatible API until interrupted."""
    import uvicorn

    check_listen(host, port, api_key)
    knowledge = KnowledgeQA.from_config(config)
    embedder = embedder_for(config, knowledge)
    engine = Engine.from_config(config)
    uvicorn.run(create_app(engine, api_key, knowledge, embedder), host=host, port=port, log_level="info")
