"""Expected peak memory of a training run, from the model config alone (``glmtune estimate-memory``).

    peak = weights + trainable state + max(activations + logits + transient, optimizer temporaries)

weights      the frozen base parameters in ``dtype``; with ``bits`` the decoder layers' linears take what
             ``QuantizedLinear`` stores: 1 byte per weight + 4 per output row (8 bits), ½ byte per weight
             + 4 per group of 64 inputs (4 bits). Exact: counted on the model built on the meta device.
trainable    T parameters that the method trains (the method is applied to the meta model): float32
             weights, gradients and AdamW's two moments, 16·T bytes, plus a 2·T half-precision copy that
             autocast keeps. The optimizer step adds a 4·T temporary, when the activations are freed.
activations  what autograd keeps for backward, per layer and sample of S = source + target tokens, with
             c bytes per element of the compute dtype; a frozen linear, quantized or not, keeps nothing:
               norms      4·w·S each (their float32 input; w = the width they normalize)
               attention  c·(2·q·S + 2·kv·(S + P)): q, k, v and output of SDPA; P = the prefix length
               MLP        c·m·S: m = f for a plain MLP (the activation's input), 3f for a gated one
               LoRA       ((c + 1)·in + c·r)·S per adapted linear: input copy, dropout mask, rank-r output
               trained    c·in·S per trained linear (freeze, full): the input kept for its weight gradient
             P-Tuning v2 adds the prefix encoder's float32 activations (with --prefix_projection) and, for
             native ChatGLM, the prefix dropout mask, 1 byte per prefix key/value element of the batch.
             With gradient checkpointing each layer keeps only its input, c·h·S (4·h·S for ChatGLM-6B, whose
             residual stream is float32 under autocast), and one layer's set is rebuilt at a time.
logits       tokens·V·(2c + 8): the logits, their float32 log-softmax kept for backward, and both gradients.
transient    a quantized base dequantizes one weight at a time: 2·c bytes per weight of the largest linear.

Assumes SDPA attention (no [S, S] score matrix is kept) and glmtune's loop (fp32 trainable weights, AdamW).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods import get_method
from glmtune.methods.lora import ATTENTION_PROJECTIONS
from glmtune.models.introspect import decoder_layers, text_config
from glmtune.models.quantization import quantized_nbytes

ATTENTION_NAMES = {name for family in ATTENTION_PROJECTIONS for name in family}
GIB = 2**30


def _config_dict(model_config_or_path) -> dict | None:
    if isinstance(model_config_or_path, dict):
        return model_config_or_path
    if isinstance(model_config_or_path, (str, Path)):
        config_file = Path(model_config_or_path) / "config.json"
        if not config_file.is_file():
            raise GlmtuneError(f"{model_config_or_path}: no config.json")
        return json.loads(config_file.read_text(encoding="utf-8"))
    return None


def meta_model(model_config_or_path) -> nn.Module:
    """The model of a config (a folder, a config.json dict or a transformers config) on the meta device."""
    from glmtune.models.chatglm import is_chatglm_config
    from glmtune.models.chatglm.loading import chatglm_version
    from glmtune.models.chatglm.modeling_v1 import ChatGLMConfig, ChatGLMForConditionalGeneration
    from glmtune.models.chatglm.modeling_v2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

    config = model_config_or_path
    config_dict = _config_dict(model_config_or_path)
    with torch.device("meta"):
        if isinstance(config, ChatGLMConfig):
            return ChatGLMForConditionalGeneration(config)
        if isinstance(config, ChatGLM2Config):
            return ChatGLM2ForConditionalGeneration(config)
        if config_dict is not None and is_chatglm_config(config_dict):
            settings = {k: v for k, v in config_dict.items() if k not in ("pre_seq_len", "quantization_bit")}
            if chatglm_version(config_dict) == 1:
                return ChatGLMForConditionalGeneration(ChatGLMConfig(**settings))
            return ChatGLM2ForConditionalGeneration(ChatGLM2Config(**settings))
        from transformers import AutoConfig, AutoModelForCausalLM

        if config_dict is not None:
            config = AutoConfig.for_model(**config_dict)
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


def _weight_bytes(model: nn.Module, layers: nn.ModuleList, bits: int | None, element: int) -> int:
    """Frozen parameters as ``load_model`` makes them: the layers' linears quantized, the rest in the base dtype."""
    quantized = {id(m.weight): m for layer in layers for _, m in _linears(layer) if bits and not m.weight.requires_grad}
    total = 0
    for parameter in {id(p): p for p in model.parameters() if not p.requires_grad}.values():
        linear = quantized.get(id(parameter))
        total += quantized_nbytes(linear.out_features, linear.in_features, bits) if linear else parameter.numel() * element
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
    lora_target: str = "auto",
    lora_dropout: float = 0.05,
    prefix_projection: bool = False,
    prefix_hidden_size: int | None = None,
    freeze_trainable_layers: int = 2,
    freeze_trainable_modules: str = "mlp",
    dtype: str = "bfloat16",
) -> dict:
    """Expected peak training memory in bytes, by term (see the module docstring for the formula).

    ``model_config_or_path``: a model folder, a ``config.json`` dict or a transformers config. ``dtype``:
    the base weights' dtype, also the compute dtype (autocast) when it is a half precision.
    """
    if bits not in (None, 4, 8):
        raise GlmtuneError(f"bits must be 4 or 8, got {bits}")
    if bits and method not in ("lora", "ptuning", "freeze"):
        raise GlmtuneError(f"--quantization_bit needs a method that keeps the base frozen, not {method}")
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    c = torch.empty(0, dtype=torch_dtype).element_size()
    model = meta_model(model_config_or_path)
    is_chatglm = getattr(model.config, "model_type", None) == "chatglm"
    layers = decoder_layers(model)
    hidden = text_config(model).hidden_size
    vocab = model.get_output_embeddings().out_features
    q, kv = _attention_widths(model, layers[0])
    mlp = _mlp_width(layers[0], hidden)
    norms = _norm_widths(layers[0], hidden, q, kv)
    largest_linear = max(m.weight.numel() for layer in layers for _, m in _linears(layer))

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
    weights = _weight_bytes(prepared, layers, bits, c)

    sequence = source_length + target_length
    prefix = pre_seq_len if method == "ptuning" else 0
    per_sample_layer = sequence * (4 * sum(norms) + c * 2 * q + c * mlp) + c * 2 * kv * (sequence + prefix)
    per_layer = [per_sample_layer] * len(layers)
    owner = {id(m): i for i, layer in enumerate(layers) for m in layer.modules()}
    for name, module in prepared.named_modules():
        index = owner.get(id(module))
        if index is None:
            continue
        if hasattr(module, "lora_A") and hasattr(module, "base_layer"):
            per_layer[index] += sequence * ((c + (lora_dropout > 0)) * module.base_layer.in_features + c * lora_rank)
        elif isinstance(module, nn.Linear) and module.weight.requires_grad and "lora_" not in name:
            per_layer[index] += sequence * c * module.in_features

    prefix_bytes = 0
    if prefix:
        kv_elements = prefix * 2 * len(layers) * kv
        projection = prefix * 4 * (hidden + (prefix_hidden_size or hidden)) if prefix_projection else 0
        copies = batch_size if is_chatglm else 1  # native ChatGLM expands the prefix per sample, the wrapper views it
        prefix_bytes = copies * projection + (batch_size * kv_elements if is_chatglm else 0)
        if gradient_checkpointing:
            prefix_bytes += copies * kv_elements * c  # the prefix keys/values are inputs of every layer
    if gradient_checkpointing:
        residual = 4 if is_chatglm and _chatglm_version(model) == 1 else c
        activations = batch_size * (len(layers) * residual * hidden * sequence + max(per_layer))
    else:
        activations = batch_size * sum(per_layer)
    activations += prefix_bytes
    logits = batch_size * sequence * vocab * (2 * c + 8)
    transient = 2 * c * largest_linear if bits else 0
    trainable_state = 16 * trained + (2 * trained if c < 4 else 0)
    peak = weights + trainable_state + max(activations + logits + transient, 4 * trained)
    return {
        "weights": weights, "trainable_state": trainable_state, "activations": activations, "logits": logits,
        "transient": transient, "peak": peak, "trainable_parameters": trained,
        "settings": {"method": method, "bits": bits, "batch_size": batch_size, "source_length": source_length,
                     "target_length": target_length, "pre_seq_len": prefix or None, "lora_rank": lora_rank,
                     "gradient_checkpointing": gradient_checkpointing, "dtype": dtype},
    }


def _chatglm_version(model: nn.Module) -> int:
    return 1 if hasattr(model.config, "inner_hidden_size") else 2


def format_estimate(estimate: dict) -> str:
    """A short table in GiB."""
    rows = [("weights", "weights"), ("trainable + optimizer state", "trainable_state"), ("activations", "activations"),
            ("logits", "logits"), ("dequantization transient", "transient"), ("expected peak", "peak")]
    settings = ", ".join(f"{k} {v}" for k, v in estimate["settings"].items() if v not in (None, False))
    lines = [settings, f"{estimate['trainable_parameters']:,} trainable parameters"]
    lines += [f"{label:<28} {estimate[key] / GIB:8.2f} GiB" for label, key in rows]
    return "\n".join(lines)
