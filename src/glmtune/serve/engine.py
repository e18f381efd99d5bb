"""One loaded model behind a queue: chat, web and the API server all generate through an ``Engine``.

A single worker thread owns the model, so requests never interleave into each other's state. The
worker batches continuously: requests for the running model view (tuned or base) join the running
batch at its next step, each in a row of its own of ``SlotDecoder``'s cache, and leave it when they
end. A row's result does not depend on its neighbours (greedy equals greedy alone; a sampled request
draws from its own generator seeded with its ``seed``, so the seed reproduces its answer in any batch).
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
from glmtune.data.templates import ChatTemplate, NativeChatGLMTemplate, Template
from glmtune.data.tools import FALLBACK
from glmtune.data.tools_chatglm import CHATGLM3, GLM4, TURN_END_TOKENS, has_role_tokens
from glmtune.errors import GlmtuneError
from glmtune.eval.decoding import (SlotDecoder, TokenHistory, choose_tokens, kv_bytes_per_position, needs_history,
                                   sampling_noise)
from glmtune.eval.generation import GenerationSettings, generate_chatglm, stop_token_ids
from glmtune.methods.ptuning import PrefixTuningModel
from glmtune.models.introspect import parameter_dtype, text_config
from glmtune.methods.loading import ModelBundle, load_base, load_for_inference, trained_weights_folder

logger = logging.getLogger(__name__)

DEFAULT_MAX_NEW_TOKENS = 256
MAX_BATCH = 64  # rows of the running batch
# The shared cache holds at most this many positions per row; the context the engine offers is capped to it.
MAX_CACHE_POSITIONS = 4096
# Share of free device memory the shared cache may take (CPU: a fixed budget).
CACHE_MEMORY_SHARE = 0.6
CPU_CACHE_BYTES = 1 << 30


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


@dataclass
class _Row:
    """A job in the running batch: its text decoder, random generator and token history."""

    job: Job
    decoder: IncrementalDecoder
    generator: torch.Generator | None
    history: TokenHistory | None
    start: int  # the first cache position of its prompt
    previous: torch.Tensor | None = None  # its last token, for its settings' logits_processor


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


GLM4_MODEL_TYPES = ("glm", "glm4")


def tool_syntax(template: Template, tokenizer, model_type: str | None) -> str | None:
    """The tool format of a model as glmtune serves it: ChatGLM3's for native ChatGLM2/3 (the role-token format),
    GLM-4's where GLM-4's own chat template renders the tools, else glmtune's fallback; None for ChatGLM-6B (v1),
    which has no tool format (no role tokens) and whose vocabulary xgrammar is not given."""
    from glmtune.models.chatglm import ChatGLMTokenizer

    if isinstance(tokenizer, ChatGLMTokenizer):
        return None
    if isinstance(template, NativeChatGLMTemplate):
        return CHATGLM3 if has_role_tokens(tokenizer) else None
    if isinstance(template, ChatTemplate) and template.native_tools and model_type in GLM4_MODEL_TYPES:
        return GLM4
    return FALLBACK


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
        self.tool_syntax = tool_syntax(bundle.template, self.tokenizer, text_config(self.model).model_type)
        # ChatGLM3's role format ends a call at <|observation|> and an answer at <|user|> (as its chat() stops).
        self._turn_end_ids = ([self.tokenizer.special_token_ids[t] for t in TURN_END_TOKENS]
                              if self.tool_syntax == CHATGLM3 else [])
        self.tool_stop_ids = sorted({*self.stop_ids, *self._turn_end_ids})
        self.context_length = min(context_length(self.model), MAX_CACHE_POSITIONS)
        self._base_copy: nn.Module | None = None
        self._pending: deque[Job] = deque()
        self._running: list[Job] = []
        self._decoder: SlotDecoder | None = None
        self._decoder_view: bool | None = None
        self._next_tokens: torch.Tensor | None = None
        self._done: set[int] = set()
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
            repetition_penalty=config.repetition_penalty, top_k=config.top_k,
            no_repeat_ngram_size=config.no_repeat_ngram_size or 0,
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

    def _take_jobs(self, view: bool | None, free: int) -> tuple[bool | None, list[Job]] | None:
        """Wait for work; pending jobs for the running view (or, when idle, the first job's), at most ``free``."""
        with self._wakeup:
            while not self._pending and view is None and not self._closed:
                self._wakeup.wait()
            if self._closed:
                return None
            if view is None:
                view = self._pending[0].base
            taken = [job for job in self._pending if job.base == view][:free]
            for job in taken:
                self._pending.remove(job)
            self._running.extend(taken)
            return view, taken

    def _give_back(self, jobs: list[Job]) -> None:
        with self._wakeup:
            for job in jobs:
                self._running.remove(job)
            self._pending.extendleft(reversed(jobs))

    def _finished(self, job: Job) -> None:
        with self._wakeup:
            self._running.remove(job)

    def _work(self) -> None:
        rows: dict[int, _Row] = {}
        view: bool | None = None
        while (taken := self._take_jobs(view if rows else None, MAX_BATCH - len(rows))) is not None:
            view, jobs = taken
            jobs = [job for job in jobs if not job.cancelled.is_set() or self._finished(job)]
            try:
                with self._model_view(view) as model:
                    if self.is_chatglm:
                        for job in jobs:
                            self._generate_whole(model, job)
                        continue
                    decoder = self._decoder_for(view, model)
                    waiting = self._admit(decoder, rows, jobs)
                    if rows:
                        self._step(decoder, rows)
                if waiting:
                    self._give_back(waiting)
            except Exception as error:  # the worker must survive one failed request
                logger.exception("generation failed")
                for job in {id(j): j for j in [*jobs, *(r.job for r in rows.values())]}.values():
                    job.deliver(Output(error=f"generation failed: {error}"))
                    with contextlib.suppress(ValueError):
                        self._finished(job)
                rows.clear()
                self._decoder = None

    # ---- continuous batching ----

    def _decoder_for(self, view: bool, model: nn.Module) -> SlotDecoder:
        """The shared cache of the view's model: as many rows as memory allows, ``context_length`` positions each."""
        if self._decoder is None or self._decoder_view != view:
            self._decoder = None
            per_row = kv_bytes_per_position(model, parameter_dtype(model)) * (self.context_length + 1)
            device = next(model.parameters()).device
            if device.type == "cuda":
                torch.cuda.empty_cache()
                budget = torch.cuda.mem_get_info(device)[0] * CACHE_MEMORY_SHARE
            else:
                budget = CPU_CACHE_BYTES
            slots = int(max(1, min(MAX_BATCH, budget // per_row)))
            # --compile_generation: decode steps through torch.compile (prefills stay eager: every new prompt
            # length would compile), attending over the whole context.
            decoder = SlotDecoder(model, slots, self.context_length, compile_steps=self.config.compile_generation,
                                  compile_prefill=False)
            self._decoder, self._decoder_view = decoder, view
        return self._decoder

    def _admit(self, decoder: SlotDecoder, rows: dict[int, _Row], jobs: list[Job]) -> list[Job]:
        """Give each job that fits a free row, its prompt right-aligned to the shared position (moving the
        running rows' cache to make room if that helps), prefill them together; the jobs that must wait."""
        first, capacity = decoder.prefix_length, decoder.capacity
        placed: list[Job] = []
        waiting: list[Job] = []
        for job in jobs:
            if len(job.prompt_ids) + job.settings.max_new_tokens > capacity - first:
                job.deliver(Output(error=f"the prompt is {len(job.prompt_ids)} tokens; with {job.settings.max_new_tokens} "
                                         f"new tokens it exceeds the model's context of {self.context_length}"))
                self._finished(job)
                continue
            if len(rows) + len(placed) >= decoder.slots:
                waiting.append(job)
                continue
            candidates = [*placed, job]
            longest = max(len(j.prompt_ids) for j in candidates)
            need = max([j.settings.max_new_tokens for j in candidates]
                       + [r.job.settings.max_new_tokens - r.job.completion_tokens for r in rows.values()])
            position = decoder.position
            if not rows:
                if first + longest + need <= capacity:
                    decoder.position = first + longest
                    placed.append(job)
                else:
                    waiting.append(job)
                continue
            if position >= first + longest and position + need <= capacity:
                placed.append(job)
                continue
            lowest = min(r.start for r in rows.values())
            moved = max(first + position - lowest, first + longest)
            if moved + need <= capacity:
                decoder.shift(lowest, moved - position)
                for row in rows.values():
                    row.start += moved - position
                placed.append(job)
            else:
                waiting.append(job)
        if not placed:
            return waiting
        if not rows:
            for index in range(decoder.slots):
                decoder.release(index)
        free = [index for index in range(decoder.slots) if index not in rows][: len(placed)]
        logits = decoder.prefill(free, [job.prompt_ids for job in placed], pad_id(self.tokenizer))
        new_rows = {}
        for index, job in zip(free, placed):
            settings = job.settings
            generator = torch.Generator(decoder.device).manual_seed(settings.seed) if settings.do_sample else None
            history = TokenHistory([job.prompt_ids], logits.shape[-1], decoder.device, settings.repetition_penalty != 1.0,
                                   settings.no_repeat_ngram_size) if needs_history(settings) else None
            new_rows[index] = _Row(job, IncrementalDecoder(self.tokenizer), generator, history,
                                   decoder.position - len(job.prompt_ids))
        self._take_tokens(decoder, new_rows, logits, list(new_rows))
        rows.update({index: row for index, row in new_rows.items() if index not in self._done})
        return waiting

    def _step(self, decoder: SlotDecoder, rows: dict[int, _Row]) -> None:
        active = 1
        while active < max(rows) + 1:
            active *= 2
        active = min(active, decoder.slots)
        logits = decoder.step(self._next_tokens[:active], active)
        self._take_tokens(decoder, rows, logits, list(range(active)))
        for index in self._done:
            rows.pop(index, None)

    def _take_tokens(self, decoder: SlotDecoder, rows: dict[int, _Row], logits: torch.Tensor, logit_rows: list[int]) -> None:
        """Choose each row's next token (rows with equal settings together), stream it, retire finished rows."""
        if self._next_tokens is None or self._next_tokens.shape[0] != decoder.slots:
            self._next_tokens = torch.zeros(decoder.slots, dtype=torch.long, device=decoder.device)
        where = {index: position for position, index in enumerate(logit_rows)}
        groups: dict[tuple, list[int]] = {}
        for index, row in rows.items():
            settings = row.job.settings
            alone = needs_history(settings) or settings.logits_processor is not None  # state of this row alone
            key = (index,) if alone else dataclasses.astuple(dataclasses.replace(settings, seed=0, max_new_tokens=0))
            groups.setdefault(key, []).append(index)
        chosen = self._next_tokens  # rows not in ``rows`` keep their pending token
        for members in groups.values():
            settings, vocab = rows[members[0]].job.settings, logits.shape[-1]
            noise = torch.cat([sampling_noise(1, vocab, rows[i].generator, decoder.device) for i in members]) \
                if settings.do_sample else None
            first = rows[members[0]]
            picked = choose_tokens(logits[[where[i] for i in members]], settings, first.history, noise, first.previous)
            chosen[members] = picked
            if settings.logits_processor is not None:
                first.previous = picked
        tokens = chosen.tolist()  # the one host synchronisation of a step: streaming needs the tokens
        self._done = set()
        stops = set(self.stop_ids)
        for index, row in rows.items():
            job, token = row.job, tokens[index]
            if row.history is not None:
                row.history.add(chosen[index : index + 1])
            if job.cancelled.is_set():
                self._retire(decoder, index, row, None)
            elif token in stops:
                self._retire(decoder, index, row, "stop")
            else:
                job.completion_tokens += 1
                text = row.decoder.push(token)
                if text:
                    job.deliver(Output(text))
                if job.completion_tokens >= job.settings.max_new_tokens:
                    self._retire(decoder, index, row, "length")

    def _retire(self, decoder: SlotDecoder, index: int, row: _Row, reason: str | None) -> None:
        if reason:
            row.job.deliver(Output(row.decoder.flush(), finish_reason=reason))
        decoder.release(index)
        self._done.add(index)
        self._finished(row.job)

    def _generate_whole(self, model: nn.Module, job: Job) -> None:
        """Native ChatGLM models generate with their own masks, so their answer comes in one piece. A prompt in
        ChatGLM3's role format (it ends in <|assistant|>) also stops at the role tokens that end a turn, and so
        does a constrained answer: its grammar ends at any of them."""
        assistant = self.tokenizer.special_token_ids.get("<|assistant|>")
        role_format = bool(self._turn_end_ids) and job.prompt_ids[-1] == assistant
        stops = self.tool_stop_ids if role_format or job.settings.logits_processor is not None else self.stop_ids
        generator = torch.Generator().manual_seed(job.settings.seed)  # as generate_texts seeds native ChatGLM
        [tokens] = generate_chatglm(model, self.tokenizer, [job.prompt_ids], stops, job.settings, generator)
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        job.completion_tokens = len(tokens)
        reason = "length" if job.completion_tokens >= job.settings.max_new_tokens else "stop"
        job.deliver(Output(answer, finish_reason=reason))
        self._finished(job)

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
