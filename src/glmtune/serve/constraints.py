"""Constrained decoding for ``glmtune serve``: forced tool calls and JSON answers that always parse.

A grammar masks, at every step, the tokens that would break the required syntax, so even a tiny random
model writes a schema-valid call. The grammar engine is xgrammar, chosen by measurement
(``benchmarks/constrained_decoding.py``, results in ``benchmarks/results/constrained_decoding.json``): on
the bundled Gemma's 262k-token vocabulary it adds about 1.8 ms per token against llguidance's 40 ms, it
takes any Hugging Face tokenizer (llguidance refused the tests' character tokenizer), and
lm-format-enforcer does not import with transformers 5.

Calls are forced in the syntax of the model's tool format: glmtune's fallback ``<tool_call>`` JSON, GLM-4's
``name`` line then the JSON arguments, or ChatGLM3's ``name`` line then a python code block calling
``tool_call(a=1, b='x')`` (``data/tools_chatglm.py``), whose keyword values are xgrammar's JSON-schema grammars
rewritten to Python literals (``True``/``False``/``None``, no backslash-slash escape), so what is forced is what
ChatGLM3 is trained on. Native ChatGLM2/3 tokenizers are plain SentencePiece
models without a Hugging Face tokenizer; their vocabulary is handed to xgrammar piece by piece.
"""

from __future__ import annotations

import json
import keyword
import re
import threading

import torch

from glmtune.data.tools import CALL_CLOSE, CALL_OPEN, FALLBACK
from glmtune.data.tools_chatglm import CALL_FUNCTION, CHATGLM3, CODE_CLOSE, CODE_OPEN, GLM4
from glmtune.errors import GlmtuneError
from glmtune.models.chatglm import ChatGLM2Tokenizer


def _call_begin(name: str) -> str:
    return f'{CALL_OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": '


_CALL_END = f"}}\n{CALL_CLOSE}"


class GrammarProcessor:
    """The ``GenerationSettings.logits_processor`` of one request: advances its matcher by the token picked
    last, then sends minus infinity to every token the grammar does not allow next."""

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def __call__(self, previous: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor:
        if previous is not None:
            self.matcher.accept_token(int(previous[0]))
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self._xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device))
        return logits


# xgrammar's JSON text for true/false/null (a quoted EBNF literal, not part of a longer one) and its "\/" escape.
_JSON_LITERALS = re.compile(r'(?<![\\\w])"(true|false|null)"')
_PYTHON_LITERALS = {"true": '"True"', "false": '"False"', "null": '"None"'}
_SLASH_ESCAPE = '[\\"\\\\/bfnrt]'
_QUOTE = re.compile(r'(?<!\\)((?:\\\\)*)\\"')  # an escaped double quote in EBNF text (after an even run of \\)


# xgrammar lets a string with a length bound hold raw control characters, which JSON forbids (a byte-fallback
# vocabulary can write them): the bounded strings' character class, and the one JSON allows.
_BOUNDED_STRING_CHARACTER = '[^\\"\\\\\\r\\n]'
_JSON_STRING_CHARACTER = '[^\\0-\\x1f\\"\\\\]'


def _json_schema(schema: dict):
    """xgrammar's grammar of ``schema`` (no free whitespace), its strings free of raw control characters."""
    import xgrammar as xgr

    # No free whitespace: a weak model can otherwise spend its whole budget on spaces.
    text = str(xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False))
    return xgr.Grammar.from_ebnf(text.replace(_BOUNDED_STRING_CHARACTER, _JSON_STRING_CHARACTER))


def _literal(text: str):
    import xgrammar as xgr

    return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")


def _python_value(schema: dict):
    """A Python literal matching ``schema``: xgrammar's JSON grammar with JSON's literals spelled as Python's, its
    strings in double quotes or (as Python's repr, and so ChatGLM3's training data, writes them) single quotes."""
    import xgrammar as xgr

    text = str(_json_schema(schema))
    if _SLASH_ESCAPE not in text:  # the rewrite below must find xgrammar's JSON string escapes as they are
        raise GlmtuneError("this xgrammar version writes JSON strings differently; ChatGLM3 calls cannot be forced")
    text = _JSON_LITERALS.sub(lambda match: _PYTHON_LITERALS[match[1]], text)
    double = text.replace(_SLASH_ESCAPE, _SLASH_ESCAPE.replace("/", ""))
    if "'" in double:  # a value that holds a quote already (an enum, a pattern): double quotes only
        return xgr.Grammar.from_ebnf(double)
    single = _QUOTE.sub(lambda match: match[1] + "'", double)  # every unescaped \" of the EBNF text becomes '
    return xgr.Grammar.union(xgr.Grammar.from_ebnf(double), xgr.Grammar.from_ebnf(single))


def _python_keywords(name: str, schema: dict):
    """``a=1, b='x'`` for an object schema: required properties first (keyword order is free), then the optional ones."""
    import xgrammar as xgr

    properties = schema.get("properties") or {}
    required = [key for key in schema.get("required") or [] if key in properties]
    for key in properties:
        if not key.isidentifier() or keyword.iskeyword(key):
            raise GlmtuneError(f"tools: {name!r} has the argument {key!r}, which cannot be a Python keyword argument "
                               "as ChatGLM3's tool format writes them")
    optional = [key for key in properties if key not in required]

    def argument(key: str):
        return xgr.Grammar.concat(_literal(f"{key}="), _python_value(properties[key]))

    def optional_after(keys: list[str]):
        """Each of ``keys`` or not, in order, each after ", "."""
        return [xgr.Grammar.union(xgr.Grammar.concat(_literal(", "), argument(key)), _literal("")) for key in keys]

    if required:
        parts = [argument(required[0])]
        parts += [xgr.Grammar.concat(_literal(", "), argument(key)) for key in required[1:]]
        return xgr.Grammar.concat(*parts, *optional_after(optional))
    # Nothing required: no arguments, or a first one (any of them) and some of those after it.
    starts = [xgr.Grammar.concat(argument(key), *optional_after(optional[index + 1:]))
              for index, key in enumerate(optional)]
    return xgr.Grammar.union(_literal(""), *starts)


class Constraints:
    """Grammars compiled for one tokenizer (built on first use: a large vocabulary takes seconds), forcing calls in
    the ``syntax`` of the model's tool format (``fallback``, ``glm4`` or ``chatglm3``)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int], syntax: str = FALLBACK):
        self.tokenizer, self.vocab_size, self.stop_ids, self.syntax = tokenizer, vocab_size, stop_ids, syntax
        # A native ChatGLM2/3 tokenizer is SentencePiece alone; it starts each encoded text with a space piece.
        self.sentencepiece = isinstance(tokenizer, ChatGLM2Tokenizer)
        self._compiler = None
        self._lock = threading.Lock()

    @property
    def compiler(self):
        with self._lock:
            if self._compiler is None:
                try:
                    import xgrammar as xgr
                except ImportError:
                    raise GlmtuneError("tool_choice required/named and response_format need xgrammar: "
                                       "pip install 'glmtune[serve]'") from None
                info = self._sentencepiece_info(xgr) if self.sentencepiece else xgr.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def _sentencepiece_info(self, xgr):
        """The vocabulary piece by piece; control pieces, ChatGLM's special tokens and the padding are empty, so
        xgrammar never lets them into text (the stop tokens end it)."""
        sp = self.tokenizer.sp
        pieces = ["" if sp.is_control(i) or sp.is_unknown(i) else sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        pieces += [""] * (self.vocab_size - len(pieces))
        return xgr.TokenizerInfo(pieces, xgr.VocabType.BYTE_FALLBACK, vocab_size=self.vocab_size,
                                 stop_token_ids=self.stop_ids, add_prefix_space=True)

    def _processor(self, compiled) -> GrammarProcessor:
        return GrammarProcessor(compiled, self.vocab_size)

    def _answer_start(self, grammar):
        """A native ChatGLM answer may begin with the space piece and the empty metadata line of ChatGLM3's format."""
        import xgrammar as xgr

        if not self.sentencepiece:
            return grammar
        return xgr.Grammar.concat(xgr.Grammar.from_ebnf('root ::= " "? "\\n"? " "?'), grammar)

    def json_object(self) -> GrammarProcessor:
        import xgrammar as xgr

        if not self.sentencepiece:
            return self._processor(self.compiler.compile_builtin_json_grammar())
        return self._processor(self.compiler.compile_grammar(self._answer_start(xgr.Grammar.builtin_json_grammar())))

    def json_schema(self, schema: dict) -> GrammarProcessor:
        return self._processor(self.compiler.compile_grammar(self._answer_start(_json_schema(schema))))

    def _call(self, function: dict):
        """One call of ``function`` in this model's tool syntax."""
        import xgrammar as xgr

        name, schema = function["name"], function["parameters"]
        if self.syntax == CHATGLM3:
            space = xgr.Grammar.from_ebnf('root ::= " "?')  # the space piece each encoded text starts with
            return xgr.Grammar.concat(space, _literal(f"{name}\n"), space, _literal(f"{CODE_OPEN}{CALL_FUNCTION}("),
                                      _python_keywords(name, schema), _literal(f"){CODE_CLOSE}"))
        arguments = _json_schema(schema)
        if self.syntax == GLM4:
            return xgr.Grammar.concat(_literal(f"{name}\n"), arguments)
        return xgr.Grammar.concat(_literal(_call_begin(name)), arguments, _literal(_CALL_END))

    def one_call(self, functions: list[dict]) -> GrammarProcessor:
        """Exactly one call of one of ``functions``, in the model's tool syntax (tool_choice required/named)."""
        import xgrammar as xgr

        calls = [self._call(f) for f in functions]
        grammar = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
        return self._processor(self.compiler.compile_grammar(grammar))

    def optional_calls(self, functions: list[dict], stop_after_first: bool) -> GrammarProcessor | None:
        """Free text; once the model opens a call, a valid call of one of ``functions`` (tool_choice auto). None for
        GLM-4's and ChatGLM3's syntax: a call there is the whole answer, opened by nothing a trigger could match, so
        ``auto`` is not constrained (a well-formed call is read back, anything else is text)."""
        if self.syntax != FALLBACK:
            return None
        tags = [{"type": "tag", "begin": _call_begin(f["name"]), "end": _CALL_END,
                 "content": {"type": "json_schema", "json_schema": f["parameters"]}} for f in functions]
        structural_tag = {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags, "stop_after_first": stop_after_first}}
        return self._processor(self.compiler.compile_structural_tag(json.dumps(structural_tag)))
