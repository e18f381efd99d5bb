"""A base model loaded for use, with the trained weights of a glmtune output on top: what predict, compare,
chat, web, serve and export start from (``load_for_inference``), and what training starts from (``load_base``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.data.templates import Template, get_template
from glmtune.errors import GlmtuneError
from glmtune.files import check_model_folder, read_run_record
from glmtune.methods import get_method
from glmtune.models.loading import load_model, load_tokenizer, resolve_model_source
from glmtune.models.vocab import resize_for_tokenizer, tokenizer_for_output

logger = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: object
    template: Template
    base_model: str | None  # what the user named (None: the bundled default)
    trained_config: GlmtuneConfig | None = None  # the run whose trained weights are loaded, if any


def load_base(config: GlmtuneConfig, base_model: str | None, prefix_checkpoint: str | None = None) -> ModelBundle:
    source = resolve_model_source(base_model)
    tokenizer = load_tokenizer(source)
    model = load_model(source, dtype=config.torch_dtype, quantization_bit=config.quantization_bit,
                       prefix_checkpoint=prefix_checkpoint, quantize_embeddings=config.quantize_embeddings)
    return ModelBundle(model, tokenizer, get_template(config.template, tokenizer), base_model)


def trained_weights_folder(config: GlmtuneConfig) -> Path | None:
    """Where trained weights come from: --adapter_name_or_path, --ptuning_checkpoint, or a glmtune folder as the model."""
    for candidate in (config.adapter_name_or_path, config.ptuning_checkpoint, config.model_name_or_path):
        if candidate and read_run_record(candidate):
            return Path(candidate)
    if config.adapter_name_or_path:
        raise GlmtuneError(f"{config.adapter_name_or_path}: not a glmtune output (no glmtune.json)")
    return None


def load_for_inference(config: GlmtuneConfig) -> ModelBundle:
    """The base model, with trained weights on top when the config names a glmtune output or checkpoint."""
    folder = trained_weights_folder(config)
    if folder is None:
        # A seed (THUDM ptuning/main.py) checkpoint: only the prefix encoder, loaded natively.
        return load_base(config, config.model_name_or_path, prefix_checkpoint=config.ptuning_checkpoint)
    record = read_run_record(folder)
    check_model_folder(folder, needs_config=False)  # a truncated adapter: one line naming it, not a loader's traceback
    trained_config = GlmtuneConfig(**{**record["config"], "output_dir": str(folder)})
    named_base = config.model_name_or_path and Path(config.model_name_or_path) != folder
    base = config.model_name_or_path if named_base else record.get("base_model")
    method = get_method(record["finetuning_type"])
    bundle = load_base(config, base)
    if record.get("vocabulary"):  # trained with an extended vocabulary: that tokenizer, and rows for its tokens
        tokenizer = tokenizer_for_output(folder, bundle.tokenizer, record["vocabulary"])
        resize_for_tokenizer(bundle.model, bundle.tokenizer, tokenizer)
        bundle.tokenizer = tokenizer
    bundle.model = method.load(bundle.model, folder, trained_config)
    bundle.template = get_template(trained_config.template, bundle.tokenizer)
    bundle.base_model = base
    bundle.trained_config = trained_config
    logger.info("loaded %s weights from %s", method.name, folder)
    return bundle
