"""The ``glmtune`` command: parses flags and calls a recipe. Nothing else lives here."""

from __future__ import annotations

import logging
import os
import sys
import warnings

import typer

from glmtune.errors import GlmtuneError
from glmtune.extras import require_extra

app = typer.Typer(help="Fine-tune, evaluate and serve ChatGLM-family and other open LLMs.", no_args_is_help=True,
                  add_completion=False, pretty_exceptions_enable=False)

# Flags come from the one config dataclass (glmtune.config), so these commands pass their arguments
# through untouched and `--help` is answered by that parser.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _config(ctx: typer.Context, command: str, inference_only: bool = False):
    """The config from this command's flags; ``inference_only``: model, method and generation flags only."""
    from glmtune.config import INFERENCE_FLAGS, FlagView, parse_config

    return parse_config(list(ctx.args), INFERENCE_FLAGS if inference_only else FlagView(), f"glmtune {command}")


@app.command(context_settings=PASS_THROUGH)
def train(ctx: typer.Context) -> None:
    """glmtune train [FILE.yaml] [key=value ...] [--flags]: fine-tune (lora, ptuning, freeze, full); LLaMA-Factory YAMLs work."""
    from glmtune.recipes.train import run_train

    run_train(_config(ctx, "train"))


@app.command(context_settings=PASS_THROUGH)
def main(ctx: typer.Context) -> None:
    """Drop-in for the seed's `python main.py`: runs --do_train and/or --do_predict."""
    from glmtune.recipes.train import run_train

    config = _config(ctx, "main")
    if not (config.do_train or config.do_predict):
        raise GlmtuneError("glmtune main needs --do_train and/or --do_predict")
    if config.do_train:
        run_train(config)
    if config.do_predict:
        from glmtune.recipes.predict import run_predict

        run_predict(config)


@app.command(context_settings=PASS_THROUGH)
def predict(ctx: typer.Context) -> None:
    """Generate for --test_file and score it: generated_predictions.txt and predict_results.json. --help lists flags."""
    from glmtune.recipes.predict import run_predict

    run_predict(_config(ctx, "predict"))


@app.command(context_settings=PASS_THROUGH)
def compare(ctx: typer.Context) -> None:
    """glmtune compare OUTPUT... --test_file F: base vs tuned outputs on the same prompts -> compare.md/.html."""
    from glmtune.config import parse_config
    from glmtune.recipes.predict import run_compare

    args = list(ctx.args)
    tuned = []
    while args and not args[0].startswith("-"):
        tuned.append(args.pop(0))
    if not tuned and "--help" not in args and "-h" not in args:
        raise GlmtuneError("usage: glmtune compare OUTPUT [OUTPUT...] --test_file F [flags]")
    typer.echo(run_compare(parse_config(args, command="glmtune compare OUTPUT..."), tuned))


@app.command("estimate-memory", context_settings=PASS_THROUGH)
def estimate_memory(ctx: typer.Context) -> None:
    """Expected peak GPU memory of `glmtune train` with the same flags, from the model config alone."""
    from glmtune.memory import estimate_for, format_estimate

    typer.echo(format_estimate(estimate_for(_config(ctx, "estimate-memory"))))


@app.command()
def demo(
    steps: int = typer.Option(30, help="Training steps (CPU: a few seconds each)."),
    output_dir: str = typer.Option("output/demo", help="Where the demo run goes."),
) -> None:
    """Fine-tune the bundled model on the bundled sample, then print answers before and after."""
    from glmtune.recipes.demo import run_demo

    run_demo(steps=steps, output_dir=output_dir)


@app.command(context_settings=PASS_THROUGH)
def chat(ctx: typer.Context) -> None:
    """Chat in the terminal with a base or tuned model: streams answers, 'clear' resets, 'exit' quits. --help lists flags."""
    from glmtune.serve.chat import run_chat

    run_chat(_config(ctx, "chat", inference_only=True))


# Commands with flags of their own: those go to typer (and its --help); model flags pass through to the config.
OWN_FLAGS_AND_PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


@app.command(context_settings=OWN_FLAGS_AND_PASS_THROUGH)
def web(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs --auth."),
    port: int = typer.Option(7860, help="Port to listen on."),
    auth: str = typer.Option(None, envvar="GLMTUNE_WEB_AUTH",
                             help="USER:PASSWORD: the page asks for them (Gradio's login)."),
) -> None:
    """Browser chat demo (Gradio): streaming, history, sampling controls, base vs tuned. Model flags as for chat."""
    require_extra("web", "gradio", needed_for="glmtune web")
    from glmtune.serve.web import run_web

    run_web(_config(ctx, "web", inference_only=True), host=host, port=port, auth=auth)


@app.command(context_settings=OWN_FLAGS_AND_PASS_THROUGH)
def serve(
    ctx: typer.Context,
    host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: str = typer.Option(None, envvar="GLMTUNE_API_KEY", help="Require 'Authorization: Bearer KEY'."),
    max_request_bytes: int = typer.Option(4 * 1024 * 1024, min=1, help="Refuse larger request bodies (HTTP 413)."),
) -> None:
    """OpenAI-compatible API: /v1/models, /v1/chat/completions (tools, tool_choice, response_format), /v1/completions
    (SSE streaming). Model flags as for chat."""
    require_extra("serve", "fastapi", "uvicorn", "pydantic", needed_for="glmtune serve")
    from glmtune.serve.api import run_serve

    run_serve(_config(ctx, "serve", inference_only=True), host=host, port=port, api_key=api_key,
              max_request_bytes=max_request_bytes)


@app.command(context_settings=OWN_FLAGS_AND_PASS_THROUGH)
def export(
    ctx: typer.Context,
    output: str = typer.Option(..., help="Folder to write; must not exist or be empty."),
    gguf: bool = typer.Option(False, help="Also write OUTPUT/NAME.gguf for llama.cpp, Ollama, GPT4All (Llama, Gemma 3)."),
    gguf_type: str = typer.Option("auto", help="GGUF weights: auto (the model's dtype), f32, f16, bf16 or q8_0."),
) -> None:
    """Merge LoRA/freeze/full weights into a plain transformers folder (+ GGUF); P-Tuning v2: a self-contained glmtune folder."""
    from glmtune.export import run_export

    typer.echo(run_export(_config(ctx, "export", inference_only=True), output, gguf=gguf, gguf_type=gguf_type))


@app.callback()
def root(debug: bool = typer.Option(False, "--debug", help="Show the Python traceback of any error (also GLMTUNE_DEBUG=1; "
                                    "accepted anywhere on the command line).")) -> None:
    """Fine-tune, evaluate and serve ChatGLM-family and other open LLMs."""


def _take_debug_flag(argv: list[str]) -> bool:
    """Remove every ``--debug`` (the commands pass their flags through to the config parser, which has none)."""
    found = "--debug" in argv
    argv[:] = [arg for arg in argv if arg != "--debug"]
    return found or os.environ.get("GLMTUNE_DEBUG", "") not in ("", "0")


def known_failure(error: BaseException) -> str | None:
    """One line for failures that come from the user's files or machine rather than from a bug, else None."""
    if isinstance(error, GlmtuneError):
        return str(error)
    if isinstance(error, OSError) and error.filename:  # unwritable output, a full disk, a vanished file
        target = f"{error.filename} -> {error.filename2}" if error.filename2 else error.filename
        return f"{target}: {error.strerror or error}"
    if type(error).__name__ == "SafetensorError":
        return f"corrupt or truncated safetensors file ({error})"
    if type(error).__name__ == "OutOfMemoryError":
        return "out of GPU memory; try a smaller --per_device_train_batch_size, --gradient_checkpointing or --quantization_bit 4"
    return None


kb_app = typer.Typer(help="Local knowledge base: index your documents, search them, measure retrieval (--kb for "
                          "chat/web/serve answers from it).", no_args_is_help=True)
app.add_typer(kb_app, name="kb")


@kb_app.command("build")
def kb_build(
    paths: list[str] = typer.Argument(..., help="Files (.txt .md .rst .html .pdf .docx .jsonl) and folders of them."),
    output: str = typer.Option(..., "--output", help="Index folder; an existing index is updated (changed files only)."),
    embedding_model: str = typer.Option(None, "--embedding_model",
                                        help="sentence-transformers folder or hub name: adds dense (FAISS) retrieval."),
    chunk_size: int = typer.Option(None, "--chunk_size", help="Characters per chunk (default 750, Chatchat's)."),
    chunk_overlap: int = typer.Option(None, "--chunk_overlap", help="Characters neighbours share (default 150)."),
) -> None:
    """Index documents into OUTPUT. Unreadable files get one error line each; the others are indexed."""
    from glmtune.kb.index import build

    report = build(paths, output, chunk_size, chunk_overlap, embedding_model)
    for error in report.errors:
        typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    typer.echo(report.summary())
    if report.errors:
        raise typer.Exit(1)


@kb_app.command("search")
def kb_search(
    folder: str = typer.Argument(..., help="Index folder from glmtune kb build."),
    question: str = typer.Argument(...),
    top_k: int = typer.Option(3, "--top_k", help="Passages to return."),
    retriever: str = typer.Option("auto", "--retriever", help="auto, lexical (BM25), dense or hybrid."),
    as_json: bool = typer.Option(False, "--json", help='Print a JSON list of {"source", "position", "text", "score"}.'),
) -> None:
    """Print the passages that best match QUESTION, with source, position and score."""
    import json

    from glmtune.kb.index import KnowledgeBase

    passages = KnowledgeBase.load(folder).search(question, top_k, retriever)
    if as_json:
        typer.echo(json.dumps([p.to_json() for p in passages], ensure_ascii=False, indent=1))
        return
    for rank, passage in enumerate(passages, 1):
        typer.echo(f"[{rank}] {passage.chunk.source} ({passage.chunk.position()}) score {passage.score:.4f}\n"
                   f"{passage.chunk.text}\n")
    if not passages:
        typer.echo("no passage shares a word with the question")


@kb_app.command("eval")
def kb_eval(
    folder: str = typer.Argument(..., help="Index folder from glmtune kb build."),
    questions: str = typer.Option(..., "--questions", help='JSON lines {"q", "doc", "key"}: key is text of the answer passage.'),
    top_k: int = typer.Option(3, "--top_k", help="k of hit@k."),
    retriever: str = typer.Option("auto", "--retriever", help="auto, lexical (BM25), dense or hybrid."),
) -> None:
    """hit@k: how often a passage from doc containing key is among the top k for q."""
    from glmtune.kb.evaluate import evaluate, read_questions
    from glmtune.kb.index import KnowledgeBase

    typer.echo(evaluate(KnowledgeBase.load(folder), read_questions(questions), top_k, retriever).summary())


def main_entry() -> None:
    # peft calls a transformers 5.x method that transformers itself deprecated; nothing for users to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    logging.basicConfig(format="%(name)s: %(message)s", level=logging.WARNING)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("glmtune: %(message)s"))
    ours = logging.getLogger("glmtune")
    ours.setLevel(logging.INFO)
    ours.addHandler(handler)
    ours.propagate = False
    debug = _take_debug_flag(sys.argv)
    try:
        app()
    except Exception as error:
        message = known_failure(error)
        if debug or message is None:
            raise  # a bug: its traceback
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        typer.secho("interrupted", err=True)
        raise SystemExit(130) from None
