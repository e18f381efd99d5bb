"""One typed config for every job, read from flags (the seed's names) or a YAML file with the same keys.

Flags are generated from these fields by `transformers.HfArgumentParser`, the parser the seed's
`ptuning/main.py` used, so `--do_train --prompt_column content ...` from `train.sh` parses unchanged.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from glmtune.errors import GlmtuneError


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class GlmtuneConfig:
    # ---- what to do (the seed's main.py switches) ----
    do_train: bool = _help("Fine-tune (glmtune main).", default=False)
    do_eval: bool = _help("Evaluate loss on --validation_file every --eval_steps during training.", default=False)
    do_predict: bool = _help("Generate for --test_file and score it (glmtune main).", default=False)

    # ---- model ----
    model_name_or_path: str | None = _help(
        "Hub id, local folder, .gguf file or a glmtune checkpoint. Default: the bundled Gemma 3 270M.",
        default=None,
    )
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = _help(
        "Dtype of the frozen base: auto = bf16 on a GPU that has it, else float32.", default="auto"
    )
    quantization_bit: int | None = _help("Quantize the frozen base to 4 or 8 bits.", default=None)
    quantize_embeddings: bool = _help(
        "With --quantization_bit: store the input embedding and an untied LM head as int8 too "
        "(--no_quantize_embeddings keeps them in the base dtype, as bitsandbytes does).", default=True
    )
    template: Literal["auto", "chat", "chatglm", "plain"] = _help(
        "Prompt template: auto = the tokenizer's chat template if it has one, else chatglm.", default="auto"
    )

    # ---- data ----
    train_file: str | None = _help("Training data: JSON array or JSON lines.", default=None)
    validation_file: str | None = _help("Validation data, same format.", default=None)
    test_file: str | None = _help("Data to predict on, same format.", default=None)
    dataset_format: Literal["columns", "alpaca", "sharegpt"] = _help(
        "columns (--prompt_column/--response_column), alpaca (instruction/input/output) or sharegpt.",
        default="columns",
    )
    prompt_column: str = _help("Key of the prompt in each record.", default="content")
    response_column: str = _help("Key of the answer in each record.", default="summary")
    history_column: str | None = _help("Key of the earlier turns, a list of [query, answer] pairs.", default=None)
    train_on: Literal["last", "all"] = _help("sharegpt: which assistant turns carry the loss.", default="last")
    max_source_length: int = _help("Prompt tokens kept (truncated separately from the answer).", default=64)
    max_target_length: int = _help("Answer tokens kept.", default=64)
    max_train_samples: int | None = _help("Use only the first N training records.", default=None)
    max_eval_samples: int | None = _help("Use only the first N validation records.", default=None)
    max_predict_samples: int | None = _help("Use only the first N test records.", default=None)
    skip_bad_records: bool = _help("Skip malformed records with a counted warning instead of stopping.", default=False)
    overwrite_cache: bool = _help("Accepted for the seed's scripts; glmtune keeps no dataset cache.", default=False)

    # ---- method ----
    finetuning_type: Literal["lora", "ptuning", "freeze", "full"] | None = _help(
        "Method. Omitted: ptuning when --pre_seq_len is given (the seed's behaviour), else lora.", default=None
    )
    lora_rank: int = _help("LoRA rank.", default=8)
    lora_alpha: float = _help("LoRA alpha.", default=16.0)
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    lora_target: str = _help(
        "Comma-separated module names for LoRA; 'auto' = the attention projections.", default="auto"
    )
    pre_seq_len: int | None = _help("P-Tuning v2: number of prefix (soft prompt) positions.", default=None)
    prefix_projection: bool = _help("P-Tuning v2: pass the prefix through a 2-layer MLP.", default=False)
    prefix_hidden_size: int | None = _help("P-Tuning v2: hidden size of that MLP (default: model hidden).", default=None)
    freeze_trainable_layers: int = _help("Freeze: train the last N layers.", default=2)
    freeze_trainable_modules: str = _help(
        "Freeze: which parts of those layers: mlp, all, or comma-separated module names.", default="mlp"
    )
    adapter_name_or_path: str | None = _help("Trained glmtune output or checkpoint to load onto the base.", default=None)
    ptuning_checkpoint: str | None = _help("The ChatGLM2 seed's name for a prefix checkpoint.", default=None)

    # ---- training ----
    output_dir: str = _help("Where checkpoints, logs and results go.", default="output/glmtune")
    overwrite_output_dir: bool = _help("Allow a non-empty --output_dir.", default=False)
    per_device_train_batch_size: int = _help("Micro-batch size.", default=4)
    per_device_eval_batch_size: int | None = _help(
        "Batch size for eval and generation (default: chosen from free memory).", default=None
    )
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float = _help("Peak learning rate.", default=2e-4)
    weight_decay: float = _help("AdamW weight decay.", default=0.0)
    lr_scheduler_type: str = _help("transformers scheduler name.", default="linear")
    warmup_steps: int = _help("Linear warm-up steps.", default=0)
    max_grad_norm: float = _help("Gradient clipping (0 disables).", default=1.0)
    num_train_epochs: float = _help("Epochs, when --max_steps is not given.", default=3.0)
    max_steps: int = _help("Optimizer steps; overrides --num_train_epochs when > 0.", default=-1)
    logging_steps: int = _help("Log loss every N steps.", default=10)
    save_steps: int = _help("Write checkpoint-STEP/ every N steps (0: only at the end).", default=500)
    eval_steps: int | None = _help("With --do_eval: evaluate every N steps (default: --save_steps).", default=None)
    eval_generate_samples: int = _help(
        "With --do_eval: also generate for the first N validation records and log ROUGE/BLEU-4.", default=0
    )
    save_total_limit: int | None = _help("Keep only the newest N checkpoints.", default=None)
    resume_from_checkpoint: str | None = _help("A checkpoint folder, or 'latest'.", default=None)
    fp16: bool = _help("Compute in float16 (autocast).", default=False)
    bf16: bool = _help("Compute in bfloat16 (autocast).", default=False)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", default=False)
    gradient_checkpointing_layers: int | None = _help(
        "With --gradient_checkpointing: recompute only this many decoder layers (the first ones); the others "
        "keep their activations. Trades memory for speed between no and full checkpointing.", default=None
    )
    fsdp: bool = _help(
        "Under torchrun: shard parameters, gradients and optimizer state with PyTorch FSDP2 (full and freeze "
        "fine-tuning of models too big for one GPU). Without it, several processes use DDP.", default=False
    )
    group_by_length: bool = _help(
        "Batch examples of similar length together (within windows of 50 batches) to cut padding.", default=False
    )
    torch_compile: bool = _help("Compile each transformer layer with torch.compile (GPU; first steps are slow).", default=False)
    seed: int = _help("Random seed for init, data order and dropout.", default=42)
    report_to: str = _help("Extra loggers: tensorboard, none.", default="tensorboard")

    # ---- generation (predict, chat, serve) ----
    predict_with_generate: bool = _help("Accepted for the seed's scripts; predict always generates.", default=True)
    max_new_tokens: int | None = _help("Tokens to generate (default: --max_target_length).", default=None)
    do_sample: bool = _help("Sample instead of greedy decoding.", default=False)
    top_p: float = _help("Nucleus sampling threshold (seed: 0.7).", default=0.7)
    temperature: float = _help("Sampling temperature (seed: 0.95).", default=0.95)
    num_beams: int = _help("Beam search width (1 = greedy/sampling).", default=1)
    kb: str | None = _help(
        "chat/web/serve: answer from this knowledge base (a `glmtune kb build` folder): each user turn retrieves "
        "passages, fills --kb_prompt, and the answer lists its sources.", default=None
    )
    kb_top_k: int = _help("With --kb: passages retrieved per question.", default=3)
    kb_score_threshold: float = _help(
        "With --kb: passages must score above this (BM25 score for the lexical retriever, cosine similarity for "
        "dense and hybrid); with none above it the answer is 根据已知信息无法回答该问题 and the model is not called.",
        default=0.0,
    )
    kb_prompt: str | None = _help(
        "With --kb: prompt template file with {context} and {question} (default: Langchain-Chatchat's).", default=None
    )
    kb_retriever: Literal["auto", "lexical", "dense", "hybrid"] = _help(
        "With --kb: auto = hybrid (BM25 + dense, reciprocal rank fusion) when the index has vectors, else lexical.",
        default="auto",
    )
    embedding_model: str | None = _help(
        "serve: sentence-transformers model (folder or hub name) behind /v1/embeddings (default: the --kb "
        "index's own embedding model, if it has one).", default=None
    )

    def __post_init__(self) -> None:
        if self.finetuning_type is None:
            self.finetuning_type = "ptuning" if self.pre_seq_len else "lora"
        if self.fp16 and self.bf16:
            raise GlmtuneError("choose one of --fp16 and --bf16")
        if self.quantization_bit not in (None, 0, 4, 8):
            raise GlmtuneError(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")
        if self.quantization_bit == 0:
            self.quantization_bit = None
        if self.finetuning_type == "ptuning" and not self.pre_seq_len:
            raise GlmtuneError("--finetuning_type ptuning needs --pre_seq_len N")
        if self.max_source_length < 1 or self.max_target_length < 1:
            raise GlmtuneError("--max_source_length and --max_target_length must be at least 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_config(argv: list[str] | None = None) -> GlmtuneConfig:
    """Flags, optionally on top of `--config file.yaml` (flags win over the file)."""
    import argparse

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    config_args, argv = config_parser.parse_known_args(argv)
    parser = HfArgumentParser(GlmtuneConfig)
    parser.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags win).")
    if config_args.config:
        parser.set_defaults(**load_yaml(config_args.config))
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:
        raise GlmtuneError(str(error)) from None
    config, extra = parsed[0], parsed[-1]
    if extra:
        raise GlmtuneError(f"unknown arguments: {' '.join(extra)}")
    return config


def load_yaml(path: str) -> dict:
    known = {f.name for f in dataclasses.fields(GlmtuneConfig)}
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise GlmtuneError(f"cannot read config {path}: {error}") from None
    unknown = set(values) - known
    if unknown:
        raise GlmtuneError(f"{path}: unknown keys {', '.join(sorted(unknown))}")
    return values
