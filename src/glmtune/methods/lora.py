"""LoRA through PEFT; saved in PEFT's format so ``PeftModel.from_pretrained(base, output_dir)`` loads it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods.base import Method, additional_targets, upcast_trainable
from glmtune.models.introspect import linear_module_names

# Attention projections by naming family: Llama/Gemma/Qwen/Mistral, ChatGLM/Falcon/BLOOM, GPT-2, Phi-3.
ATTENTION_PROJECTIONS = (("q_proj", "k_proj", "v_proj", "o_proj"), ("query_key_value",), ("c_attn",), ("qkv_proj", "o_proj"))


def lora_targets(model: nn.Module, requested: str) -> list[str] | str:
    names = linear_module_names(model)
    if requested in ("all", "all-linear"):  # LLaMA-Factory's and PEFT's names: every linear layer but the LM head
        return "all-linear"
    if requested != "auto":
        targets = [t.strip() for t in requested.split(",") if t.strip()]
        missing = [t for t in targets if t not in names]
        if missing:
            raise GlmtuneError(f"--lora_target {','.join(missing)}: no such linear module (have {', '.join(sorted(names))})")
        return targets
    for family in ATTENTION_PROJECTIONS:
        present = [n for n in family if n in names]
        if present:
            return present
    raise GlmtuneError(f"cannot guess the attention projections; pass --lora_target (modules: {', '.join(sorted(names))})")


def _tied_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight


class LoraMethod(Method):
    name = "lora"

    def apply(self, model: nn.Module, config: GlmtuneConfig) -> nn.Module:
        lora_config = LoraConfig(
            task_type="CAUSAL_LM",
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=lora_targets(model, config.lora_target),
            # Trained in full beside the adapters and saved in it (vocabulary extension: embed_tokens, lm_head).
            modules_to_save=additional_targets(model, config.additional_target) or None,
            ensure_weight_tying=bool(config.additional_target) and _tied_embeddings(model),
        )
        model = get_peft_model(model, lora_config)
        upcast_trainable(model)
        return model

    def save(self, model: PeftModel, directory: Path) -> None:
        # Not the whole resized embedding matrices after a vocabulary extension: loading rebuilds their new
        # rows from the base (glmtune.models.vocab), and --additional_target's trained copies are saved anyway.
        model.save_pretrained(str(directory), save_embedding_layers=False)

    def restore(self, model: PeftModel, directory: Path) -> None:
        state = load_file(str(Path(directory) / "adapter_model.safetensors"))
        result = set_peft_model_state_dict(model, state)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"{directory}: adapter tensors not in this model: {result.unexpected_keys[:3]}")

    def load(self, model: nn.Module, directory: Path, config: GlmtuneConfig) -> nn.Module:
        # The adapter in the base's dtype: PEFT's default (float32 adapters on a bfloat16 base) casts the
        # activations to float32 and back around every LoRA matmul (31.1 -> 29.2 ms a decode step on the H200
        # at 535 rows, benchmarks/RESULTS.md).
        return PeftModel.from_pretrained(model, str(directory), autocast_adapter_dtype=False).eval()

    @contextlib.contextmanager
    def base_view(self, model: PeftModel) -> Iterator[nn.Module]:
        with model.disable_adapter():
            yield model
