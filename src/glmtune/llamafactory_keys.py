"""LLaMA-Factory config keys that glmtune reads differently: keys for LLaMA-Factory's own machinery are accepted
with a note of what glmtune does instead, and a few are translated to glmtune's fields."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

# What glmtune does instead, said once when a config file uses the key.
INSTEAD = {
    "trust_remote_code": "glmtune runs no model-supplied code: ChatGLM is built in, other models load with transformers' classes",
    "preprocessing_num_workers": "glmtune tokenizes in the main process",
    "dataloader_num_workers": "glmtune builds batches in the training process",
    "ddp_timeout": "under torchrun glmtune uses PyTorch's default process-group timeout",
    "save_only_model": "glmtune checkpoints always hold the optimizer, scheduler and RNG state, so resume is exact",
    "flash_attn": "glmtune uses PyTorch's scaled_dot_product_attention",
    "eval_strategy": "glmtune evaluates every --eval_steps when --do_eval is on ('no' leaves it off)",
    "neat_packing": "glmtune's --packing is packing without attention across examples",
}


def translate_keys(values: dict, where: str) -> dict:
    """``values`` without the keys in ``INSTEAD`` (each noted), with ``eval_strategy`` turned into ``do_eval``."""
    kept = {}
    for key, value in values.items():
        if key not in INSTEAD:
            kept[key] = value
            continue
        logger.info("%s: %s is LLaMA-Factory's; %s", where, key, INSTEAD[key])
        if key == "eval_strategy" and str(value).lower() not in ("no", "none", "false"):
            kept.setdefault("do_eval", True)
        if key == "neat_packing":
            kept["packing"] = value  # a key=value override's text is parsed as the flag's, like any other
    return kept
