"""``glmtune web``: a Gradio chat page with streaming, history, sampling controls and base-vs-tuned."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.kb.qa import NO_ANSWER, KnowledgeQA
from glmtune.serve.api import is_loopback
from glmtune.serve.engine import MAX_BATCH, Engine

# Gradio's telemetry and version check call out to the internet; the demo must work without it.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

TUNED, BASE = "tuned", "base (before training)"


def _text(content) -> str:
    """A chat message's text: Gradio gives either a string or a list of typed parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "")
    return "".join(_text(part) for part in content or [])


def history_pairs(history: list[dict]) -> list[tuple[str, str]]:
    """Gradio's messages ([{"role", "content"}, ...]) as (query, answer) pairs."""
    pairs: list[tuple[str, str]] = []
    query = None
    for message in history:
        if message["role"] == "user":
            query = _text(message["content"]) if query is None else f"{query}\n\n{_text(message['content'])}"
        elif message["role"] == "assistant" and query is not None:
            pairs.append((query, _text(message["content"])))
            query = None
    return pairs


def build_demo(engine: Engine, knowledge: KnowledgeQA | None = None):
    """The Gradio app; ``run_web`` launches it. With ``knowledge`` the sources follow each answer as a second
    message, which ``history_pairs`` leaves out of the next prompt."""
    import gradio as gr

    defaults = engine.default_settings()

    def respond(message: str, history: list[dict], temperature: float, top_p: float, max_new_tokens: float,
                version: str) -> Iterator[str | list[dict]]:
        if knowledge is None:
            yield from answer(message, history, temperature, top_p, max_new_tokens, version)
            return
        grounding = knowledge.ground(message)
        text = NO_ANSWER if grounding.prompt is None else ""
        if grounding.prompt is not None:
            for text in answer(grounding.prompt, history, temperature, top_p, max_new_tokens, version):
                yield text
        yield [{"role": "assistant", "content": text}, {"role": "assistant", "content": grounding.sources_text()}]

    def answer(message: str, history: list[dict], temperature: float, top_p: float, max_new_tokens: float,
               version: str) -> Iterator[str]:
        settings = engine.default_settings(max_new_tokens=int(max_new_tokens), do_sample=temperature > 0,
                                           temperature=temperature or None, top_p=top_p)
        try:
            prompt, _ = engine.fitting_chat_prompt(history_pairs(history), message, settings.max_new_tokens)
        except GlmtuneError as error:
            raise gr.Error(str(error)) from None
        answer = ""
        # Closing the stream (Gradio's Stop button closes this generator) cancels the generation.
        with contextlib.closing(engine.stream(prompt, settings, base=version == BASE)) as pieces:
            for piece in pieces:
                answer += piece
                yield answer

    tuned_note = "" if engine.tuned else " (no trained weights loaded: base and tuned are the same model)"
    controls = [
        gr.Slider(0.0, 2.0, value=defaults.temperature if defaults.do_sample else 0.0, step=0.05,
                  label="temperature (0 = greedy)"),
        gr.Slider(0.05, 1.0, value=defaults.top_p, step=0.05, label="top_p"),
        gr.Slider(1, max(1, min(4096, engine.context_length // 2)), value=defaults.max_new_tokens, step=1,
                  label="max new tokens"),
        gr.Radio([TUNED, BASE], value=TUNED, label=f"model{tuned_note}"),
    ]
    return gr.ChatInterface(
        respond, additional_inputs=controls, additional_inputs_accordion=gr.Accordion("Settings", open=True),
        title=f"glmtune: {engine.name}", analytics_enabled=False, concurrency_limit=MAX_BATCH,
        # Plain text: prompts in the ADGEN style ("类型#裙*风格#文艺") are not Markdown.
        chatbot=gr.Chatbot(label=engine.name, elem_id="chatbot", render_markdown=False),
        textbox=gr.Textbox(placeholder="Message", elem_id="message"),
    )


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    """``--auth USER:PASSWORD`` as Gradio's ``auth`` pair."""
    if auth is None:
        return None
    user, colon, password = auth.partition(":")
    if not (user and colon and password):
        raise GlmtuneError("--auth must be USER:PASSWORD (both non-empty)")
    return user, password


def check_web_listen(host: str, auth: tuple[str, str] | None) -> None:
    """Refuse an open page without a login, as serve refuses an open API without a key."""
    if not is_loopback(host) and auth is None:
        raise GlmtuneError(f"refusing to serve the web page on {host} without --auth (anyone who reaches it could "
                           "use the model); set --auth USER:PASSWORD or use --host 127.0.0.1")


def run_web(config: GlmtuneConfig, host: str = "127.0.0.1", port: int = 7860, auth: str | None = None) -> None:
    """Serve the demo until interrupted."""
    login = parse_auth(auth)
    check_web_listen(host, login)
    knowledge = KnowledgeQA.from_config(config)
    demo = build_demo(Engine.from_config(config), knowledge)
    demo.queue().launch(server_name=host, server_port=port, inbrowser=False, auth=login)
