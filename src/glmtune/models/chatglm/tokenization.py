"""ChatGLM tokenizers without remote code: ChatGLM-6B (`ice_text.model`) and ChatGLM2/3-6B (`tokenizer.model`).

Small standalone classes with the surface of the originals' Hugging Face tokenizers (`__call__`,
`encode`, `decode`, left padding with the original mask/position formats, `build_prompt`), reproducing
their outputs, including the decode quirks, without depending on transformers' tokenizer internals.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from sentencepiece import SentencePieceProcessor
from transformers import BatchEncoding

CONFIG_FILE = "tokenizer_config.json"


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (on by default for the original v1 tokenizer)."""
    for before in (" .", " ?", " !", " ,", " ' ", " n't", " 'm", " 's", " 've", " 're"):
        text = text.replace(before, before.strip())
    return text


def _to_id_list(ids) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids]


class _ChatGLMTokenizerBase:
    padding_side = "left"
    vocab_file_name = ""
    version = 0

    def __init__(self, vocab_file: str | Path) -> None:
        self.vocab_file = Path(vocab_file)
        self.sp = SentencePieceProcessor(model_file=str(self.vocab_file))

    # --- subclass hooks -------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[str]:
        raise NotImplementedError

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        raise NotImplementedError

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        raise NotImplementedError

    def _pad_row(self, ids: list[int], length: int, with_inputs: bool) -> dict:
        raise NotImplementedError

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        raise NotImplementedError

    # --- shared surface -------------------------------------------------------------------------
    @property
    def num_special_tokens(self) -> int:
        return len(self.build_inputs_with_special_tokens([]))

    def encode(
        self,
        text: str,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> list[int]:
        """Ids of `text`; with `truncation`, text ids are cut so the result fits `max_length`."""
        ids = self.convert_tokens_to_ids(self.tokenize(text))
        if truncation and max_length is not None:
            ids = ids[: max(max_length - (self.num_special_tokens if add_special_tokens else 0), 0)]
        return self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids

    def __call__(
        self,
        text_or_texts: str | list[str],
        padding: bool | str = False,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        truncation: bool = False,
        max_length: int | None = None,
    ) -> BatchEncoding:
        """Encode one text or a batch; `padding=True` pads on the left to the longest row
        (`"max_length"`: to `max_length`) with the original's mask/position formats."""
        single = isinstance(text_or_texts, str)
        texts = [text_or_texts] if single else list(text_or_texts)
        rows = [self.encode(t, add_special_tokens, truncation, max_length) for t in texts]
        if padding == "max_length":
            length = max_length
        elif padding:
            length = max(len(r) for r in rows)
        else:
            length = None
        if return_tensors not in (None, "pt"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported (use 'pt' or None)")
        if length is not None and any(len(r) > length for r in rows):
            raise ValueError(f"a row is longer than max_length={length}; pass truncation=True")
        padded = [self._pad_row(r, length if length is not None else len(r), length is not None) for r in rows]
        batch = {}
        for key in padded[0]:
            values = [p[key] for p in padded]
            if return_tensors == "pt":
                batch[key] = torch.stack(values) if torch.is_tensor(values[0]) else torch.tensor(values)
            else:
                values = [v.tolist() if torch.is_tensor(v) else v for v in values]
                batch[key] = values[0] if single else values
        return BatchEncoding(batch)

    def pad_ids(self, rows: list[list[int]]) -> dict[str, torch.Tensor]:
        """Left-pad already encoded rows into the model's input formats, as ``__call__(padding=True)`` does."""
        length = max(len(r) for r in rows)
        padded = [self._pad_row(list(r), length, True) for r in rows]
        return {
            key: torch.stack([p[key] for p in padded]) if torch.is_tensor(padded[0][key]) else torch.tensor([p[key] for p in padded])
            for key in padded[0]
        }

    def batch_decode(self, sequences, skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(seq, skip_special_tokens=skip_special_tokens) for seq in sequences]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        if isinstance(ids, int):
            return self.sp.id_to_piece(ids)
        return [self.sp.id_to_piece(i) for i in ids]

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write the sentencepiece model under its original name plus a small config, for reloading."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.vocab_file, directory / self.vocab_file_name)
        config = {
            "tokenizer_class": type(self).__name__,
            "chatglm_version": self.version,
            "vocab_file": self.vocab_file_name,
            "padding_side": self.padding_side,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


class ChatGLMTokenizer(_ChatGLMTokenizerBase):
    """ChatGLM-6B tokenizer (`ice_text.model`).

    Newlines become `<n>`, tabs `<|tab|>`, runs of 2..80 spaces `<|blank_N|>`; encoded text is followed
    by `[gMASK], <sop>`. Padding (left) also returns the original's bool mask [B, 1, L, L]
    (True = masked) and 2D positions [B, 2, L], built per row before padding.
    """

    vocab_file_name = "ice_text.model"
    version = 1
    max_blank_length = 80

    def __init__(self, vocab_file: str | Path) -> None:
        super().__init__(vocab_file)
        self.special_token_ids = {
            token: self._piece_id(token)
            for token in ("<unk>", "<pad>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>")
        }
        self.unk_token_id = self.special_token_ids["<unk>"]
        self.pad_token_id = self.special_token_ids["<pad>"]
        self.mask_token_id = self.special_token_ids["[MASK]"]
        self.gmask_token_id = self.special_token_ids["[gMASK]"]
        self.bos_token_id = self.special_token_ids["<sop>"]
        self.eos_token_id = self.special_token_ids["<eop>"]
        # The original's "special" ids for skip_special_tokens: bos, eos, unk, pad, mask (not [gMASK]).
        self._skipped_ids = {self.bos_token_id, self.eos_token_id, self.unk_token_id, self.pad_token_id,
                             self.mask_token_id}

    def _piece_id(self, piece: str) -> int:
        piece_id = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(piece_id) != piece:
            raise ValueError(f"{self.vocab_file} has no {piece} piece; is it a ChatGLM-6B ice_text.model?")
        return piece_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _preprocess(self, text: str) -> str:
        text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
        for n in range(self.max_blank_length, 1, -1):
            text = text.replace(" " * n, f"<|blank_{n}|>")
        return text

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for n in range(2, self.max_blank_length + 1):
            text = text.replace(f"<|blank_{n}|>", " " * n)
        return text

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(self._preprocess(text), out_type=str)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.sp.piece_to_id(tokens)
        return [self.sp.piece_to_id(t) for t in tokens]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = token_ids_0 + [self.gmask_token_id, self.bos_token_id]
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def _pad_row(self, ids: list[int], length: int, with_inputs: bool) -> dict:
        if not with_inputs:
            return {"input_ids": ids}
        n, pad = len(ids), length - len(ids)
        context = ids.index(self.bos_token_id) if self.bos_token_id in ids else n
        # The tokenizer prefers [MASK] when a row has both (the model prefers [gMASK]).
        mask_token = self.mask_token_id if self.mask_token_id in ids else self.gmask_token_id
        positions = list(range(n))
        if mask_token in ids:
            positions[context:] = [ids.index(mask_token)] * (n - context)
        block_positions = [0] * context + list(range(1, n - context + 1))
        keys = torch.arange(n)
        visible = (keys[None, :] <= keys[:, None]) | (keys[None, :] < context)
        mask = torch.ones(1, length, length, dtype=torch.bool)
        mask[0, pad:, pad:] = ~visible
        return {
            "input_ids": [self.pad_token_id] * pad + ids,
            "attention_mask": mask,
            "position_ids": [[0] * pad + positions, [0] * pad + block_positions],
        }

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        """Like the original: pad ids are dropped first; skipping drops <sop>/<eop>/<unk>/[MASK] but keeps [gMASK]."""
        ids = [i for i in _to_id_list(token_ids) if i != self.pad_token_id]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skipped_ids]
        if not ids:
            return ""
        text = self._postprocess(self.sp.decode_pieces([self.sp.id_to_piece(i) for i in ids]))
        return _clean_up_tokenization(text)

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """ChatGLM-6B chat prompt: the bare query without history, else rounds
        `[Round i]\\n问：…\\n答：…` counted from 0."""
        if not history:
            return query
        prompt = "".join(f"[Round {i}]\n问：{q}\n答：{r}\n" for i, (q, r) in enumerate(history))
        return prompt + f"[Round {len(history)}]\n问：{query}\n答："


class ChatGLM2Tokenizer(_ChatGLMTokenizerBase):
    """ChatGLM2-6B / ChatGLM3-6B tokenizer (`tokenizer.model`).

    Special tokens `[MASK] [gMASK] [sMASK] sop eop` follow the sentencepiece ids, then ChatGLM3's role
    tokens `<|system|> <|user|> <|assistant|> <|observation|>`. Encoded text is preceded by
    `[gMASK], sop`; pad = unk. Padding (left) returns a 0/1 `attention_mask` and `position_ids` 0..n-1.
    """

    vocab_file_name = "tokenizer.model"
    version = 2
    SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
    ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

    def __init__(self, vocab_file: str | Path) -> None:
        super().__init__(vocab_file)
        n_words = self.sp.vocab_size()
        self.special_token_ids = {t: n_words + i for i, t in enumerate(self.SPECIAL_TOKENS + self.ROLE_TOKENS)}
        self.bos_token_id = self.sp.bos_id()
        self.eos_token_id = self.sp.eos_id()
        self.pad_token_id = self.unk_token_id = self.sp.unk_id()
        self.gmask_token_id = self.special_token_ids["[gMASK]"]
        self.sop_token_id = self.special_token_ids["sop"]

    @property
    def vocab_size(self) -> int:
        """sentencepiece pieces + the five ChatGLM2 special tokens (as the original reports)."""
        return self.sp.vocab_size() + len(self.SPECIAL_TOKENS)

    def tokenize(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        if isinstance(tokens, str):
            return self.special_token_ids.get(tokens, self.sp.piece_to_id(tokens))
        return [self.special_token_ids.get(t, self.sp.piece_to_id(t)) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | list[str]:
        names = {i: t for t, i in self.special_token_ids.items()}
        if isinstance(ids, int):
            return names.get(ids) or self.sp.id_to_piece(ids)
        return [names.get(i) or self.sp.id_to_piece(i) for i in ids]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        ids = [self.gmask_token_id, self.sop_token_id] + token_ids_0
        if token_ids_1 is not None:
            ids = ids + token_ids_1 + [self.eos_token_id]
        return ids

    def _pad_row(self, ids: list[int], length: int, with_inputs: bool) -> dict:
        pad = length - len(ids)
        return {
            "input_ids": [self.pad_token_id] * pad + ids,
            "attention_mask": [0] * pad + [1] * len(ids),
            "position_ids": [0] * pad + list(range(len(ids))),
        }

    def decode(self, token_ids, skip_special_tokens: bool = False) -> str:
        """Like the original: special tokens, bos, eos and pad/unk decode to nothing (so
        `skip_special_tokens` changes nothing)."""
        hidden = {self.bos_token_id, self.eos_token_id, self.pad_token_id}
        pieces = [
            "" if i in hidden or i < 0 or i >= self.sp.vocab_size() else self.sp.id_to_piece(i)
            for i in _to_id_list(token_ids)
        ]
        return self.sp.decode_pieces(pieces)

    def build_prompt(self, query: str, history: list[tuple[str, str]] | None = None) -> str:
        """ChatGLM2-6B prompt: `[Round i]\\n\\n问：…\\n\\n答：…` rounds from i = 1."""
        history = history or []
        prompt = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{r}\n\n" for i, (q, r) in enumerate(history, start=1))
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def build_chat_input(
        self, query: str, history: list[dict] | None = None, role: str = "user"
    ) -> BatchEncoding:
        """ChatGLM3-6B chat input: `[gMASK] sop` + `<|role|>` metadata`\\n` message … + `<|assistant|>`.

        `history` items are dicts with `role`, `content` and optional `metadata`/`tools`, as in ChatGLM3.
        """
        ids: list[int] = []
        for item in history or []:
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids += self._chat_message(item["role"], item.get("metadata", ""), content)
        ids += self._chat_message(role, "", query) + [self.special_token_ids["<|assistant|>"]]
        ids = self.build_inputs_with_special_tokens(ids)
        return BatchEncoding({key: torch.tensor([value]) for key, value in self._pad_row(ids, len(ids), True).items()})

    def _chat_message(self, role: str, metadata: str, message: str) -> list[int]:
        if role not in ("system", "user", "assistant", "observation"):
            raise ValueError(f"unknown ChatGLM3 role {role!r}")
        return (
            [self.special_token_ids[f"<|{role}|>"]]
            + self.sp.encode(f"{metadata}\n")
            + self.sp.encode(message)
        )


ChatGLMTokenizerType = ChatGLMTokenizer | ChatGLM2Tokenizer


def load_chatglm_tokenizer(path_or_model_file: str | Path) -> ChatGLMTokenizerType:
    """Tokenizer from a model folder (`ice_text.model` / `tokenizer.model`, or a folder written by
    `save_pretrained`) or from an explicit sentencepiece file; v1 vs v2 is read from the model itself."""
    path = Path(path_or_model_file)
    if path.is_dir():
        config = path / CONFIG_FILE
        names = [json.loads(config.read_text()).get("vocab_file")] if config.is_file() else []
        names += [ChatGLMTokenizer.vocab_file_name, ChatGLM2Tokenizer.vocab_file_name]
        found = [path / n for n in names if n and (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"no ice_text.model or tokenizer.model in {path}")
        path = found[0]
    sp = SentencePieceProcessor(model_file=str(path))
    # ChatGLM-6B's vocabulary holds its special tokens as pieces; ChatGLM2/3 appends them after the pieces.
    if sp.id_to_piece(sp.piece_to_id("[gMASK]")) == "[gMASK]":
        return ChatGLMTokenizer(path)
    return ChatGLM2Tokenizer(path)
