"""Tiny random models and a character tokenizer, built from a config in seconds, for CPU tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
DEMO_TRAIN = REPO / "src" / "glmtune" / "demo_data" / "demo_train.jsonl"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """One token per character, with BOS added in front like Llama and Gemma tokenizers."""
    characters = sorted({c for text in texts for c in text} | set("abcdefghijklmnopqrstuvwxyz0123456789 \n[]#*：，。"))
    vocab = {token: i for i, token in enumerate(SPECIALS + characters)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def corpus_texts() -> list[str]:
    records = [json.loads(line) for line in DEMO_TRAIN.read_text(encoding="utf-8").splitlines()]
    return [r["content"] + r["summary"] for r in records] + ["一二三问答轮你是助手翻译"]


def build_model_folder(folder: Path, architecture: str, seed: int = 0, extra_text: str = "",
                       context: int = 512) -> Path:
    """``llama`` (grouped-query attention) or ``gemma`` (Gemma 3: one KV head, sliding-window layers).
    ``extra_text``'s characters join the vocabulary (e.g. JSON punctuation for tool calls)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus_texts() + [extra_text])
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=context, pad_token_id=tokenizer.pad_token_id,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **common))
    elif architecture == "gemma":
        config = Gemma3TextConfig(num_key_value_heads=1, head_dim=16, sliding_window=64,
                                  layer_types=["sliding_attention", "full_attention"], **common)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(architecture)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_tiny(model: Path, output: Path, method: str, steps: int = 3, save_steps: int = 0, samples: int = 8) -> Path:
    """A quick fine-tune on the demo data, with steps large enough to change what greedy decoding picks."""
    from glmtune.config import GlmtuneConfig
    from glmtune.recipes.train import run_train

    run_train(GlmtuneConfig(
        do_train=True, model_name_or_path=str(model), train_file=str(DEMO_TRAIN), output_dir=str(output),
        finetuning_type=method, pre_seq_len=4, freeze_trainable_layers=1, max_steps=steps, save_steps=save_steps,
        learning_rate={"ptuning": 0.5}.get(method, 5e-2), max_train_samples=samples, report_to="none",
    ))
    return output


GLM4_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
# GLM-4's chat template for plain chats (THUDM/glm-4-9b-chat-hf renders these turns the same way).
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for message in messages %}{% if message['role'] == 'assistant' %}<|assistant|>\n"
    "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


# A GLM-4 template that takes OpenAI's `tool_calls` and `tool` messages (written for the tests): a call as
# `name\n{json}` after <|assistant|>, a result as an <|observation|> message.
GLM4_TOOL_CALLS_TEMPLATE = (
    "[gMASK]<sop>{% if tools %}<|system|>\n# 可用工具{% for tool in tools %}\n\n## {{ tool.function.name }}\n\n"
    "{{ tool.function | tojson }}{% endfor %}{% endif %}"
    "{% for m in messages %}{% if m.role == 'assistant' %}<|assistant|>{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}{{ c.function.name }}\n{{ c.function.arguments | tojson }}{% endfor %}"
    "{% else %}\n{{ m.content }}{% endif %}{% elif m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{% else %}<|{{ m.role }}|>\n{{ m.content }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# glm-4-9b-chat's tool template, cut to function tools (written from THUDM's): the tools from a message's
# `tools`, a call as an assistant message with the name as `metadata` and the JSON arguments as content, results
# as `observation` messages.
GLM4_CHAT_TOOL_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n"
    "## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json "
    "格式表示调用的参数。{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>"
    "{{ item['metadata'] }}\n{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_glm_tokenizer(extra_text: str = "") -> PreTrainedTokenizerFast:
    """The character tokenizer with GLM-4's special tokens, chat template and [gMASK]<sop> text start."""
    tokenizer = build_tokenizer(corpus_texts() + [extra_text])
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>", "additional_special_tokens": GLM4_SPECIALS})
    tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[(t, tokenizer.convert_tokens_to_ids(t)) for t in ("[gMASK]", "<sop>")])
    tokenizer.chat_template = GLM4_CHAT_TEMPLATE
    return tokenizer


def build_glm_folder(folder: Path, architecture: str, seed: int = 0, extra_text: str = "",
                     chat_template: str | None = None, context: int = 512) -> Path:
    """transformers' native GLM-4 models: ``glm`` (GLM-4-9B-0414's predecessor, GlmForCausalLM) or ``glm4``
    (Glm4ForCausalLM), tiny, with GLM-4's chat template (or ``chat_template``); generation stops at <|endoftext|>
    or <|user|>. ``extra_text``'s characters join the vocabulary."""
    from transformers import Glm4Config, Glm4ForCausalLM, GlmConfig, GlmForCausalLM

    tokenizer = build_glm_tokenizer(extra_text)
    tokenizer.chat_template = chat_template or tokenizer.chat_template
    user = tokenizer.convert_tokens_to_ids("<|user|>")
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=context,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id, user])
    torch.manual_seed(seed)
    classes = {"glm": (GlmConfig, GlmForCausalLM), "glm4": (Glm4Config, Glm4ForCausalLM)}
    config_class, model_class = classes[architecture]
    model = model_class(config_class(**common))
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, user]
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_chatglm3_folder(folder: Path, seed: int = 0, context: int = 4096) -> Path:
    """A tiny random native ChatGLM3-6B folder (GLM v2 weights, config.json, tokenizer.model): a byte-fallback
    SentencePiece model trained here on the demo data, JSON and Python call syntax, so any text encodes, and the
    ChatGLM2/3 special and role tokens after its pieces."""
    import io
    import string

    import sentencepiece

    from glmtune.models.chatglm import ChatGLM2Config, ChatGLM2ForConditionalGeneration, ChatGLM2Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    lines = corpus_texts() + [string.printable, "```python\ntool_call(city='Paris', days=2, alerts=True)\n```",
                              '{"name": "get_weather", "arguments": {"city": "Paris"}}', "What is the weather in Paris?"]
    model_file = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=model_file, vocab_size=1000,
                                             byte_fallback=True, character_coverage=1.0, model_type="bpe",
                                             normalization_rule_name="identity", remove_extra_whitespaces=False,
                                             minloglevel=2, hard_vocab_limit=False)
    (folder / ChatGLM2Tokenizer.vocab_file_name).write_bytes(model_file.getvalue())
    words = sentencepiece.SentencePieceProcessor(model_proto=model_file.getvalue()).vocab_size()
    special = len(ChatGLM2Tokenizer.SPECIAL_TOKENS) + len(ChatGLM2Tokenizer.ROLE_TOKENS)
    config = ChatGLM2Config(num_layers=2, padded_vocab_size=words + special, hidden_size=64, ffn_hidden_size=128,
                            kv_channels=16, num_attention_heads=4, multi_query_group_num=2, seq_length=context)
    torch.manual_seed(seed)
    ChatGLM2ForConditionalGeneration(config).save_pretrained(folder)
    return folder
