"""``glmtune export``: a trained model as files other tools load.

LoRA adapters are merged into the weights (PEFT ``merge_and_unload``); freeze and full checkpoints
already are the weights. Either way the result is a safetensors transformers folder with the tokenizer,
which ``AutoModelForCausalLM.from_pretrained`` loads without glmtune, plus optionally a GGUF file.
A P-Tuning v2 prefix cannot be merged into weights: its export is a self-contained glmtune folder.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods.ptuning import PTuningMethod, PrefixTuningModel
from glmtune.models.introspect import parameter_dtype
from glmtune.files import read_run_record, write_run_record
from glmtune.methods.loading import ModelBundle, load_for_inference, trained_weights_folder

logger = logging.getLogger(__name__)

PTUNING_BASE = "base"


def run_export(config: GlmtuneConfig, output: str, gguf: bool = False, gguf_type: str = "auto") -> Path:
    """Write the model the config names (base plus trained weights) to ``output``; returns the folder."""
    final = Path(output).resolve()
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise GlmtuneError(f"--output {output} exists and is not an empty folder")
    bundle = load_for_inference(config)
    if getattr(bundle.model.config, "model_type", None) == "chatglm":
        raise GlmtuneError("exporting native ChatGLM models is not supported yet")
    temporary = final.with_name(final.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    if isinstance(bundle.model, PrefixTuningModel):
        if gguf:
            raise GlmtuneError("a P-Tuning v2 prefix cannot be merged into the weights, so it has no GGUF form; "
                               "export without --gguf")
        _write_ptuning_folder(bundle, trained_weights_folder(config), temporary, final)
    else:
        model = merged_model(bundle.model)
        model.save_pretrained(temporary)
        bundle.tokenizer.save_pretrained(temporary)
        if gguf:
            from glmtune.export.to_gguf import write_gguf

            write_gguf(model, bundle.tokenizer, temporary / f"{final.name}.gguf", gguf_type, name=final.name)
    if final.exists():
        final.rmdir()
    temporary.rename(final)
    logger.info("exported to %s", final)
    return final


def merged_model(model: nn.Module) -> nn.Module:
    """A plain transformers model: LoRA merged in, every weight in the model's main dtype."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # Freeze/full training upcasts the trained tensors to float32; a saved model has one dtype.
    return model.to(parameter_dtype(model))


def _write_ptuning_folder(bundle: ModelBundle, trained: Path, temporary: Path, final: Path) -> None:
    """base/ (the base model and tokenizer), the prefix encoder and a glmtune.json pointing at base/.

    glmtune loads it as ``--model_name_or_path FOLDER``; after moving the folder, name both parts:
    ``--model_name_or_path FOLDER/base --adapter_name_or_path FOLDER``.
    """
    bundle.model.base_model.save_pretrained(temporary / PTUNING_BASE)
    bundle.tokenizer.save_pretrained(temporary / PTUNING_BASE)
    PTuningMethod().save(bundle.model, temporary)
    record = read_run_record(trained)
    record.update(base_model=str(final / PTUNING_BASE), exported_from=str(trained.resolve()))
    write_run_record(temporary, record)
