"""Prompt templates: how a conversation becomes text segments.

A template turns each turn into a prompt text and an answer text. Turns that carry no loss are folded
into the prompt of the next turn that does, so ``train_on=last`` gives one prompt and one answer and
``train_on=all`` gives one (prompt, answer) pair per assistant turn.
"""

from __future__ import annotations

from dataclasses import dataclass

from glmtune.data.formats import Conversation, Turn
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
        for index, turn in enumerate(conversation.turns, start=1):
            prompt = pending + self.turn_prompt(index, turn.query, conversation.system)
            if turn.trains:
                segments.append(Segment(prompt, turn.answer, True))
                pending = self.turn_separator()
            else:
                pending = prompt + turn.answer + self.turn_separator()
        return segments

    def generation_prompt(self, conversation: Conversation) -> str:
        """The text a model continues to answer the last turn."""
        history = [Turn(t.query, t.answer, trains=False) for t in conversation.turns[:-1]]
        folded = Conversation(history + [Turn(conversation.turns[-1].query, "")], conversation.system)
        return "".join(s.prompt for s in self.segments(folded))


class ChatTemplate(Template):
    """The tokenizer's own chat template; segments are differences of successive renderings."""

    answer_has_end_marker = True
    prompt_has_bos = True
    minimum_answer_labels = 1

    def __init__(self, tokenizer, render_options: dict | None = None):
        self.name = "chat"
        self.tokenizer = tokenizer
        self.render_options = render_options or {}  # extra variables for the template, e.g. enable_thinking
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
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **self.render_options)

    def segments(self, conversation: Conversation) -> list[Segment]:
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        segments, pending, rendered = [], "", self._render(messages, False)
        for turn in conversation.turns:
            messages.append({"role": "user", "content": turn.query})
            with_prompt = self._render(messages, True)
            messages.append({"role": "assistant", "content": turn.answer})
            full = self._render(messages, False)
            if not (with_prompt.startswith(rendered) and full.startswith(with_prompt)):
                raise GlmtuneError("this tokenizer's chat template does not render turns incrementally; use --template chatglm")
            prompt, answer = with_prompt[len(rendered):], full[len(with_prompt):]
            if turn.trains:
                segments.append(Segment(pending + prompt, answer, True))
                pending = ""
            else:
                pending += prompt + answer
            rendered = full
        return segments

    def generation_prompt(self, conversation: Conversation) -> str:
        messages = [{"role": "system", "content": conversation.system}] if conversation.system else []
        for turn in conversation.turns[:-1]:
            messages += [{"role": "user", "content": turn.query}, {"role": "assistant", "content": turn.answer}]
        messages.append({"role": "user", "content": conversation.turns[-1].query})
        return self._render(messages, True)


class NativeChatGLMTemplate(Template):
    """Original ChatGLM tokenizers: prompts and special tokens exactly as THUDM's ``ptuning/main.py``.

    ChatGLM-6B: the query as is (``[Round i]`` rounds with history), then ``[gMASK] <sop>``;
    ChatGLM2/3-6B: ``[gMASK] sop`` then ``build_prompt``. Only the last answer carries loss, as in the seed.
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

        last = conversation.turns[-1]
        return build_train_example(self.tokenizer, last.query, last.answer, max_source_length, max_target_length,
                                   self.history(conversation))

    def encode_prompt(self, conversation: Conversation, max_source_length: int) -> list[int]:
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
