"""``glmtune serve``: an OpenAI-compatible HTTP API (FastAPI) in front of one ``Engine``.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (with ``tools``/``tool_choice`` and
``response_format``) and ``POST /v1/completions``, plain or streamed as server-sent events. Errors use
OpenAI's shape (``{"error": {"message", "type", "param", ...}}``), so the official clients raise their
usual exceptions; every parameter glmtune does not implement is such a 400, naming it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import ipaddress
import json
import re
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from glmtune.config import GlmtuneConfig
from glmtune.data.formats import Conversation, Turn
from glmtune.data.preprocess import build_prompts
from glmtune.data.tools import FALLBACK, ToolCall, call_splitter, parse_answer
from glmtune.errors import GlmtuneError
from glmtune.eval.generation import GenerationSettings
from glmtune.models.introspect import text_config
from glmtune.serve.constraints import Constraints, GrammarProcessor
from glmtune.kb.qa import NO_ANSWER, KnowledgeQA, embedder_for
from glmtune.serve.engine import Engine, Output

BASE_SUFFIX = ":base"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024  # 4 MiB: above a long context's worth of text, far below memory trouble
DISCONNECT_POLL_S = 0.2  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---- request bodies ----
# Strict: a wrong type is a 400, never coerced ("4" is not 4), and a parameter glmtune does not implement is
# a 400 naming it (extra="forbid"), as OpenAI's API answers; nothing is silently dropped.

MAX_SEED = 2**63 - 1
UNSUPPORTED_VALUES = {"n": "glmtune returns one choice per request (n=1)",
                      "logprobs": "glmtune does not return log probabilities (logprobs=false)"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: Literal[1] | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    logprobs: Literal[False] | None = None
    user: str | None = None  # an end-user id for the caller's own records; it changes nothing here

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


Content = str | list[TextPart]


def _text(content: Content | None) -> str:
    if isinstance(content, list):
        return "".join(part.text for part in content)
    return content or ""


class FunctionCallIn(_Strict):
    name: str
    arguments: str


class ToolCallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class SystemMessage(_Strict):
    role: Literal["system", "developer"]
    content: Content


class UserMessage(_Strict):
    role: Literal["user"]
    content: Content


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Content | None = None
    tool_calls: list[ToolCallIn] | None = None


class ToolMessage(_Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class FunctionSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # the arguments always follow the schema under a forced call; see the README


class ToolSpec(_Strict):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaSpec(_Strict):
    name: str
    description: str | None = None
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]


def conversation_of(messages: list[Message], functions: list[dict] | None = None) -> Conversation:
    """The conversation of an OpenAI message list: system text, (query or tool results, answer or calls) turns."""
    system = "\n\n".join(_text(m.content) for m in messages if isinstance(m, SystemMessage)) or None
    turns: list[Turn] = []
    current: Turn | None = None
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if isinstance(message, UserMessage):
            if current is not None and current.observations:
                raise ApiError(400, f"{where}: a user message cannot follow tool results; the assistant answers them "
                                    "first", param=where)
            current = Turn(_text(message.content), "") if current is None else \
                Turn(f"{current.query}\n\n{_text(message.content)}", "")
        elif isinstance(message, ToolMessage):
            if current is not None and not current.observations:
                raise ApiError(400, f"{where}: a tool message must follow an assistant message with tool_calls",
                               param=where)
            if message.tool_call_id not in {call.id for call in (turns[-1].calls if turns else [])}:
                raise ApiError(400, f"{where}.tool_call_id: {message.tool_call_id!r} answers no tool call of the "
                                    "assistant message before it", param=f"{where}.tool_call_id")
            if current is None:
                current = Turn("", "", observations=[])
            current.observations.append(_text(message.content))
        elif isinstance(message, AssistantMessage):
            if current is None:
                raise ApiError(400, "an assistant message must follow a user message", param="messages")
            current.answer = _text(message.content)
            current.calls = [_call_in(call, f"{where}.tool_calls.{i}") for i, call in enumerate(message.tool_calls or [])]
            turns.append(current)
            current = None
    if current is None:
        raise ApiError(400, "the last message must be from the user (or a tool result)", param="messages")
    turns.append(current)
    return Conversation(turns, system=system, tools=functions or None)


def _call_in(call: ToolCallIn, where: str) -> ToolCall:
    try:
        arguments = json.loads(call.function.arguments) if call.function.arguments.strip() else {}
    except json.JSONDecodeError as error:
        raise ApiError(400, f"{where}.function.arguments: not valid JSON ({error.msg})",
                       param=f"{where}.function.arguments") from None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"{where}.function.arguments: must be a JSON object", param=f"{where}.function.arguments")
    return ToolCall(call.function.name, arguments, call.id)


def _lone_surrogate(value, path: str = "") -> str | None:
    """The path of the first string that is not valid Unicode (a lone UTF-16 surrogate such as "\\ud800")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        found = _lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found:
            return found
    return None


def check_unicode(body: BaseModel) -> None:
    where = _lone_surrogate(body.model_dump(by_alias=True, exclude_none=True))
    if where:
        raise ApiError(400, f"{where}: contains a lone surrogate (e.g. \\ud800); text must be valid Unicode",
                       param=where)


class EmbeddingRequest(_Strict):

    model: str
    input: str | list[str] = Field(min_length=1)
    encoding_format: Literal["float", "base64"] = "float"


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


@dataclass
class ToolPlan:
    """What a chat request asks of tools and formats: the functions shown in the prompt, the names whose
    calls are read back from the answer (None: read none), and the grammar that constrains decoding."""

    functions: list[dict] = field(default_factory=list)
    known: set[str] | None = None
    processor: GrammarProcessor | None = None


async def collect(pieces: AsyncIterator[Piece], request: Request) -> tuple[str, Piece]:
    """The whole answer and its last piece; a client that hangs up cancels the generation."""
    async def consume() -> tuple[str, Piece]:
        text, last = "", Piece("")
        async for last in pieces:
            text += last.text
        return text, last

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ApiError(499, "the client closed the connection", kind="client_closed")
    finally:
        if not task.done():
            task.cancel()  # the generator's cleanup cancels the engine's job
            with contextlib.suppress(asyncio.CancelledError):
                await task


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413, before anything parses it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        body, more = b"", True
        while more:  # read it all here, so a chunked body without a length is counted too
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = ApiError(413, f"the request body is over {self.limit} bytes (--max_request_bytes)",
                         code="request_too_large")
        await JSONResponse(error.body(), status_code=413)(scope, receive, send)


def _param(location: tuple) -> str | None:
    """``messages.0.content`` from pydantic's location, without the union tags it inserts."""
    parts: list[str] = []
    for part in location:
        if part == "body" or (isinstance(part, str) and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", part)):
            continue
        if isinstance(part, str) and (part in _UNION_LABELS or (part in _ROLE_TAGS and parts and parts[-1].isdigit())):
            continue
        parts.append(str(part))
    return ".".join(parts) or None


_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool"}
_UNION_LABELS = {"str", "int", "float", "bool", "dict", "list", "literal"}


async def _fixed(text: str) -> AsyncIterator[Piece]:
    """An answer that needs no model (the knowledge base found nothing): one piece that ends it."""
    yield Piece(text, "stop")


def create_app(engine: Engine, api_key: str | None = None, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
               knowledge: KnowledgeQA | None = None, embedder=None) -> FastAPI:
    """The FastAPI app serving ``engine``; with ``api_key`` every /v1 route (and /openapi.json) needs
    ``Authorization: Bearer KEY``. Request bodies over ``max_request_bytes`` are refused with 413.
    With ``knowledge`` chat answers come from it and carry ``sources``; ``embedder`` serves /v1/embeddings."""
    app = FastAPI(title="glmtune", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=max_request_bytes)
    models = [engine.name] + ([engine.name + BASE_SUFFIX] if engine.tuned else [])
    created = int(time.time())
    # One thread tokenizes (and compiles grammars) off the event loop: a megabyte prompt takes seconds, and
    # a fast tokenizer must not be used from two threads at once ("Already borrowed").
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="glmtune-tokenize")
    syntax = engine.tool_syntax or FALLBACK
    constraints = Constraints(engine.tokenizer, text_config(engine.model).vocab_size, engine.tool_stop_ids, syntax)

    async def off_loop(function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(tokenizing, function, *args)
        except GlmtuneError as error:
            raise ApiError(400, str(error)) from None

    @app.exception_handler(ApiError)
    async def api_error(_: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        if first["type"] == "json_invalid":
            return JSONResponse(ApiError(400, "the request body is not valid JSON").body(), status_code=400)
        param = _param(first["loc"])
        if first["type"] == "extra_forbidden":
            message = f"{param}: glmtune does not support this parameter"
        elif param in UNSUPPORTED_VALUES:
            message = f"{param}: {UNSUPPORTED_VALUES[param]}"
        else:
            message = f"{param}: {first['msg']}"
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:  # a bug still answers in OpenAI's shape
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error").body(),
                            status_code=500)

    def check_key(authorization: str | None = Header(None)) -> None:
        if api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           code="invalid_api_key", kind="authentication_error")

    router = APIRouter(prefix="/v1", dependencies=[Depends(check_key)])

    @app.get("/openapi.json", dependencies=[Depends(check_key)], include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

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

    def tool_plan(body: ChatRequest) -> ToolPlan:
        """Check tools, tool_choice and response_format together, and compile the grammar they need."""
        functions = [{"name": t.function.name, "description": t.function.description or "",
                      "parameters": t.function.parameters or {"type": "object", "properties": {}}}
                     for t in body.tools or []]
        choice = body.tool_choice or ("auto" if functions else "none")
        if choice != "none" and not functions:
            raise ApiError(400, "tool_choice: needs tools", param="tool_choice")
        wanted = body.response_format.type if body.response_format else "text"
        if engine.tool_syntax is None and (choice != "none" or wanted != "text"):
            param = "tools" if choice != "none" else "response_format"
            raise ApiError(400, f"{param}: not supported with ChatGLM-6B (v1): it has no tool format (its tokenizer "
                                "has no role tokens) and glmtune cannot constrain its vocabulary", param=param)
        if wanted != "text" and choice != "none":
            raise ApiError(400, "response_format: not supported together with tools; send one or the other",
                           param="response_format")
        if wanted == "json_schema" and body.response_format.json_schema is None:
            raise ApiError(400, "response_format.json_schema: required when type is json_schema",
                           param="response_format.json_schema")
        if choice == "none":
            plan = ToolPlan()
        elif isinstance(choice, NamedToolChoice):
            named = [f for f in functions if f["name"] == choice.function.name]
            if not named:
                raise ApiError(400, f"tool_choice.function.name: {choice.function.name!r} is not among the tools",
                               param="tool_choice.function.name")
            plan = ToolPlan(functions, {named[0]["name"]}, None)
        else:
            plan = ToolPlan(functions, {f["name"] for f in functions})
        return plan

    def compile_grammar(body: ChatRequest, plan: ToolPlan) -> None:
        """Runs off the event loop: compiling for a large vocabulary takes a moment."""
        choice = body.tool_choice or "auto"
        wanted = body.response_format.type if body.response_format else "text"
        param = "tools" if plan.known else "response_format"
        try:
            if isinstance(choice, NamedToolChoice):
                plan.processor = constraints.one_call([f for f in plan.functions if f["name"] in plan.known])
            elif plan.known is not None:
                plan.processor = (constraints.one_call(plan.functions) if choice == "required" else
                                  constraints.optional_calls(plan.functions, body.parallel_tool_calls is False))
            elif wanted == "json_object":
                plan.processor = constraints.json_object()
            elif wanted == "json_schema":
                plan.processor = constraints.json_schema(body.response_format.json_schema.json_schema)
        except GlmtuneError as error:
            raise ApiError(400, str(error), param=param) from None
        except Exception as error:  # xgrammar rejects a schema it cannot compile
            raise ApiError(400, f"{param}: the JSON schema cannot be used ({error})", param=param) from None

    def chat_prompt_ids(conversation: Conversation) -> list[int]:
        return build_prompts([conversation], engine.tokenizer, engine.bundle.template, max_source_length=1 << 30)[0]

    def text_prompt_ids(text: str) -> list[int]:
        ids = engine.text_prompt(text)
        if not ids:
            raise GlmtuneError("prompt: the prompt has no tokens")
        return ids

    def usage(prompt: list[int], completion_tokens: int) -> dict:
        return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens}

    async def respond(body: _Request, prompt: list[int], max_tokens: int | None, request: Request,
                      plan: ToolPlan | None = None, sources: list[dict] | None = None,
                      fixed: str | None = None) -> dict | StreamingResponse:
        chat = plan is not None
        plan = plan or ToolPlan()
        settings = settings_for(body, prompt, max_tokens)
        if plan.processor is not None:
            settings = dataclasses.replace(settings, logits_processor=plan.processor)
        base = body.model.endswith(BASE_SUFFIX) and engine.tuned
        pieces = _fixed(fixed) if fixed is not None else generate(engine, prompt, settings, base, body.stop)
        identity = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                    "model": body.model}
        if body.stream:
            return StreamingResponse(events(identity, pieces, chat, prompt, body.include_usage(), plan.known, sources),
                                     media_type="text/event-stream")
        text, last = await collect(pieces, request)
        reason = last.finish_reason
        choice = {"index": 0, "logprobs": None}
        if not chat:
            choice["text"] = text
        elif plan.known is not None and (parsed := parse_answer(text, plan.known, syntax))[1]:
            content, calls = parsed
            choice["message"] = {"role": "assistant", "content": content or None,
                                 "tool_calls": [call.openai() for call in calls]}
            reason = "tool_calls" if reason == "stop" else reason
        else:
            choice["message"] = {"role": "assistant", "content": text}
        choice["finish_reason"] = reason
        return {**identity, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage(prompt, last.completion_tokens)} | ({"sources": sources} if sources is not None else {})

    async def events(identity: dict, pieces: AsyncIterator[Piece], chat: bool, prompt: list[int], with_usage: bool,
                     known: set[str] | None, sources: list[dict] | None = None):
        kind = "chat.completion.chunk" if chat else "text_completion"
        splitter = call_splitter(syntax, known) if known is not None else None
        calls = 0

        def event(delta_or_text: dict | str, finish_reason: str | None = None) -> str:
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish_reason, "logprobs": None}
            else:
                choice = {"index": 0, "text": delta_or_text, "finish_reason": finish_reason, "logprobs": None}
            return _sse({**identity, "object": kind, "choices": [choice]})

        def deltas(text: str, finished: bool) -> Iterator[str]:
            nonlocal calls
            parts = ([*splitter.feed(text), *(splitter.flush() if finished else [])] if splitter else [text])
            for part in parts:
                if isinstance(part, ToolCall):
                    # As OpenAI streams a call: id and name first, then the arguments.
                    head = {"index": calls, "id": part.id, "type": "function",
                            "function": {"name": part.name, "arguments": ""}}
                    yield event({"tool_calls": [head]})
                    yield event({"tool_calls": [{"index": calls, "function": {"arguments": part.openai()["function"]["arguments"]}}]})
                    calls += 1
                elif part:
                    yield event({"content": part} if chat else part)

        if chat:
            yield event({"role": "assistant", "content": ""})
        try:
            async for piece in pieces:
                for chunk in deltas(piece.text, bool(piece.finish_reason)):
                    yield chunk
                if piece.finish_reason:
                    reason = "tool_calls" if calls and piece.finish_reason == "stop" else piece.finish_reason
                    yield event({} if chat else "", reason)
                    if with_usage:
                        yield _sse({**identity, "object": kind, "choices": [],
                                    "usage": usage(prompt, piece.completion_tokens)})
                    if sources is not None:
                        yield _sse({**identity, "object": kind, "choices": [], "sources": sources})
        except ApiError as error:  # the status line is already sent: report it in the stream
            yield _sse(error.body())
        yield "data: [DONE]\n\n"

    @router.post("/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        check_unicode(body)
        plan = tool_plan(body)
        conversation = conversation_of(body.messages, plan.functions)
        grounding = None
        if knowledge is not None and conversation.turns[-1].query:  # a turn of tool results asks nothing new
            grounding = await asyncio.to_thread(knowledge.ground, conversation.turns[-1].query)
            if grounding.prompt is not None:
                conversation.turns[-1] = dataclasses.replace(conversation.turns[-1], query=grounding.prompt)
        prompt = await off_loop(chat_prompt_ids, conversation)
        await off_loop(compile_grammar, body, plan)
        return await respond(body, prompt, body.max_completion_tokens or body.max_tokens, request, plan,
                             sources=grounding.sources() if grounding else None,
                             fixed=NO_ANSWER if grounding is not None and grounding.prompt is None else None)

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
    async def completions(body: CompletionRequest, request: Request):
        check_unicode(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        if not prompts[0]:
            raise ApiError(400, "prompt: the prompt is empty", param="prompt")
        return await respond(body, await off_loop(text_prompt_ids, prompts[0]), body.max_tokens, request)

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


def run_serve(config: GlmtuneConfig, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> None:
    """Serve the OpenAI-compatible API until interrupted."""
    import uvicorn

    check_listen(host, port, api_key)
    knowledge = KnowledgeQA.from_config(config)
    embedder = embedder_for(config, knowledge)
    engine = Engine.from_config(config)
    uvicorn.run(create_app(engine, api_key, max_request_bytes, knowledge, embedder), host=host, port=port,
                log_level="info")
