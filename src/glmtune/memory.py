"""Expected peak memory of a training run, from the model config alone (``glmtune estimate-memory``).

    peak = weights + trainable state + max(activations + max(logits, transient), 4·T)
    (gradient checkpointing: layer inputs + max(logits, one layer's activations and gradients + transient))

weights      the frozen base parameters in ``dtype``; with ``bits`` the decoder layers' linears take what
             ``QuantizedLinear`` stores: 1 byte per weight + 4 per output row (8 bits), ½ byte per weight
             + 2 (half dtype; float32: 4) per group of 64 inputs (4 bits), and with ``quantize_embeddings``
             the input embedding and untied LM head 1 byte per weight + 4 per row. Exact: counted on the
             model built on the meta device.
trainable    T parameters that the method trains (the method is applied to the meta model): float32
             weights, gradients and AdamW's two moments, 16·T bytes, plus the 2·T half-precision copy that
             autocast keeps. The optimizer step needs a 4·T temporary, when the activations are gone.
activations  what autograd keeps for backward, per layer and sample of S = source + target tokens, with
             c bytes per element of the compute dtype; a frozen linear, quantized or not, keeps nothing:
               norms      4·w·S each (their float32 input; w = the width they normalize)
               attention  c·(2·q·S + 2·kv·(S + P)): q, k, v and output of SDPA; P = the prefix length
               MLP        c·m·S: m = f for a plain MLP (the activation's input), 3f for a gated one
               LoRA       ((c + d)·in + c·r)·S per adapted linear: input copy, dropout mask, rank-r output
               trained    c·in·S per trained linear (freeze, full): the input its weight gradient needs
             d: a dropout mask element, 1 byte on CUDA (bool), the input's element size on CPU (float).
             P-Tuning v2 adds the prefix encoder's float32 activations (with --prefix_projection) and, for
             native ChatGLM, the prefix dropout mask over the batch's prefix keys and values.
             With gradient checkpointing each layer keeps only its input, c·h·S (4·h·S for ChatGLM-6B, whose
             residual stream is float32 under autocast), while backward rebuilds one layer's set at a time
             and holds that layer's gradients, c·(m + 2h)·S, with it.
logits       12 bytes per row and vocabulary entry: the float32 log-softmax kept for backward and the
             two float32 gradients of the loss's backward (the trainer has dropped the logits by then).
             Rows: glmtune's label-only loss (``train/loss.py``) computes logits only for the B·target
             label positions, at most ``CHUNK_ROWS`` at a time; ``label_only_loss=False`` (a model's own
             loss, as HF Trainer runs it) computes all B·S positions.
transient    a quantized base dequantizes one weight (an LM head: one slice of rows) at a time: 2·c bytes
             per weight of the largest.
             It happens inside the layers' backward, not with the logits, hence max(logits, transient).

Assumes SDPA attention (no [S, S] score matrix is kept) and glmtune's loop (fp32 trainable weights, AdamW).
Checked on CPU against the bytes autograd allocates (tests/test_memory_estimate.py) and on the H200 by
benchmarks/quantization_memory.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods import METHODS, get_method
from glmtune.methods.lora import ATTENTION_PROJECTIONS
from glmtune.models.chatglm import (
    ChatGLM2Config,
    ChatGLM2ForConditionalGeneration,
    ChatGLMConfig,
    ChatGLMForConditionalGeneration,
    chatglm_version,
    is_chatglm_config,
)
from glmtune.models.introspect import decoder_layers, text_config
from glmtune.models.loading import read_config_dict, resolve_model_source
from glmtune.models.quantization import VOCABULARY_BITS, quantized_nbytes, rows_per_slice, vocabulary_modules
from glmtune.train.loss import CHUNK_ROWS, supports_label_loss

ATTENTION_NAMES = {name for family in ATTENTION_PROJECTIONS for name in family}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
GIB = 2**30


def meta_model(model_config_or_path) -> nn.Module:
    """The model of a config on the meta device: no memory, any size.

    ``model_config_or_path``: what ``--model_name_or_path`` takes (a folder, a ``.gguf`` file, a hub id,
    None for the bundled default), a ``config.json`` dict or a config object.
    """
    config = model_config_or_path
    if config is None or isinstance(config, (str, Path)):
        source = resolve_model_source(None if config is None else str(config))
        config = read_config_dict(source) or AutoConfig.from_pretrained(source)
    if isinstance(config, dict) and is_chatglm_config(config):
        settings = {k: v for k, v in config.items() if k not in ("pre_seq_len", "quantization_bit")}
        config = ChatGLMConfig(**settings) if chatglm_version(config) == 1 else ChatGLM2Config(**settings)
    elif isinstance(config, dict):
        config = AutoConfig.for_model(**config)
    if not isinstance(config, PretrainedConfig):
        raise GlmtuneError(f"not a model config: {type(config).__name__}")
    config = copy.deepcopy(config)  # methods edit model.config (P-Tuning sets pre_seq_len)
    with torch.device("meta"):
        if isinstance(config, ChatGLMConfig):
            return ChatGLMForConditionalGeneration(config)
        if isinstance(config, ChatGLM2Config):
            return ChatGLM2ForConditionalGeneration(config)
        return AutoModelForCausalLM.from_config(config)


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name.rsplit(".", 1)[-1], m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def _attention_widths(model: nn.Module, layer: nn.Module) -> tuple[int, int]:
    """(q, kv): widths of the queries and of the keys (= values) of one layer, from its projections."""
    linears = dict(_linears(layer))
    if "q_proj" in linears and "k_proj" in linears:
        return linears["q_proj"].out_features, linears["k_proj"].out_features
    fused = next(linears[n] for n in ("query_key_value", "qkv_proj") if n in linears)
    config = text_config(model)
    head_dim = getattr(config, "kv_channels", None) or getattr(config, "head_dim", None)
    q = config.num_attention_heads * (head_dim or config.hidden_size // config.num_attention_heads)
    return q, (fused.out_features - q) // 2


def _mlp_width(layer: nn.Module, hidden: int) -> int:
    """m: f for a plain MLP, 3f for a gated one (gate and up outputs, activation output)."""
    linears = [(n, m) for n, m in _linears(layer) if n not in ATTENTION_NAMES]
    down = [m for _, m in linears if m.out_features == hidden and m.in_features != hidden]
    if not down:
        return 0
    f = down[0].in_features
    up = sum(m.out_features for _, m in linears if m.in_features == hidden and m.out_features != hidden)
    return 3 * f if up == 2 * f else up


def _norm_widths(layer: nn.Module, hidden: int, q: int, kv: int) -> list[int]:
    widths = []
    for name, module in layer.named_modules():
        weight = getattr(module, "weight", None)
        if "norm" not in type(module).__name__.lower() or weight is None:
            continue
        short = name.rsplit(".", 1)[-1]
        widths.append(hidden if weight.numel() == hidden else kv if short.startswith("k") else q)
    return widths


def _weight_bytes(model: nn.Module, quantized: dict[int, int], dtype: torch.dtype) -> int:
    """Frozen parameters as ``load_model`` makes them: those in ``quantized`` (parameter id -> bits) quantized,
    the rest in the base dtype."""
    total = 0
    for parameter in {id(p): p for p in model.parameters() if not p.requires_grad}.values():
        bits = quantized.get(id(parameter))
        total += quantized_nbytes(*parameter.shape, bits, dtype) if bits else parameter.numel() * dtype.itemsize
    return total


def estimate_memory(
    model_config_or_path,
    method: str = "lora",
    bits: int | None = None,
    batch_size: int = 1,
    source_length: int = 64,
    target_length: int = 64,
    pre_seq_len: int = 128,
    lora_rank: int = 8,
    gradient_checkpointing: bool = False,
    lora_target: str = "all-linear",
    lora_dropout: float = 0.05,
    prefix_projection: bool = False,
    prefix_hidden_size: int | None = None,
    freeze_trainable_layers: int = 2,
    freeze_trainable_modules: str = "mlp",
    dtype: str = "bfloat16",
    device: str = "cuda",
    quantize_embeddings: bool = True,
    label_only_loss: bool = True,
) -> dict:
    """Expected peak training memory in bytes, by term (the formula is in the module docstring).

    ``model_config_or_path``: as for ``meta_model``. ``dtype``: the base weights' dtype, also the compute
    dtype (autocast) when it is a half precision. ``device``: ``cuda`` or ``cpu`` (dropout masks differ).
    The other arguments are the training flags of the same names.
    """
    if bits not in (None, 4, 8):
        raise GlmtuneError(f"--quantization_bit must be 4 or 8, got {bits}")
    if bits and method == "full":
        raise GlmtuneError("--finetuning_type full trains every weight; it cannot use --quantization_bit")
    if method not in METHODS:
        raise GlmtuneError(f"unknown method {method}; choose {', '.join(METHODS)}")
    if dtype not in DTYPE_BYTES:
        raise GlmtuneError(f"unknown dtype {dtype}; choose {', '.join(DTYPE_BYTES)}")
    c = DTYPE_BYTES[dtype]
    model = meta_model(model_config_or_path)
    native_chatglm = getattr(model.config, "model_type", None) == "chatglm"
    layers = decoder_layers(model)
    hidden = text_config(model).hidden_size
    vocab = model.get_output_embeddings().out_features
    q, kv = _attention_widths(model, layers[0])
    mlp = _mlp_width(layers[0], hidden)
    norms = _norm_widths(layers[0], hidden, q, kv)
    quantized = {id(m.weight): bits for layer in layers for _, m in _linears(layer)} if bits else {}
    if bits and quantize_embeddings:
        quantized.update({id(model.get_submodule(name).weight): VOCABULARY_BITS for name in vocabulary_modules(model)})
    largest_dequantized = max(
        (min(p.numel(), rows_per_slice(p.shape[1]) * p.shape[1]) for p in model.parameters() if id(p) in quantized),
        default=0,
    )

    config = GlmtuneConfig(
        finetuning_type=method, lora_rank=lora_rank, lora_target=lora_target, lora_dropout=lora_dropout,
        pre_seq_len=pre_seq_len if method == "ptuning" else None, prefix_projection=prefix_projection,
        prefix_hidden_size=prefix_hidden_size, freeze_trainable_layers=freeze_trainable_layers,
        freeze_trainable_modules=freeze_trainable_modules,
    )
    method_object = get_method(method)
    with torch.device("meta"):
        prepared = method_object.apply(model, config)
    trained = sum(p.numel() for p in method_object.trainable_parameters(prepared).values())
    weights = _weight_bytes(prepared, quantized, getattr(torch, dtype))

    sequence = source_length + target_length
    prefix = pre_seq_len if method == "ptuning" else 0
    per_layer = [sequence * (4 * sum(norms) + c * 2 * q + c * mlp) + c * 2 * kv * (sequence + prefix)] * len(layers)
    lora_mask = (1 if device == "cuda" else 4) if lora_dropout > 0 else 0
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for name, module in prepared.named_modules():
        index = owner.get(id(module))
        if index is None:
            continue
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            per_layer[index] += sequence * ((c + lora_mask) * module.base_layer.in_features + c * lora_rank)
        elif isinstance(module, nn.Linear) and module.weight.requires_grad and "lora_" not in name:
            per_layer[index] += sequence * c * module.in_features

    prefix_bytes = 0
    if prefix:
        prefix_kv = prefix * 2 * len(layers) * kv  # elements of all layers' prefix keys and values, one sample
        copies = batch_size if native_chatglm else 1  # native ChatGLM computes the prefix per sample
        if prefix_projection:
            prefix_bytes += copies * prefix * 4 * (hidden + 2 * (prefix_hidden_size or hidden))
        if native_chatglm:
            prefix_bytes += batch_size * prefix_kv * (1 if device == "cuda" else c)  # prefix dropout mask
        if gradient_checkpointing:
            prefix_bytes += copies * prefix_kv * c  # every layer's input, kept for its recomputation
    transient = 2 * c * largest_dequantized
    logit_rows = batch_size * sequence
    if label_only_loss and supports_label_loss(model):
        logit_rows = min(batch_size * target_length, CHUNK_ROWS)
    logits = 12 * logit_rows * vocab
    if gradient_checkpointing:
        residual = 4 if isinstance(model.config, ChatGLMConfig) else c
        kept = batch_size * len(layers) * residual * hidden * sequence + prefix_bytes
        activations = kept + batch_size * max(per_layer)
        backward_gradients = batch_size * sequence * c * (mlp + 2 * hidden)
        dynamic = kept + max(logits, batch_size * max(per_layer) + backward_gradients + transient)
    else:
        activations = batch_size * sum(per_layer) + prefix_bytes
        dynamic = activations + max(logits, transient)
    trainable_state = 16 * trained + (2 * trained if c < 4 else 0)
    return {
        "weights": weights, "trainable_state": trainable_state, "activations": activations, "logits": logits,
        "transient": transient, "peak": weights + trainable_state + max(dynamic, 4 * trained),
        "trainable_parameters": trained,
        "settings": {"method": method, "bits": bits, "batch_size": batch_size, "source_length": source_length,
                     "target_length": target_length, "pre_seq_len": prefix or None,
                     "lora_rank": lora_rank if method == "lora" else None,
                     "gradient_checkpointing": gradient_checkpointing, "dtype": dtype},
    }


def estimate_for(config: GlmtuneConfig, device: str = "cuda") -> dict:
    """``estimate_memory`` for the flags of a ``glmtune train`` run (``glmtune estimate-memory``)."""
    if "auto" in (config.max_source_length, config.max_target_length):
        raise GlmtuneError("estimate-memory needs --max_source_length N and --max_target_length N "
                           "(auto is sized from the training data when glmtune train starts, and printed)")
    return estimate_memory(
        config.model_name_or_path, config.finetuning_type, config.quantization_bit, config.per_device_train_batch_size,
        config.max_source_length, config.max_target_length, pre_seq_len=config.pre_seq_len or 0,
        lora_rank=config.lora_rank, gradient_checkpointing=config.gradient_checkpointing, lora_target=config.lora_target,
        lora_dropout=config.lora_dropout, prefix_projection=config.prefix_projection,
        prefix_hidden_size=config.prefix_hidden_size, freeze_trainable_layers=config.freeze_trainable_layers,
        freeze_trainable_modules=config.freeze_trainable_modules,
        dtype="bfloat16" if config.torch_dtype == "auto" else config.torch_dtype, device=device,
        quantize_embeddings=config.quantize_embeddings,
    )


def format_estimate(estimate: dict) -> str:
    """A short table in GiB."""
    rows = [("weights", "weights"), ("trainable + optimizer state", "trainable_state"), ("activations", "activations"),
            ("logits", "logits"), ("dequantization transient", "transient"), ("expected peak", "peak")]
    settings = ", ".join(f"{k} {v}" for k, v in estimate["settings"].items() if v not in (None, False))
    lines = [settings, f"{estimate['trainable_parameters']:,} trainable parameters"]
    lines += [f"{label:<28} {estimate[key] / GIB:8.2f} GiB" for label, key in rows]
    return "\n".join(lines)
