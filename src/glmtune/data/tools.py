"""Tool (function) calling: tool definitions, how calls and results are written into prompts, and how
calls are read back out of a model's answer. Training (sharegpt ``function_call``/``observation``) and
``glmtune serve`` (OpenAI ``tools``/``tool_calls``) use the same text, so what is trained is what is served.

Formats:

* A tokenizer whose chat template knows tools (it reads ``tools``) renders them itself:
  ``apply_chat_template(messages, tools=...)`` with assistant ``tool_calls`` and ``tool`` messages.
* Every other template (the bundled Gemma, ``--template chatglm``/``plain``, a chat template without
  tools) uses glmtune's fallback, the Hermes/Qwen style: the tools as JSON inside ``<tools></tools>``
  in the system text, each call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``
  in the answer and each result as ``<tool_response>\\n...\\n</tool_response>`` in the next query.

Calls are read back in the same syntax (plus a bare ``{"name", "arguments"|"parameters"}`` object, as
Llama 3 answers); constrained decoding in serve makes models write exactly this syntax. ChatGLM3's and GLM-4's
own formats are in ``data/tools_chatglm.py``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from glmtune.errors import GlmtuneError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"

_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}"
    "\n</tool_call>"
)


@dataclass
class ToolCall:
    name: str
    arguments: dict
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self) -> dict:
        """The OpenAI ``tool_calls`` item (arguments as a JSON string)."""
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


def normalize_tools(value, where: str) -> list[dict]:
    """Function definitions ``{"name", "description", "parameters"}`` from a JSON string or a list whose
    items are OpenAI's ``{"type": "function", "function": {...}}`` or the bare function (LLaMA-Factory)."""
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise GlmtuneError(f"{where}: 'tools' is not valid JSON ({error.msg})") from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise GlmtuneError(f"{where}: 'tools' must be a list of function definitions")
    functions = []
    for index, item in enumerate(value):
        function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else item
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise GlmtuneError(f"{where}: 'tools' item {index} needs a 'name' (a non-empty string)")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise GlmtuneError(f"{where}: 'tools' item {index} ('{function['name']}'): 'parameters' must be a JSON schema object")
        functions.append({"name": function["name"], "description": function.get("description", ""),
                          "parameters": parameters})
    return functions


def openai_tools(functions: list[dict]) -> list[dict]:
    """The ``tools=`` argument of ``apply_chat_template``: OpenAI's shape."""
    return [{"type": "function", "function": function} for function in functions]


def chat_template_text(tokenizer) -> str:
    """The text of the tokenizer's chat template that renders tools (its ``tool_use`` one when it has several)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return template if isinstance(template, str) else ""


def template_supports_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders ``tools`` (a template that never reads it drops them)."""
    return "tools" in chat_template_text(tokenizer)


def system_text(system: str | None, functions: list[dict]) -> str | None:
    """The system text with the fallback tool block appended."""
    if not functions:
        return system
    block = _SYSTEM.format(tools="\n".join(json.dumps(f, ensure_ascii=False) for f in functions))
    return f"{system}\n\n{block}" if system else block


def calls_text(calls: list[ToolCall]) -> str:
    return "\n".join(f"{CALL_OPEN}\n{json.dumps({'name': c.name, 'arguments': c.arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"
                     for c in calls)


def results_text(results: list[str]) -> str:
    return "\n".join(f"{RESULT_OPEN}\n{result}\n{RESULT_CLOSE}" for result in results)


def parse_call_object(value, where: str) -> ToolCall:
    """A call from ``{"name": ..., "arguments": {...} | "json"}`` (``parameters`` accepted for ``arguments``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise GlmtuneError(f"{where}: a function call must be JSON ({error.msg})") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise GlmtuneError(f'{where}: a function call must be an object {{"name": ..., "arguments": {{...}}}}')
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise GlmtuneError(f"{where}: the arguments of '{value['name']}' are not valid JSON ({error.msg})") from None
    if not isinstance(arguments, dict):
        raise GlmtuneError(f"{where}: the arguments of '{value['name']}' must be a JSON object")
    return ToolCall(value["name"], arguments, value.get("id") or "")


def parse_calls_value(value, where: str) -> list[ToolCall]:
    """Calls from a sharegpt ``function_call`` value: one call object or a list of them, as JSON."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise GlmtuneError(f"{where}: a function_call value must be JSON ({error.msg})") from None
    items = value if isinstance(value, list) else [value]
    return [parse_call_object(item, where) for item in items]


class CallSplitter:
    """Splits a streamed answer into text and calls as it arrives (the same result as parsing it whole).

    Text that could be the start of ``<tool_call>`` is held back; a call is given out once its block is
    closed (or the answer ends). A block that is not a valid call of a known function stays text, so nothing
    the model wrote is lost. An answer that starts with ``{`` is held to the end and read as one bare call
    object if it is one (as Llama 3 answers).
    """

    def __init__(self, known: set[str] | None = None):
        self.known = known
        self.buffer = ""
        self.inside = False
        self.started = False
        self.bare = False

    def _call(self, block: str) -> ToolCall | None:
        try:
            call = parse_call_object(block.strip(), "answer")
        except GlmtuneError:
            return None
        return call if self.known is None or call.name in self.known else None

    def feed(self, text: str) -> list[str | ToolCall]:
        self.buffer += text
        if not self.started and self.buffer.strip():
            self.started, self.bare = True, self.buffer.lstrip().startswith("{")
        if self.bare:
            return []
        out: list[str | ToolCall] = []
        while True:
            if not self.inside:
                at = self.buffer.find(CALL_OPEN)
                if at < 0:
                    keep = next((n for n in range(len(CALL_OPEN) - 1, 0, -1) if self.buffer.endswith(CALL_OPEN[:n])), 0)
                    safe, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
                    out.append(safe)
                    break
                out.append(self.buffer[:at])
                self.buffer, self.inside = self.buffer[at + len(CALL_OPEN) :], True
            else:
                at = self.buffer.find(CALL_CLOSE)
                if at < 0:
                    break
                block, self.buffer, self.inside = self.buffer[:at], self.buffer[at + len(CALL_CLOSE) :], False
                out.append(self._call(block) or f"{CALL_OPEN}{block}{CALL_CLOSE}")
        return [piece for piece in out if piece != ""]

    def flush(self) -> list[str | ToolCall]:
        rest, self.buffer = self.buffer, ""
        if self.bare:
            call = self._call(rest)
            return [call] if call else [rest]
        if self.inside:
            self.inside = False
            return [self._call(rest) or f"{CALL_OPEN}{rest}"]
        return [rest] if rest else []


FALLBACK = "fallback"


def call_splitter(syntax: str, known: set[str] | None):
    """The streaming reader of a tool syntax: ``fallback`` (this module's) or a THUDM one (``data/tools_chatglm.py``)."""
    if syntax == FALLBACK:
        return CallSplitter(known)
    from glmtune.data.tools_chatglm import LeadingCallSplitter  # it builds on this module

    return LeadingCallSplitter(syntax, known or set())


def parse_answer(text: str, known: set[str] | None = None, syntax: str = FALLBACK) -> tuple[str, list[ToolCall]]:
    """(the text outside calls, the calls) of a whole answer."""
    splitter = call_splitter(syntax, known)
    pieces = splitter.feed(text) + splitter.flush()
    calls = [piece for piece in pieces if isinstance(piece, ToolCall)]
    return "".join(piece for piece in pieces if isinstance(piece, str)).strip(), calls
