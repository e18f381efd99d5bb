"""One loaded model behind a queue: chat, web and the API server all generate through an ``Engine``.

A single worker thread owns the model, so requests never interleave into each other's state. Greedy
requests waiting together (same model view) run as one left-padded batch, which gives the same tokens
as running them one by one; sampled requests run alone so that their ``seed`` reproduces their answer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.data.formats import Conversation, Turn
from glmtune.data.preprocess import build_prompts, pad_id
from glmtune.errors import GlmtuneError
from glmtune.eval.generation import GenerationSettings, generate_texts, iter_generate, stop_token_ids
from glmtune.methods.ptuning import PrefixTuningModel
from glmtune.models.introspect import text_config
from glmtune.recipes.common import ModelBundle, load_base, load_for_inference, trained_weights_folder

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
MAX_BATCH = 32


@dataclass
class Output:
    """What a job delivers: text pieces, then one last output with ``finish_reason`` or ``error`` set."""

    text: str = ""
    finish_reason: str | None = None  # "stop" (a stop token) or "length" (max_new_tokens), as OpenAI names them
    error: str | None = None


@dataclass
class Job:
    prompt_ids: list[int]
    settings: GenerationSettings
    base: bool
    deliver: Callable[[Output], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0

    def batch_key(self) -> tuple | None:
        constrained = self.settings.logits_processor is not None  # its processor holds this one request's state
        return None if self.settings.do_sample or constrained else ("greedy", self.base)


class IncrementalDecoder:
    """Token ids in, text out, never splitting a multi-byte character or a SentencePiece space.

    Each step decodes from a recent offset and emits only what follows the already-emitted part, and
    holds text back while it ends in U+FFFD (an incomplete UTF-8 sequence from byte-fallback tokens).
    Leading whitespace of the answer is dropped, as ``generate_texts`` strips it.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.started = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        emitted = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) <= len(emitted) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        piece = text[len(emitted) :]
        if not self.started:
            piece = piece.lstrip()
            self.started = bool(piece)
        return piece


def context_length(model: nn.Module) -> int:
    config = text_config(model)
    for name in ("max_position_embeddings", "seq_length", "n_positions"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return 2048


def model_name(config: GlmtuneConfig) -> str:
    """What chat, web and the API call the model: the folder name (with its run for a checkpoint-N)."""
    named = config.adapter_name_or_path or config.ptuning_checkpoint or config.model_name_or_path
    if not named:
        return "gemma-3-270m"
    path = Path(named).resolve() if Path(named).exists() else Path(named)
    return f"{path.parent.name}-{path.name}" if path.name.startswith("checkpoint-") else path.name


class Engine:
    """A model, its tokenizer and template, and the worker thread that generates with them."""

    def __init__(self, bundle: ModelBundle, config: GlmtuneConfig, tuned: bool, name: str):
        self.bundle = bundle
        self.config = config
        self.tuned = tuned
        self.name = name
        self.model = bundle.model.eval()
        self.tokenizer = bundle.tokenizer
        self.is_chatglm = getattr(self.model.config, "model_type", None) == "chatglm"
        self.stop_ids = stop_token_ids(self.model, self.tokenizer)
        self.context_length = context_length(self.model)
        self._base_copy: nn.Module | None = None
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._closed = False
        self._wakeup = threading.Condition()
        self._worker = threading.Thread(target=self._work, name="glmtune-engine", daemon=True)
        self._worker.start()

    @classmethod
    def from_config(cls, config: GlmtuneConfig) -> Engine:
        """Load what the config names: a base model, or a base plus a glmtune adapter/checkpoint."""
        tuned = trained_weights_folder(config) is not None or bool(config.ptuning_checkpoint)
        bundle = load_for_inference(config)
        return cls(bundle, config, tuned, model_name(config))

    # ---- prompts and settings ----

    def default_settings(self, **overrides) -> GenerationSettings:
        config = self.config
        settings = GenerationSettings(
            max_new_tokens=config.max_new_tokens or DEFAULT_MAX_NEW_TOKENS, do_sample=config.do_sample,
            top_p=config.top_p, temperature=config.temperature, seed=config.seed,
        )
        return dataclasses.replace(settings, **{k: v for k, v in overrides.items() if v is not None})

    def chat_prompt(self, history: list[tuple[str, str]], query: str, system: str | None = None) -> list[int]:
        """Prompt ids for ``query`` after ``history`` (earlier (query, answer) pairs), untruncated."""
        turns = [Turn(q, a, trains=False) for q, a in history] + [Turn(query, "")]
        conversation = Conversation(turns, system=system)
        return build_prompts([conversation], self.tokenizer, self.bundle.template, max_source_length=1 << 30)[0]

    def text_prompt(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def fitting_chat_prompt(self, history: list[tuple[str, str]], query: str, max_new_tokens: int,
                            system: str | None = None) -> tuple[list[int], int]:
        """The prompt with as many of the latest turns as fit the context, and how many turns were dropped."""
        for dropped in range(len(history) + 1):
            prompt = self.chat_prompt(history[dropped:], query, system)
            if len(prompt) + max_new_tokens <= self.context_length:
                return prompt, dropped
        raise GlmtuneError(f"the message is {len(prompt)} tokens; with {max_new_tokens} new tokens it exceeds "
                           f"the model's context of {self.context_length}")

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        if len(prompt_ids) + max_new_tokens > self.context_length:
            raise GlmtuneError(f"the prompt is {len(prompt_ids)} tokens; with {max_new_tokens} new tokens it exceeds "
                               f"the model's context of {self.context_length}")

    # ---- submitting ----

    def submit(self, prompt_ids: list[int], settings: GenerationSettings, deliver: Callable[[Output], None],
               base: bool = False) -> Job:
        """Queue a generation; ``deliver`` is called from the worker thread with each ``Output``."""
        job = Job(prompt_ids, settings, base and self.tuned, deliver)
        with self._wakeup:
            self._pending.append(job)
            self._wakeup.notify()
        return job

    def stream(self, prompt_ids: list[int], settings: GenerationSettings, base: bool = False) -> Iterator[str]:
        """Text pieces as they are generated. Closing the iterator (or Ctrl-C while waiting) cancels the job."""
        # SimpleQueue: a Ctrl-C landing inside get() cannot leave a lock held that the worker's put() needs.
        outputs: queue.SimpleQueue[Output] = queue.SimpleQueue()
        job = self.submit(prompt_ids, settings, outputs.put, base)
        try:
            while True:
                output = outputs.get()
                if output.text:
                    yield output.text
                if output.error:
                    raise GlmtuneError(output.error)
                if output.finish_reason:
                    return
        finally:
            job.cancelled.set()

    def close(self) -> None:
        """Cancel every job and stop the worker, so the process never exits in the middle of a forward pass."""
        with self._wakeup:
            self._closed = True
            for job in [*self._pending, *self._running]:
                job.cancelled.set()
                job.deliver(Output(error="the model was shut down"))
            self._pending.clear()
            self._wakeup.notify()
        self._worker.join()

    # ---- the worker ----

    def _next_batch(self) -> list[Job] | None:
        with self._wakeup:
            while not self._pending and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            batch = [self._pending.popleft()]
            key = batch[0].batch_key()
            others: deque[Job] = deque()
            while key is not None and self._pending:
                job = self._pending.popleft()
                (batch if job.batch_key() == key and len(batch) < MAX_BATCH else others).append(job)
            self._pending.extendleft(reversed(others))
            self._running = batch
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            batch = [job for job in batch if not job.cancelled.is_set()]
            if not batch:
                continue
            try:
                with self._model_view(batch[0].base) as model:
                    if self.is_chatglm:
                        self._generate_whole(model, batch)
                    else:
                        self._generate_streaming(model, batch)
            except Exception as error:  # the worker must survive one failed request
                logger.exception("generation failed")
                for job in batch:
                    job.deliver(Output(error=f"generation failed: {error}"))

    def _generate_streaming(self, model: nn.Module, batch: list[Job]) -> None:
        settings = dataclasses.replace(batch[0].settings, max_new_tokens=max(j.settings.max_new_tokens for j in batch))
        generator = torch.Generator().manual_seed(settings.seed) if settings.do_sample else None
        decoders = [IncrementalDecoder(self.tokenizer) for _ in batch]
        active = set(range(len(batch)))
        stops = set(self.stop_ids)

        def finish(row: int, reason: str) -> None:
            active.discard(row)
            batch[row].deliver(Output(decoders[row].flush(), finish_reason=reason))

        prompts = [job.prompt_ids for job in batch]
        steps = iter_generate(model, prompts, pad_id(self.tokenizer), self.stop_ids, settings, generator)
        for tokens in steps:
            for row in sorted(active):
                job, token = batch[row], int(tokens[row])
                if job.cancelled.is_set():
                    active.discard(row)
                elif token in stops:
                    finish(row, "stop")
                else:
                    job.completion_tokens += 1
                    text = decoders[row].push(token)
                    if text:
                        job.deliver(Output(text))
                    if job.completion_tokens >= job.settings.max_new_tokens:
                        finish(row, "length")
            if not active:
                steps.close()
                break
        for row in sorted(active):
            finish(row, "length")

    def _generate_whole(self, model: nn.Module, batch: list[Job]) -> None:
        """Native ChatGLM models generate with their own masks, so their answer comes in one piece."""
        for job in batch:
            [answer], _ = generate_texts(model, self.tokenizer, [job.prompt_ids], job.settings, batch_size=1,
                                         show_progress=False)
            job.completion_tokens = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
            reason = "length" if job.completion_tokens >= job.settings.max_new_tokens else "stop"
            job.deliver(Output(answer, finish_reason=reason))

    @contextlib.contextmanager
    def _model_view(self, base: bool) -> Iterator[nn.Module]:
        """The tuned model, or the base model under it for before/after comparisons."""
        if not base:
            yield self.model
        elif hasattr(self.model, "disable_adapter"):  # PEFT LoRA
            with self.model.disable_adapter():
                yield self.model
        elif isinstance(self.model, PrefixTuningModel):
            yield self.model.base_model
        else:
            # Freeze/full weights were overwritten in place (and native ChatGLM carries its prefix
            # inside): the base needs a second copy, loaded on first use.
            if self._base_copy is None:
                logger.info("loading a second copy of the base model for base answers")
                self._base_copy = load_base(self.config, self.bundle.base_model).model.eval()
            yield self._base_copy
