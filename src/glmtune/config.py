"""One typed config for every job, read from flags (the seed's names) or a YAML file with the same keys.

Flags are generated from these fields by `transformers.HfArgumentParser`, the parser the seed's
`ptuning/main.py` used, so `--do_train --prompt_column content ...` from `train.sh` parses unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from glmtune.errors import GlmtuneError


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TaskConfig:
    """What to do (the seed's main.py switches)."""

    do_train: bool = _help("Fine-tune (glmtune main).", default=False)
    do_eval: bool = _help("Evaluate loss on --validation_file every --eval_steps during training.", default=False)
    do_predict: bool = _help("Generate for --test_file and score it (glmtune main).", default=False)


@dataclass
class ModelConfig:
    """The base model and how it is loaded."""

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
    template: str = _help(
        "Prompt template: auto = the original format for ChatGLM tokenizers, else the tokenizer's chat template if it "
        "has one, else plain (a base model: the prompt, a newline, the answer); chat, chatglm, plain; "
        "a LLaMA-Factory name (qwen3, llama3, ...) = the tokenizer's chat template (*_nothink: thinking off).",
        default="auto",
    )
    resize_vocab: bool = _help(
        "Resize the embeddings (and an untied LM head) to the tokenizer's size; new rows start as the mean of "
        "the embeddings of the old tokens their text splits into. Implied by --add_tokens and --new_tokenizer.",
        default=False,
    )
    add_tokens: str | None = _help(
        "Text file with one new token per line, added to the tokenizer before training (vocabulary extension).",
        default=None,
    )
    new_tokenizer: str | None = _help(
        "A tokenizer folder that extends the model's (the same ids for the old tokens, new ones after them).",
        default=None,
    )


@dataclass
class DataConfig:
    """Data files, their format and lengths."""

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
    max_source_length: str = _help(
        "Prompt tokens kept (truncated separately from the answer). auto: train: the 99th percentile of the "
        "tokenized training prompts (printed at the start); predict: prompts are not cut.", default="auto"
    )
    max_target_length: str = _help(
        "Answer tokens kept, EOS included. auto: the 99th percentile of the tokenized training answers; "
        "predict generates up to the trained run's value.", default="auto"
    )
    max_train_samples: int | None = _help("Use only the first N training records.", default=None)
    max_eval_samples: int | None = _help("Use only the first N validation records.", default=None)
    max_predict_samples: int | None = _help("Use only the first N test records.", default=None)
    skip_bad_records: bool = _help("Skip malformed records with a counted warning instead of stopping.", default=False)
    overwrite_cache: bool = _help("Accepted for the seed's scripts; glmtune keeps no dataset cache.", default=False)
    dataset: str | None = _help(
        "Comma-separated dataset names from DATASET_DIR/dataset_info.json, LLaMA-Factory's way (instead of --train_file).",
        default=None,
    )
    dataset_dir: str = _help("Folder of dataset_info.json and the files it names.", default="data")
    eval_dataset: str | None = _help("Validation dataset names from dataset_info.json (instead of --validation_file).", default=None)
    cutoff_len: int | None = _help(
        "Prompt and answer share N tokens, split as LLaMA-Factory does (replaces --max_source_length/--max_target_length).",
        default=None,
    )
    max_samples: int | None = _help("Use only the first N records of each dataset or file.", default=None)
    val_size: float = _help(
        "Hold out this fraction (< 1) or number of training records for validation; turns on --do_eval.", default=0.0
    )
    text_column: str = _help("--stage pt: key of the document text in JSON/JSONL records.", default="text")


@dataclass
class MethodConfig:
    """The fine-tuning method and its settings."""

    finetuning_type: Literal["lora", "ptuning", "freeze", "full"] | None = _help(
        "Method. Omitted: ptuning when --pre_seq_len is given (the seed's behaviour), else lora.", default=None
    )
    lora_rank: int = _help("LoRA rank.", default=8)
    lora_alpha: float = _help("LoRA alpha.", default=16.0)
    lora_dropout: float = _help("LoRA dropout.", default=0.05)
    lora_target: str = _help(
        "Comma-separated module names for LoRA; all-linear (or LLaMA-Factory's all) = every linear layer of the "
        "decoder (not the LM head); auto = the attention projections.", default="all-linear"
    )
    pre_seq_len: int | None = _help(
        "P-Tuning v2: number of prefix (soft prompt) positions (default with --finetuning_type ptuning: 128).",
        default=None,
    )
    prefix_projection: bool = _help("P-Tuning v2: pass the prefix through a 2-layer MLP.", default=False)
    prefix_hidden_size: int | None = _help("P-Tuning v2: hidden size of that MLP (default: model hidden).", default=None)
    freeze_trainable_layers: int = _help("Freeze: train the last N layers.", default=2)
    freeze_trainable_modules: str = _help(
        "Freeze: which parts of those layers: mlp, all, or comma-separated module names.", default="mlp"
    )
    adapter_name_or_path: str | None = _help("Trained glmtune output or checkpoint to load onto the base.", default=None)
    ptuning_checkpoint: str | None = _help("The ChatGLM2 seed's name for a prefix checkpoint.", default=None)
    additional_target: str | None = _help(
        "Comma-separated modules trained in full next to LoRA or freeze, e.g. embed_tokens,lm_head after a "
        "vocabulary extension (LoRA: PEFT's modules_to_save).", default=None
    )


@dataclass
class TrainingConfig:
    """The training loop, output and logging."""

    output_dir: str = _help("Where checkpoints, logs and results go.", default="output/glmtune")
    overwrite_output_dir: bool = _help("Allow a non-empty --output_dir.", default=False)
    per_device_train_batch_size: int = _help("Micro-batch size.", default=4)
    per_device_eval_batch_size: int | None = _help(
        "Batch size for eval and generation (default: chosen from free memory).", default=None
    )
    gradient_accumulation_steps: int = _help("Micro-batches per optimizer step.", default=1)
    learning_rate: float | None = _help(
        "Peak learning rate (default: 2e-3 for lora, 5e-2 for ptuning, 2e-4 for freeze, 5e-5 for full; measured on "
        "ADGEN dev, benchmarks/QUALITY.md).", default=None
    )
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
    torch_compile: bool = _help(
        "Compile each transformer layer with torch.compile. On a GPU use --bf16 --torch_compile --group_by_length, "
        "the fastest setup measured (1.26x HF Trainer with its own torch_compile and group_by_length, "
        "benchmarks/RESULTS.md); the first steps compile (about a minute).", default=False
    )
    activation_memory_budget: float = _help(
        "With --torch_compile: the share of each layer's activations kept for backward (1: all); the compiler "
        "recomputes the cheapest of the rest. Less memory for less speed than --gradient_checkpointing (H200, "
        "LoRA at 0.5: 2.8 GiB less, 6-7 percent slower).", default=1.0
    )
    seed: int = _help("Random seed for init, data order and dropout.", default=42)
    report_to: str = _help(
        "Trackers, comma-separated: none, tensorboard, wandb, mlflow, swanlab (each its extra: pip install "
        "'glmtune[wandb]'). The loss always goes to train_log.jsonl.", default="none"
    )
    warmup_ratio: float = _help("Warm-up as a fraction of the steps (when --warmup_steps is 0).", default=0.0)
    plot_loss: bool = _help("Write training_loss.png (loss, and eval loss if any) at the end.", default=True)
    stage: Literal["sft", "pt", "dpo"] = _help(
        "Training objective: sft (answers only), pt (raw text, loss on every token), dpo (preference pairs).",
        default="sft",
    )
    pref_loss: Literal["sigmoid", "ipo", "orpo", "simpo"] = _help(
        "--stage dpo: sigmoid (DPO), ipo, orpo or simpo (orpo and simpo need no reference model).", default="sigmoid"
    )
    pref_beta: float = _help("--stage dpo: beta of the preference loss (ORPO: the odds-ratio weight).", default=0.1)
    simpo_gamma: float = _help("--stage dpo --pref_loss simpo: the target reward margin gamma.", default=0.5)
    precompute_ref_logps: bool = _help(
        "--stage dpo: compute the reference log-probabilities once before training instead of running the "
        "reference model every step (full and freeze then need no frozen copy).", default=False
    )
    fp8: bool = _help(
        "Run the frozen base's linear layers in FP8 (e4m3, row-wise scales) on GPUs with FP8 tensor cores "
        "(H100/H200, L4, RTX 40xx); what trains stays bf16/fp32. The frozen weights take half the memory, with a "
        "slightly noisier loss; its speed on an H200 ranged from 0.8x to 1.26x bf16's across runs "
        "(benchmarks/RESULTS.md).", default=False
    )
    packing: bool = _help(
        "--stage sft: put each micro-batch's examples end to end in one row, with no padding and no attention "
        "across examples (LLaMA-Factory's neat_packing); the same loss as padded rows. LoRA, freeze and full on "
        "transformers models; on a GPU through flex attention.", default=False
    )
    load_best_model_at_end: bool = _help(
        "With --do_eval --validation_file: end with the weights of the evaluation that had the lowest validation "
        "loss (the last step is evaluated too); --no_load_best_model_at_end keeps the last step's.", default=True
    )


@dataclass
class GenerationConfig:
    """Generation (predict, chat, serve)."""

    predict_with_generate: bool = _help("Accepted for the seed's scripts; predict always generates.", default=True)
    max_new_tokens: int | None = _help("Tokens to generate (default: --max_target_length).", default=None)
    do_sample: bool = _help("Sample instead of greedy decoding.", default=False)
    top_p: float = _help("Nucleus sampling threshold (seed: 0.7).", default=0.7)
    temperature: float = _help("Sampling temperature (seed: 0.95).", default=0.95)
    num_beams: int = _help("Beam search width (1 = greedy/sampling).", default=1)
    repetition_penalty: float = _help(
        "Divide the scores of tokens already in the prompt or answer by this (>1 discourages loops; 1 = off).", default=1.0
    )
    top_k: int = _help("Sample only from the k most likely tokens (0 = off; with --do_sample).", default=0)
    no_repeat_ngram_size: int | None = _help(
        "Never repeat an n-gram of this size from the prompt or answer (0 = off; default: 4 for predict/compare, "
        "which measured better on ADGEN dev, off for chat/web/serve, where code and JSON repeat n-grams).", default=None
    )
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
    compile_generation: bool = _help(
        "On a GPU, through torch.compile: predict/compare's prefills and decode steps (compilations of 1.5-2 "
        "minutes, then 1.25-1.31x faster on the H200: for long runs); chat/web/serve's decode steps (47 s, then "
        "186 instead of 148 tokens/s at batch 1). benchmarks/RESULTS.md, issue 13.",
        default=False
    )


# The sections in the order --help shows them; a command parses the sections it needs.
SECTIONS = (TaskConfig, ModelConfig, DataConfig, MethodConfig, TrainingConfig, GenerationConfig)


@dataclass
class GlmtuneConfig(GenerationConfig, TrainingConfig, MethodConfig, DataConfig, ModelConfig, TaskConfig):
    """Every section in one object, so `config.x` works everywhere (fields keep the sections' order)."""

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
            self.pre_seq_len = DEFAULT_PRE_SEQ_LEN
        if self.packing and self.stage == "dpo":
            raise GlmtuneError("--packing is for --stage sft (--stage pt packs its documents already; preference pairs are not packed)")
        if self.packing and self.finetuning_type == "ptuning":
            raise GlmtuneError("--packing: P-Tuning v2's prefix would be attended across the packed examples; "
                               "use LoRA, freeze or full, or drop --packing")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.finetuning_type]
        self.max_source_length = _length(self.max_source_length, "max_source_length")
        self.max_target_length = _length(self.max_target_length, "max_target_length")
        check_ranges(self)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# lora and ptuning: the best of a learning-rate sweep on ADGEN dev with the bundled Gemma 3 270M, 150 steps x batch 8
# (benchmarks/QUALITY.md, sections 7-8); full: from 300-step runs there (section 10); freeze: unmeasured.
DEFAULT_LEARNING_RATES = {"lora": 2e-3, "ptuning": 5e-2, "freeze": 2e-4, "full": 5e-5}
DEFAULT_PRE_SEQ_LEN = 128
AUTO = "auto"


def _length(value: int | str, flag: str) -> int | str:
    """A token count, or "auto" (sized from the data by the recipe)."""
    if value == AUTO:
        return AUTO
    try:
        length = int(value)
    except (TypeError, ValueError):
        raise GlmtuneError(f"--{flag} must be a number of tokens or auto, got {value!r}") from None
    if length < 1:
        raise GlmtuneError(f"--{flag} must be at least 1 (or auto), got {length}")
    return length


@dataclass(frozen=True)
class FlagView:
    """The flags one command takes: whole sections, less the ``hidden`` fields (those keep their defaults)."""

    sections: tuple[type, ...] = SECTIONS
    hidden: frozenset[str] = frozenset()


# chat, web, serve and export load a (tuned) model and generate: no training, data or method-shape flags.
INFERENCE_FLAGS = FlagView(
    (ModelConfig, MethodConfig, GenerationConfig),
    hidden=frozenset({"finetuning_type", "lora_rank", "lora_alpha", "lora_dropout", "lora_target",
                      "freeze_trainable_layers", "freeze_trainable_modules", "predict_with_generate"}),
)
_GROUP_TITLES = {TaskConfig: "what to do", ModelConfig: "model", DataConfig: "data", MethodConfig: "method",
                 TrainingConfig: "training and output", GenerationConfig: "evaluation and generation"}
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def parse_config(argv: list[str] | None = None, view: FlagView = FlagView(), command: str = "glmtune") -> GlmtuneConfig:
    """Flags on top of a config file, as ``glmtune train FILE.yaml [key=value ...] [--flag ...]`` or
    ``--config FILE.yaml`` (LLaMA-Factory's ``llamafactory-cli train FILE.yaml key=value`` form works as is).
    Later sources win: the file, then ``key=value`` overrides, then flags."""
    import argparse

    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    config_parser = argparse.ArgumentParser(add_help=False)
    config_parser.add_argument("--config", default=None)
    config_args, argv = config_parser.parse_known_args(argv)
    config_file = config_args.config
    if argv and not argv[0].startswith("-") and argv[0].endswith(_CONFIG_SUFFIXES):
        if config_file:
            raise GlmtuneError(f"two config files: {argv[0]} and --config {config_file}; give one")
        config_file = argv.pop(0)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a and a.split("=", 1)[0].isidentifier()]
    argv = [a for a in argv if a not in overrides]
    _reject_hidden_flags(argv + [f"--{o.split('=', 1)[0]}" for o in overrides], view, command)

    parser = HfArgumentParser(_grouped(view.sections), prog=command,
                              usage="%(prog)s [FILE.yaml] [key=value ...] [--flag VALUE ...]")
    parser.add_argument("--config", default=None, help="YAML file with the same keys as the flags (flags win).")
    for action in parser._actions:  # argparse's only way to leave an option out of --help
        if action.dest in view.hidden:
            action.help = argparse.SUPPRESS
    from_file = load_yaml(config_file) if config_file else {}
    # key=value strings go in as argparse defaults, which argparse converts with the field's type as for a flag.
    parser.set_defaults(**{**from_file, **_check_keys(dict(o.split("=", 1) for o in overrides), "key=value overrides")})
    try:
        parsed = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:
        raise GlmtuneError(str(error)) from None
    sections, extra = parsed[: len(view.sections)], parsed[-1]
    if extra:
        raise GlmtuneError(f"unknown arguments: {' '.join(extra)}")
    values = {k: v for section in sections for k, v in dataclasses.asdict(section).items()}
    # A file's keys for sections this command does not parse (a training YAML given to chat) still apply.
    return GlmtuneConfig(**{**from_file, **values})


def _grouped(sections: tuple[type, ...]) -> list[type]:
    """The sections as HfArgumentParser argument groups (it titles a group by ``_argument_group_name``)."""
    return [type(s.__name__, (s,), {"_argument_group_name": _GROUP_TITLES[s]}) for s in sections]


def _reject_hidden_flags(argv: list[str], view: FlagView, command: str) -> None:
    shown = {f.name for section in view.sections for f in dataclasses.fields(section)} - view.hidden
    every = {f.name for f in dataclasses.fields(GlmtuneConfig)}
    for argument in argv:
        name = argument[2:].split("=", 1)[0] if argument.startswith("--") else ""
        name = name[3:] if name.startswith("no_") and name[3:] in every else name
        if name in every and name not in shown:
            raise GlmtuneError(f"{command} does not take --{name} (a training flag; see {command} --help)")


def load_yaml(path: str) -> dict:
    """A config file's keys, LLaMA-Factory's own keys translated; an unknown key is an error naming it."""
    try:
        values = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise GlmtuneError(f"cannot read config {path}: {error}") from None
    if not isinstance(values, dict):
        raise GlmtuneError(f"{path}: a config file is a mapping of keys to values")
    return _check_keys(values, path)


def _check_keys(values: dict, where: str) -> dict:
    from glmtune.llamafactory_keys import translate_keys

    values = translate_keys(values, where)
    known = {f.name for f in dataclasses.fields(GlmtuneConfig)}
    unknown = set(values) - known
    if unknown:
        raise GlmtuneError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
    # A YAML list (report_to: [wandb, mlflow], dataset: [a, b]) is the comma-separated value of a text flag; a list
    # for any other flag stays a list, so the range check names it (lora_rank: [8]).
    text_fields = {f.name for f in dataclasses.fields(GlmtuneConfig)
                   if getattr(f.type, "__name__", str(f.type)).startswith("str")}
    return {k: ",".join(map(str, v)) if isinstance(v, list) and k in text_fields else v for k, v in values.items()}


# ---- ranges: every numeric or named flag, checked once at parse time (GlmtuneConfig.__post_init__) ----


def _at_least(low: float) -> tuple[Callable[[object], bool], str]:
    return (lambda v: v >= low), f">= {low}"


def _optional_at_least(low: int) -> tuple[Callable[[object], bool], str]:
    return (lambda v: v is None or v >= low), f">= {low} (or left out)"


def _positive() -> tuple[Callable[[object], bool], str]:
    return (lambda v: v > 0), "> 0"


def _schedulers() -> list[str]:
    from transformers.trainer_utils import SchedulerType

    # These need a metric at every step (plateau, greedy) or extra arguments glmtune has no flags for.
    needs_more = {"reduce_lr_on_plateau", "greedy", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay"}
    return [s.value for s in SchedulerType if s.value not in needs_more]


RANGES: dict[str, tuple[Callable[[object], bool], str]] = {
    "max_train_samples": _optional_at_least(1),
    "max_eval_samples": _optional_at_least(1),
    "max_predict_samples": _optional_at_least(1),
    "lora_rank": _at_least(1),
    "lora_alpha": _positive(),
    "lora_dropout": ((lambda v: 0 <= v < 1), "in [0, 1)"),
    "pre_seq_len": _optional_at_least(1),
    "prefix_hidden_size": _optional_at_least(1),
    "freeze_trainable_layers": _at_least(1),
    "per_device_train_batch_size": _at_least(1),
    "per_device_eval_batch_size": _optional_at_least(1),
    "gradient_accumulation_steps": _at_least(1),
    "learning_rate": _positive(),
    "weight_decay": _at_least(0),
    "warmup_steps": _at_least(0),
    "max_grad_norm": ((lambda v: v >= 0), ">= 0 (0 disables clipping)"),
    "num_train_epochs": _positive(),
    "max_steps": ((lambda v: v == -1 or v >= 1), ">= 1, or -1 to train --num_train_epochs"),
    "logging_steps": _at_least(1),
    "save_steps": ((lambda v: v >= 0), ">= 0 (0: save only at the end)"),
    "eval_steps": _optional_at_least(1),
    "eval_generate_samples": _at_least(0),
    "save_total_limit": _optional_at_least(1),
    "gradient_checkpointing_layers": _optional_at_least(1),
    "activation_memory_budget": ((lambda v: 0 <= v <= 1), "in [0, 1] (1: keep every activation)"),
    # numpy's seed (transformers.set_seed) takes 0 <= seed < 2**32
    "seed": ((lambda v: 0 <= v < 2**32), "in [0, 2**32)"),
    "max_new_tokens": _optional_at_least(1),
    "top_p": ((lambda v: 0 < v <= 1), "in (0, 1]"),
    "temperature": _positive(),
    "num_beams": _at_least(1),
    "repetition_penalty": _positive(),
    "top_k": _at_least(0),
    "no_repeat_ngram_size": ((lambda v: v is None or v >= 0), ">= 0 (0 = off)"),
}

CHOICES: dict[str, Callable[[], list[str]]] = {
    "lr_scheduler_type": _schedulers,
}


def check_ranges(config: GlmtuneConfig) -> None:
    """One line naming the flag and its allowed range for the first value outside it."""
    for name, (allowed, description) in RANGES.items():
        value = getattr(config, name)
        try:
            valid = not isinstance(value, (bool, str)) and (not isinstance(value, float) or math.isfinite(value)) and allowed(value)
        except TypeError:  # a YAML value of the wrong type, e.g. a list
            valid = False
        if not valid:
            raise GlmtuneError(f"--{name} must be {description}, got {value!r}")
    for name, choices in CHOICES.items():
        value = getattr(config, name)
        if value not in choices():
            raise GlmtuneError(f"--{name} must be one of {', '.join(choices())}, got {value}")
