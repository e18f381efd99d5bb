"""Constrained decoding for ``glmtune serve``: forced tool calls and JSON answers that always parse.

A grammar masks, at every step, the tokens that would break the required syntax, so even a tiny random
model writes a schema-valid call. The grammar engine is xgrammar, chosen by measurement
(``benchmarks/constrained_decoding.py``, results in ``benchmarks/results/constrained_decoding.json``): on
the bundled Gemma's 262k-token vocabulary it adds about 1.8 ms per token against llguidance's 40 ms, it
takes any Hugging Face tokenizer (llguidance refused the tests' character tokenizer), and
lm-format-enforcer does not import with transformers 5.
"""

from __future__ import annotations

import json
import threading

import torch

from glmtune.data.tools import CALL_CLOSE, CALL_OPEN
from glmtune.errors import GlmtuneError


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


class Constraints:
    """Grammars compiled for one tokenizer (built on first use: a large vocabulary takes seconds)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
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
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self.stop_ids)
                self._compiler = xgr.GrammarCompiler(info)
            return self._compiler

    def _processor(self, compiled) -> GrammarProcessor:
        return GrammarProcessor(compiled, self.vocab_size)

    def json_object(self) -> GrammarProcessor:
        return self._processor(self.compiler.compile_builtin_json_grammar())

    def json_schema(self, schema: dict) -> GrammarProcessor:
        # No free whitespace: a weak model can otherwise spend its whole budget on spaces.
        return self._processor(self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def one_call(self, functions: list[dict]) -> GrammarProcessor:
        """Exactly one call of one of ``functions``, in glmtune's tool-call syntax (tool_choice required/named)."""
        import xgrammar as xgr

        def literal(text: str):
            return xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text, ensure_ascii=False)}")

        calls = [xgr.Grammar.concat(literal(_call_begin(f["name"])),
                                    xgr.Grammar.from_json_schema(json.dumps(f["parameters"]), any_whitespace=False),
                                    literal(_CALL_END))
                 for f in functions]
        grammar = calls[0] if len(calls) == 1 else xgr.Grammar.union(*calls)
        return self._processor(self.compiler.compile_grammar(grammar))

    def optional_calls(self, functions: list[dict], stop_after_first: bool) -> GrammarProcessor:
        """Free text; once the model opens a call, a valid call of one of ``functions`` (tool_choice auto)."""
        tags = [{"type": "tag", "begin": _call_begin(f["name"]), "end": _CALL_END,
                 "content": {"type": "json_schema", "json_schema": f["parameters"]}} for f in functions]
        structural_tag = {"type": "structural_tag", "format": {
            "type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags, "stop_after_first": stop_after_first}}
        return self._processor(self.compiler.compile_structural_tag(json.dumps(structural_tag)))
