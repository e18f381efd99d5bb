"""Config detection, checkpoint loading and P-Tuning v2 set-up for the ChatGLM models."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .modeling_v1 import ChatGLMConfig, ChatGLMForConditionalGeneration
from .modeling_v2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration

ChatGLMModelType = ChatGLMForConditionalGeneration | ChatGLM2ForConditionalGeneration

PREFIX_KEY = "transformer.prefix_encoder."
_V2_KEYS = ("multi_query_group_num", "padded_vocab_size", "kv_channels", "ffn_hidden_size")
_V1_KEYS = ("inner_hidden_size", "position_encoding_2d", "gmask_token_id")


def is_chatglm_config(config_dict: dict) -> bool:
    """True for a ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B `config.json`."""
    if config_dict.get("model_type") == "chatglm":
        return True
    return any(name.startswith("ChatGLM") for name in config_dict.get("architectures") or [])


def chatglm_version(config_dict: dict) -> int:
    """1 for ChatGLM-6B (GLM v1), 2 for ChatGLM2/3-6B (GLM v2), told apart by architecture keys."""
    if any(key in config_dict for key in _V2_KEYS):
        return 2
    if any(key in config_dict for key in _V1_KEYS):
        return 1
    raise ValueError("not a ChatGLM v1/v2 config: none of the distinguishing keys is present")


def _weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin (or shards with an index) in {folder}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a weight file, or of a folder's safetensors / .bin files (shards and index files)."""
    path = Path(path)
    state: dict[str, torch.Tensor] = {}
    for file in _weight_files(path) if path.is_dir() else [path]:
        if file.suffix == ".safetensors":
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True, mmap=True))
    return state


def _prefix_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`transformer.prefix_encoder.*` tensors, also when saved under a wrapper prefix (e.g. `module.`)."""
    found = {}
    for key, value in state.items():
        at = key.find(PREFIX_KEY)
        if at >= 0:
            found[key[at:]] = value
    return found


def _prefix_settings(prefix_state: dict[str, torch.Tensor], hidden_size: int) -> dict:
    embedding = prefix_state[PREFIX_KEY + "embedding.weight"]
    projection_key = PREFIX_KEY + "trans.0.weight"
    settings = {"pre_seq_len": embedding.shape[0], "prefix_projection": projection_key in prefix_state}
    if settings["prefix_projection"] and prefix_state[projection_key].shape[0] != hidden_size:
        settings["prefix_hidden_size"] = prefix_state[projection_key].shape[0]
    return settings


def load_chatglm_model(
    path: str | Path,
    dtype: torch.dtype | None = None,
    prefix_checkpoint: str | Path | None = None,
) -> ChatGLMModelType:
    """Load an original ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B folder (config.json + weights).

    `dtype=None` keeps the checkpoint's dtype. A prefix encoder is built when the config has
    `pre_seq_len` or prefix weights are found, in the folder or in `prefix_checkpoint` (a seed-style
    P-Tuning checkpoint file/folder holding only `transformer.prefix_encoder.*`); its size is read from
    those weights. The prefix encoder is kept in float32, as the original P-Tuning scripts do.
    Returns the model in eval mode.
    """
    path = Path(path)
    config_dict = json.loads((path / "config.json").read_text())
    if not is_chatglm_config(config_dict):
        raise ValueError(f"{path} is not a ChatGLM model folder")
    version = chatglm_version(config_dict)
    if version == 1:
        config_cls, model_cls = ChatGLMConfig, ChatGLMForConditionalGeneration
    else:
        config_cls, model_cls = ChatGLM2Config, ChatGLM2ForConditionalGeneration

    base_state = read_state_dict(path)
    prefix_state = _prefix_weights(read_state_dict(prefix_checkpoint) if prefix_checkpoint is not None else base_state)
    state = {k: v for k, v in base_state.items() if not k.endswith(".inv_freq") and PREFIX_KEY not in k}
    if prefix_checkpoint is not None and not prefix_state:
        raise ValueError(f"no {PREFIX_KEY}* weights in {prefix_checkpoint}")
    if prefix_state:
        settings = _prefix_settings(prefix_state, config_dict["hidden_size"])
        if config_dict.get("pre_seq_len") not in (None, settings["pre_seq_len"]):
            raise ValueError(
                f"config pre_seq_len={config_dict['pre_seq_len']} but the prefix weights have {settings['pre_seq_len']}"
            )
        config_dict.update(settings)
    config = config_cls(**config_dict)

    if dtype is None:
        dtype = next(v.dtype for v in state.values() if v.is_floating_point())
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    state.update({k: v.to(torch.float32) for k, v in prefix_state.items()})

    with torch.device("meta"):
        model = model_cls(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"unexpected weights in {path}: {unexpected}")
    if version == 1 and "lm_head.weight" in missing:
        # A checkpoint without lm_head has it tied to the word embeddings; a copy keeps saving simple.
        model.lm_head.weight = nn.Parameter(model.transformer.word_embeddings.weight.detach().clone())
        missing.remove("lm_head.weight")
    missing_prefix = [k for k in missing if k.startswith(PREFIX_KEY)]
    if len(missing_prefix) != len(missing):
        raise ValueError(f"weights missing from {path}: {[k for k in missing if not k.startswith(PREFIX_KEY)]}")
    if missing_prefix:
        warnings.warn(f"pre_seq_len={config.pre_seq_len} but no prefix weights found: new prefix encoder", stacklevel=2)
        model.add_prefix_encoder()
    return model.eval()


def enable_ptuning(
    model: ChatGLMModelType,
    pre_seq_len: int,
    prefix_projection: bool = False,
    prefix_hidden_size: int | None = None,
) -> None:
    """Add a fresh P-Tuning v2 prefix encoder (original form, float32) and train only it.

    Updates `model.config` (`pre_seq_len`, `prefix_projection`, `prefix_hidden_size` = width of the
    projection MLP, default hidden_size) and freezes every parameter outside `transformer.prefix_encoder`.
    """
    if not isinstance(model, (ChatGLMForConditionalGeneration, ChatGLM2ForConditionalGeneration)):
        raise TypeError(f"enable_ptuning needs a ChatGLM model, got {type(model).__name__}")
    model.config.pre_seq_len = pre_seq_len
    model.config.prefix_projection = prefix_projection
    model.config.prefix_hidden_size = prefix_hidden_size
    model.add_prefix_encoder()
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith(PREFIX_KEY)
