"""``glmtune chat``: a terminal conversation that streams answers and keeps the history."""

from __future__ import annotations

import sys

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.eval.generation import GenerationSettings
from glmtune.kb.qa import NO_ANSWER, KnowledgeQA
from glmtune.serve.engine import Engine

BANNER = "glmtune chat with {name}: type a message. 'clear' resets the history, 'exit' quits, Ctrl-C stops an answer."


def run_chat(config: GlmtuneConfig) -> None:
    """Read messages from the terminal until 'exit' or end of input."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    knowledge = KnowledgeQA.from_config(config)
    engine = Engine.from_config(config)
    try:
        _converse(engine, knowledge)
    finally:
        engine.close()


def _converse(engine: Engine, knowledge: KnowledgeQA | None = None) -> None:
    settings = engine.default_settings()
    print(BANNER.format(name=engine.name), flush=True)
    history: list[tuple[str, str]] = []
    while True:
        try:
            query = input("\nYou: ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print("\n(type exit to quit)")
            continue
        if query == "exit":
            return
        if query == "clear":
            history.clear()
            print("(history cleared)")
            continue
        if not query:
            continue
        grounding = knowledge.ground(query) if knowledge else None
        if grounding and grounding.prompt is None:
            print(f"Model: {NO_ANSWER}\n{grounding.sources_text()}")
            continue
        try:
            prompt, dropped = engine.fitting_chat_prompt(history, grounding.prompt if grounding else query,
                                                         settings.max_new_tokens)
        except GlmtuneError as error:
            print(f"error: {error}")
            continue
        if dropped:
            print(f"(the oldest {dropped} turn(s) no longer fit the model's context and are forgotten)")
            del history[:dropped]
        answer = _answer(engine, prompt, settings)
        if grounding:
            print(grounding.sources_text())
        if answer:  # an answer stopped before its first word leaves nothing to remember
            history.append((query, answer))


def _answer(engine: Engine, prompt: list[int], settings: GenerationSettings) -> str:
    """Stream one answer to the terminal; Ctrl-C stops it and keeps what was said so far."""
    print("Model: ", end="", flush=True)
    pieces: list[str] = []
    try:
        for piece in engine.stream(prompt, settings):
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
    except KeyboardInterrupt:
        print(" [stopped]")
    except GlmtuneError as error:
        print(f"\nerror: {error}")
    return "".join(pieces)
