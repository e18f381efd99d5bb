"""THUDM's own tool formats: ChatGLM3-6B's (native ChatGLM2/3 models) and GLM-4's (transformers' ``glm``/``glm4``).

ChatGLM3, as THUDM's ``finetune_chatmodel_demo`` and ``openai_api_demo`` write it, in role messages
(``<|role|>`` + metadata + ``\\n`` + text, the tokenizer's ``build_chat_input``):

* the system message: the system text (ChatGLM3's default ``Answer the following questions as best as you can.
  You have access to the following tools:`` when there is none), a newline, then the functions as
  ``json.dumps(functions, indent=4, ensure_ascii=False)``;
* a call: an assistant message whose metadata is the function name and whose text is
  ``\\`\\`\\`python\\ntool_call(a=1, b='x')\\n\\`\\`\\``` (the arguments as Python keyword arguments);
* a result: an ``<|observation|>`` message. A model ends a call with ``<|observation|>``, an answer with
  ``<|user|>`` or EOS.

GLM-4's chat template renders tools itself; it answers a call as ``name\\n{json arguments}`` after ``<|assistant|>``.

Reading back (both): the answer's first line names one of the request's functions and the rest is that call's
arguments; anything else (an unknown name, arguments that do not parse) stays text, so nothing the model wrote
is lost. ChatGLM3's Python arguments are read with ``ast.literal_eval`` of each keyword value: literals only,
never code (THUDM's ``process_response`` runs ``eval``). One call per answer: the role token between two calls
decodes to nothing, so a second call would not be told apart from the first.
"""

from __future__ import annotations

import ast
import json
import keyword
import re
from collections.abc import Callable

from glmtune.data.formats import Conversation
from glmtune.data.tools import ToolCall
from glmtune.errors import GlmtuneError

CHATGLM3, GLM4 = "chatglm3", "glm4"
CHATGLM3_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"
CALL_FUNCTION = "tool_call"  # the callee ChatGLM3 writes its arguments to
CODE_OPEN, CODE_CLOSE = "```python\n", "\n```"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
#: The tokens after which ChatGLM3 stops (besides EOS), as its ``chat()`` does.
TURN_END_TOKENS = ("<|user|>", "<|observation|>")
IGNORE_INDEX = -100

_CODE_BLOCK = re.compile(r"\s*```(?:python)?[ \t]*\n(?P<code>.*)\n[ \t]*```\s*", re.DOTALL)


def uses_tools(conversation: Conversation) -> bool:
    return bool(conversation.tools) or any(turn.calls or turn.observations for turn in conversation.turns)


def has_role_tokens(tokenizer) -> bool:
    """ChatGLM2/3's tokenizer has ChatGLM3's role tokens; ChatGLM-6B's (v1) does not."""
    special = getattr(tokenizer, "special_token_ids", {})
    return all(token in special for token in ROLE_TOKENS)


def chatglm3_system_text(system: str | None, functions: list[dict]) -> str:
    return f"{system or CHATGLM3_SYSTEM}\n{json.dumps(functions, indent=4, ensure_ascii=False)}"


def python_arguments(arguments: dict, where: str = "a call") -> str:
    """``tool_call(a=1, b='x')``: the arguments as ChatGLM3 writes them (``ast`` unparsed, as THUDM's
    ``format_function_call`` does)."""
    for name in arguments:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise GlmtuneError(f"{where}: argument {name!r} cannot be a Python keyword argument, which ChatGLM3's tool "
                               "format writes arguments as; use --template chatglm (glmtune's fallback tool format)")
    call = ast.Call(func=ast.Name(id=CALL_FUNCTION), args=[],
                    keywords=[ast.keyword(arg=name, value=ast.Constant(value)) for name, value in arguments.items()])
    return ast.unparse(call)


def chatglm3_call_text(call: ToolCall, where: str = "a call") -> str:
    return f"{CODE_OPEN}{python_arguments(call.arguments, where)}{CODE_CLOSE}"


def read_python_arguments(text: str) -> dict | None:
    """The keyword arguments of ChatGLM3's ``\\`\\`\\`python\\ntool_call(...)\\n\\`\\`\\```, each value read with
    ``ast.literal_eval``; None unless the text is exactly such a block of literals that JSON can carry."""
    block = _CODE_BLOCK.fullmatch(text)
    if block is None:
        return None
    try:
        tree = ast.parse(block["code"].strip(), mode="eval")
        call = tree.body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args
                and all(item.arg is not None for item in call.keywords)):
            return None
        arguments = {item.arg: ast.literal_eval(item.value) for item in call.keywords}
        json.dumps(arguments)  # a set, bytes or complex number cannot be a JSON argument
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        return None
    return arguments


def read_json_arguments(text: str) -> dict | None:
    """GLM-4's arguments: one JSON object."""
    try:
        arguments = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return arguments if isinstance(arguments, dict) else None


READERS: dict[str, Callable[[str], dict | None]] = {CHATGLM3: read_python_arguments, GLM4: read_json_arguments}


class LeadingCallSplitter:
    """``CallSplitter``'s surface for an answer that is either text or one call, ``name\\n<arguments>``.

    Text is held back while the answer could still begin with a known name and its line; once the first line
    names a known function the rest is held to the end and read as its arguments (the whole answer stays text
    if they do not parse); otherwise the text streams on as it comes.
    """

    def __init__(self, syntax: str, known: set[str]):
        self.read = READERS[syntax]
        self.known = known
        self.buffer = ""
        self.state = "undecided"  # "text" or "call" once the first line decides

    def feed(self, text: str) -> list[str | ToolCall]:
        if self.state == "text":
            return [text] if text else []
        self.buffer += text
        if self.state == "undecided":
            head = self.buffer.lstrip()
            if "\n" in head:
                self.state = "call" if head.split("\n", 1)[0].strip() in self.known else "text"
            elif not any(name.startswith(head.strip()) for name in self.known):
                self.state = "text"
        if self.state == "text":
            out, self.buffer = self.buffer, ""
            return [out] if out else []
        return []

    def flush(self) -> list[str | ToolCall]:
        rest, self.buffer = self.buffer, ""
        if self.state != "text":
            call = self.call(rest)
            if call is not None:
                return [call]
        return [rest] if rest else []

    def call(self, text: str) -> ToolCall | None:
        name, _, arguments = text.strip().partition("\n")
        name = name.strip()
        if name not in self.known:
            return None
        parsed = self.read(arguments)
        return None if parsed is None else ToolCall(name, parsed)


def chatglm3_ids(tokenizer, conversation: Conversation, with_last_answer: bool) -> tuple[list[int], list[int]]:
    """ChatGLM3's token ids of a tool conversation and their labels (``IGNORE_INDEX`` but on trained answers).

    Labels as THUDM's ``finetune_chatmodel_demo`` sets them: a token is learned when the token before it belongs
    to an assistant message that trains, so a trained message teaches its text and the token that ends it
    (``<|observation|>`` after a call, the next role token, EOS at the end), never its own ``<|assistant|>``.
    Without ``with_last_answer``: the prompt for the last turn, ending in ``<|assistant|>``.
    """
    where = conversation.source or "a conversation"
    if not has_role_tokens(tokenizer):
        raise GlmtuneError(f"{where}: tool calls need ChatGLM3's role tokens (<|system|>, <|user|>, <|assistant|>, "
                           "<|observation|>), which the ChatGLM-6B (v1) tokenizer has not; use --template chatglm "
                           "(glmtune's fallback tool format)")
    ids = tokenizer.build_inputs_with_special_tokens([])  # [gMASK] sop
    trains = [False] * len(ids)

    def message(role: str, metadata: str, text: str, trained: bool) -> None:
        tokens = tokenizer._chat_message(role, metadata, text)  # build_chat_input's encoding of one message
        ids.extend(tokens)
        trains.extend([trained] * len(tokens))

    system = chatglm3_system_text(conversation.system, conversation.tools) if conversation.tools else conversation.system
    if system:
        message("system", "", system, False)
    for index, turn in enumerate(conversation.turns):
        if turn.observations:
            for result in turn.observations:
                message("observation", "", result, False)
        else:
            message("user", "", turn.query, False)
        if index == len(conversation.turns) - 1 and not with_last_answer:
            return ids + [tokenizer.special_token_ids["<|assistant|>"]], []
        if turn.answer or not turn.calls:
            message("assistant", "", turn.answer, turn.trains)
        for call in turn.calls:
            message("assistant", call.name, chatglm3_call_text(call, where), turn.trains)
    ids.append(tokenizer.eos_token_id)
    labels = [IGNORE_INDEX] + [token if trained and token != tokenizer.pad_token_id else IGNORE_INDEX
                               for token, trained in zip(ids[1:], trains)]
    return ids, labels
