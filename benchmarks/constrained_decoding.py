"""Per-token cost of constrained decoding libraries (choose the one serve uses for tool calls / JSON).

For each library: compile the JSON schema of a tool's arguments, then walk a schema-valid answer token by
token, timing what one decoding step adds (compute the allowed-token mask, apply it to the logits, advance
the matcher). Run on the tiny character tokenizer of the tests and on the bundled Gemma 3 tokenizer
(262k tokens, where the cost is real).

    nice -n 15 python benchmarks/constrained_decoding.py > benchmarks/results/constrained_decoding.json
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
                                           "days": {"type": "integer"}},
          "required": ["city", "unit", "days"], "additionalProperties": False}
ANSWER = json.dumps({"city": "Beijing and Shanghai", "unit": "celsius", "days": 3})


def time_xgrammar(tokenizer, ids: list[int], vocab_size: int) -> dict:
    import xgrammar as xgr

    started = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
    compile_s = time.perf_counter() - started
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    steps = []
    for token in ids:
        logits = torch.zeros(1, vocab_size)
        started = time.perf_counter()
        matcher.fill_next_token_bitmask(bitmask)
        xgr.apply_token_bitmask_inplace(logits, bitmask)
        assert logits[0, token] == 0, "the answer's token was masked"
        assert matcher.accept_token(token)
        steps.append(time.perf_counter() - started)
    return {"compile_s": compile_s, "per_token_ms": 1000 * statistics.median(steps), "tokens": len(steps)}


def time_llguidance(tokenizer, ids: list[int], vocab_size: int) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    started = time.perf_counter()
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    matcher = llguidance.LLMatcher(lltokenizer, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
    compile_s = time.perf_counter() - started
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
    steps = []
    for token in ids:
        logits = torch.zeros(1, vocab_size)
        started = time.perf_counter()
        llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
        llguidance.torch.apply_token_bitmask_inplace(logits, bitmask)
        assert logits[0, token] == 0, "the answer's token was masked"
        assert matcher.consume_token(token)
        steps.append(time.perf_counter() - started)
    return {"compile_s": compile_s, "per_token_ms": 1000 * statistics.median(steps), "tokens": len(steps)}


def time_lm_format_enforcer(tokenizer, ids: list[int], vocab_size: int) -> dict:
    try:
        import lmformatenforcer.integrations.transformers  # noqa: F401
    except ImportError as error:
        return {"error": f"does not import with transformers {__import__('transformers').__version__}: {error}"}
    raise NotImplementedError


def main() -> None:
    from transformers import AutoTokenizer

    from glmtune.models.loading import default_model_folder
    from tiny_models import build_tokenizer, corpus_texts

    import string

    tokenizers = {"tiny character tokenizer (tests)": build_tokenizer(corpus_texts() + [string.printable]),
                  "Gemma 3 270M (bundled default)": AutoTokenizer.from_pretrained(default_model_folder())}
    results = {"schema": SCHEMA, "answer": ANSWER, "python": platform.python_version(), "torch": torch.__version__,
               "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} torch threads", "rows": []}
    for libname, library in [("xgrammar", "xgrammar"), ("llguidance", "llguidance"),
                             ("lm-format-enforcer", "lm-format-enforcer")]:
        from importlib.metadata import version

        results[f"{libname}_version"] = version(library)
    for label, tokenizer in tokenizers.items():
        ids = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
        for name, timer in [("xgrammar", time_xgrammar), ("llguidance", time_llguidance),
                            ("lm-format-enforcer", time_lm_format_enforcer)]:
            try:
                measured = timer(tokenizer, ids, len(tokenizer))
            except Exception as error:  # a library that cannot take this tokenizer is a result too
                measured = {"error": f"{type(error).__name__}: {error}"}
            row = {"tokenizer": label, "vocab": len(tokenizer), "library": name, **measured}
            print(row, file=sys.stderr)
            results["rows"].append(row)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
