"""Prompt templates: how a conversation becomes text segments.

A template turns each turn into a prompt text and an answer text. Turns that carry no loss are folded
into the prompt of the next turn that does, so ``train_on=last`` gives one prompt and one answer and
``train_on=all`` gives one (prompt, answer) pair per assistant turn.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass

from glmtune.data import tools
from glmtune.data.formats import Conversation, Turn
from glmtune.data.tools_chatglm import chatglm3_ids, uses_tools
from glmtune.errors import GlmtuneError


@dataclass
class Segment:
    prompt: str
    answer: str
    trains: bool


class Template:
    """Text templates: ``[Round i]`` style (``chatglm``) or bare (``plain``)."""

    #: Whether the answer text ends the turn by itself (chat templates) or needs the EOS token appended.
    answer_has_end_marker = False
    #: Whether the first prompt already contains the BOS text.
    prompt_has_bos = False
    #: Labelled tokens an example needs to teach anything: an answer of only EOS means its text was
    #: empty or cut away.
    minimum_answer_labels = 2

    def __init__(self, name: str):
        if name not in ("chatglm", "plain"):
            raise GlmtuneError(f"unknown template {name}")
        self.name = name

    def turn_prompt(self, round_index: int, query: str, system: str | None) -> str:
        if self.name == "chatglm":
            head = f"{system}\n\n" if system and round_index == 1 else ""
            return f"{head}[Round {round_index}]\n\n问：{query}\n\n答："
        head = f"{system}\n" if system and round_index == 1 else ""
        return f"{head}{query}\n"

    def turn_separator(self) -> str:
        return "\n\n" if self.name == "chatglm" else "\n"

    def segments(self, conversation: Conversation) -> list[Segment]:
        segments, pending = [], ""
        system = tools.system_text(conversation.system, conversation.tools or [])
        for index, turn in enumerate(conversation.turns, start=1):
            prompt = pending + self.turn_prompt(index, query_text(turn), system)
            if turn.trains:
                segments.append(Segment(prompt, answer_text(turn), True))
                pending = self.turn_separator()
            else:
                pending = prompt + answer_text(turn) + self.turn_separator()
        return segments

    def generation_prompt(self, conversation: Conversation) -> str:
        """The text a model continues to answer the last turn."""
        history = [dataclasses.replace(t, trains=False) for t in conversation.turns[:-1]]
        last = dataclasses.replace(conversation.turns[-1], answer="", calls=[])
        folded = dataclasses.replace(conversation, turns=history + [last])
        return "".join(s.prompt for s in self.segments(folded))


def query_text(turn: Turn) -> str:
    """A turn's query as text: the user's message, or the tool results in glmtune's fallback tool format."""
    return tools.results_text(turn.observations) if turn.observations else turn.query


def answer_text(turn: Turn) -> str:
    """A turn's answer as text: its words, then its calls in glmtune's fallback tool format."""
    return "\n".join(part for part in (turn.answer, tools.calls_text(turn.calls)) if part)


class ChatTemplate(Template):
    """The tokenizer's own chat template; segments are differences of successive renderings."""

    answer_has_end_marker = True
    prompt_has_bos = True
    minimum_answer_labels = 1

    def __init__(self, tokenizer, render_options: dict | None = None):
        self.name = "chat"
        self.tokenizer = tokenizer
        self.render_options = render_options or {}  # extra variables for the template, e.g. enable_thinking
        self.native_tools = tools.template_supports_tools(tokenizer)
        text = tools.chat_template_text(tokenizer)
        # GLM-4's templates take a call as an assistant message whose ``metadata`` is the function name and whose
        # content is the JSON arguments, and a result as an ``observation`` message; glm-4-9b-chat's reads the tools
        # from a message's ``tools`` rather than from ``tools=``.
        self.metadata_calls = self.native_tools and "metadata" in text
        self.message_tools = self.metadata_calls and re.search(r"\[\s*['\"]tools['\"]\s*\]", text) is not None
        self._tools: list[dict] | None = None
        self.answer_has_end_marker = self._closes_answers()

    def _closes_answers(self) -> bool:
        """Whether the template ends an assistant turn itself (Llama 3's <|eot_id|>, Gemma's <end_of_turn>).
        GLM-4's does not: an answer ends where the next <|user|> begins, so EOS is appended to it in
        training, as LLaMA-Factory's glm4 template does, or the model would never learn to stop."""
        probe = "glmtune answer probe"
        rendered = self._render([{"role": "user", "content": "q"}, {"role": "assistant", "content": probe}], False)
        return not rendered.rstrip().endswith(probe)

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        extra = {"tools": tools.openai_tools(self._tools)} if self._tools and self.native_tools else {}
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **self.render_options, **extra)

    def _system_messages(self, conversation: Conversation) -> list[dict]:
        """The system message; tools go to the template itself, or into the system text (the fallback)."""
        self._tools = conversation.tools
        system = conversation.system if self.native_tools else tools.system_text(conversation.system, self._tools or [])
        if self.message_tools and self._tools:
            return [{"role": "system", "content": system or "", "tools": tools.openai_tools(self._tools)}]
        return [{"role": "system", "content": system}] if system else []

    def _query_messages(self, turn: Turn) -> list[dict]:
        if turn.observations and self.native_tools:
            role = "observation" if self.metadata_calls else "tool"
            return [{"role": role, "content": result} for result in turn.observations]
        return [{"role": "user", "content": query_text(turn)}]

    def _answer_messages(self, turn: Turn) -> list[dict]:
        if turn.calls and self.metadata_calls:
            words = [{"role": "assistant", "content": turn.answer}] if turn.answer else []
            return words + [{"role": "assistant", "metadata": c.name, "content": json.dumps(c.arguments, ensure_ascii=False)}
                            for c in turn.calls]
        return [self._answer_message(turn)]

    def _answer_message(self, turn: Turn) -> dict:
        if turn.calls and self.native_tools:
            calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                     for c in turn.calls]
            return {"role": "assistant", "content": turn.answer, "tool_calls": calls}
        return {"role": "assistant", "content": answer_text(turn)}

    def segments(self, conversation: Conversation) -> list[Segment]:
        """Rendered only where an answer trains: turns before it are part of its prompt as the template renders them
        in context, so a template that rewrites past turns (Qwen3's drops their thinking) trains on the last answer."""
        messages = self._system_messages(conversation)
        segments, covered = [], ""  # the text up to the end of the last trained answer
        for turn in conversation.turns:
            messages += self._query_messages(turn)
            with_prompt = self._render(messages, True) if turn.trains else ""
            messages += self._answer_messages(turn)
            if not turn.trains:
                continue
            full = self._render(messages, False)
            if not (with_prompt.startswith(covered) and full.startswith(with_prompt)):
                raise GlmtuneError("this tokenizer's chat template does not render turns incrementally; use --template chatglm")
            segments.append(Segment(with_prompt[len(covered):], full[len(with_prompt):], True))
            covered = full
        return segments

    def generation_prompt(self, conversation: Conversation) -> str:
        messages = self._system_messages(conversation)
        for turn in conversation.turns[:-1]:
            messages += self._query_messages(turn) + self._answer_messages(turn)
        messages += self._query_messages(conversation.turns[-1])
        return self._render(messages, True)


class NativeChatGLMTemplate(Template):
    """Original ChatGLM tokenizers: prompts and special tokens exactly as THUDM's ``ptuning/main.py``.

    ChatGLM-6B: the query as is (``[Round i]`` rounds with history), then ``[gMASK] <sop>``;
    ChatGLM2/3-6B: ``[gMASK] sop`` then ``build_prompt``. Only the last answer carries loss, as in the seed.
    A conversation with tools, calls or tool results is rendered in ChatGLM3's role format instead
    (``data/tools_chatglm.py``), loss on every assistant message that trains, as in THUDM's ChatGLM3 fine-tuning.
    """

    def __init__(self, tokenizer):
        from glmtune.models.chatglm import ChatGLMTokenizer

        self.name = "chatglm-native"
        self.tokenizer = tokenizer
        # ChatGLM-6B's targets also hold <sop> before the answer, so it needs one more.
        self.minimum_answer_labels = 3 if isinstance(tokenizer, ChatGLMTokenizer) else 2

    @staticmethod
    def history(conversation: Conversation) -> list[tuple[str, str]]:
        return [(turn.query, turn.answer) for turn in conversation.turns[:-1]]

    def encode_example(self, conversation: Conversation, max_source_length: int, max_target_length: int):
        from glmtune.models.chatglm import build_train_example

        if uses_tools(conversation):
            ids, labels = chatglm3_ids(self.tokenizer, conversation, with_last_answer=True)
            limit = max_source_length + max_target_length  # one sequence, cut at the end as THUDM's ChatGLM3 does
            return ids[:limit], labels[:limit]
        last = conversation.turns[-1]
        return build_train_example(self.tokenizer, last.query, last.answer, max_source_length, max_target_length,
                                   self.history(conversation))

    def encode_prompt(self, conversation: Conversation, max_source_length: int) -> list[int]:
        if uses_tools(conversation):
            ids, _ = chatglm3_ids(self.tokenizer, conversation, with_last_answer=False)
            start = self.tokenizer.num_special_tokens  # keep [gMASK] sop, drop the oldest text
            return ids if len(ids) <= max_source_length else ids[:start] + ids[len(ids) - max_source_length + start:]
        text = self.tokenizer.build_prompt(conversation.turns[-1].query, self.history(conversation))
        return self.tokenizer.encode(text, add_special_tokens=True, truncation=True, max_length=max_source_length)


def is_chatglm_tokenizer(tokenizer) -> bool:
    from glmtune.models.chatglm import ChatGLM2Tokenizer, ChatGLMTokenizer

    return isinstance(tokenizer, (ChatGLMTokenizer, ChatGLM2Tokenizer))


GLMTUNE_TEMPLATES = ("auto", "chat", "chatglm", "plain", "chatglm-native")


def get_template(name: str, tokenizer) -> Template:
    """``auto`` picks the original format for ChatGLM tokenizers, else the tokenizer's chat template when
    it has one, else ``plain``: a base model has never seen ``[Round 1]\n\n问：`` either, and with it P-Tuning v2
    went on to write ``[Round 2]`` turns (benchmarks/QUALITY.md). Any other name is LLaMA-Factory's (``qwen3``,
    ``llama3``, ...): the model's own chat template stands for it, and LLaMA-Factory's ``*_nothink`` variants render
    with thinking off."""
    if name not in GLMTUNE_TEMPLATES:
        if not getattr(tokenizer, "chat_template", None):
            raise GlmtuneError(f"--template {name}: glmtune renders LLaMA-Factory templates with the tokenizer's chat "
                               "template, and this tokenizer has none; use --template chatglm or plain")
        return ChatTemplate(tokenizer, {"enable_thinking": False} if name.endswith("_nothink") else None)
    if name in ("auto", "chatglm-native") and is_chatglm_tokenizer(tokenizer):
        return NativeChatGLMTemplate(tokenizer)
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        name = "chat" if has_chat_template else "plain"
    if name == "chat":
        if not has_chat_template:
            raise GlmtuneError("--template chat: this tokenizer has no chat template")
        return ChatTemplate(tokenizer)
    return Template(name)
