"""A merged transformers model as a GGUF file for llama.cpp, Ollama and GPT4All.

Names, metadata keys and value transforms follow llama.cpp's ``convert_hf_to_gguf.py`` (through the
``gguf`` package's tensor map): Llama's Q/K rows are permuted into llama.cpp's rotary layout, Gemma 3's
RMSNorm weights are stored plus one (llama.cpp multiplies by the weight, transformers by 1 + weight),
a tied output matrix is left out. transformers' GGUF loader undoes exactly these, so a file read back
with ``from_pretrained(folder, gguf_file=...)`` gives the merged model's logits.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from glmtune.errors import GlmtuneError
from glmtune.export.gguf_vocab import add_vocabulary

ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3_text": gguf.MODEL_ARCH.GEMMA3}
Q = gguf.GGMLQuantizationType
FILE_TYPES = {  # --gguf-type: (type of matrices, general.file_type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
AUTO_TYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
# llama.cpp's Gemma 3 hard-codes these: a full-attention layer every 6th, local RoPE base 10000.
GEMMA3_PATTERN, GEMMA3_LOCAL_ROPE = 6, 10000.0


def _rope(config, layer_type: str | None = None) -> dict:
    parameters = getattr(config, "rope_parameters", None) or {}
    if layer_type in parameters:
        parameters = parameters[layer_type]
    return {"rope_type": parameters.get("rope_type", "default"),
            "rope_theta": parameters.get("rope_theta", getattr(config, "rope_theta", 10000.0))}


def _refuse(config, problem: str) -> None:
    raise GlmtuneError(f"--gguf: this {config.model_type} model {problem}, which llama.cpp's "
                       f"{config.model_type} cannot express")


def check_supported(config) -> gguf.MODEL_ARCH:
    if config.model_type not in ARCHITECTURES:
        raise GlmtuneError(f"--gguf supports {', '.join(ARCHITECTURES)} models, not {config.model_type}; "
                           "export without --gguf")
    if config.model_type == "llama":
        if _rope(config)["rope_type"] != "default":
            _refuse(config, f"uses {_rope(config)['rope_type']} RoPE scaling")
        if config.attention_bias or config.mlp_bias or config.hidden_act != "silu":
            _refuse(config, "has biases or a non-SiLU activation")
    else:
        layers = config.num_hidden_layers
        expected = ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0 else "sliding_attention" for i in range(layers)]
        if list(config.layer_types) != expected:
            _refuse(config, "does not have a full-attention layer every 6th layer")
        if _rope(config, "sliding_attention") != {"rope_type": "default", "rope_theta": GEMMA3_LOCAL_ROPE} \
                or _rope(config, "full_attention")["rope_type"] != "default":
            _refuse(config, "uses RoPE settings other than Gemma 3 text's")
        if config.query_pre_attn_scalar != config.head_dim or config.final_logit_softcapping \
                or config.attn_logit_softcapping or getattr(config, "use_bidirectional_attention", False):
            _refuse(config, "scales or caps attention differently from Gemma 3 270M/1B")
    return ARCHITECTURES[config.model_type]


def _hyperparameters(writer: gguf.GGUFWriter, config, arch: gguf.MODEL_ARCH) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(_rope(config)["rope_theta"])
    else:
        writer.add_rope_freq_base(_rope(config, "full_attention")["rope_theta"])  # the global layers' base
        writer.add_sliding_window(config.sliding_window)


def _llama_cpp_rotary(weights: torch.Tensor, heads: int) -> torch.Tensor:
    """Interleave each head's two rotary halves, as llama.cpp's converter does for Llama."""
    halves = weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
    return halves.swapaxes(1, 2).reshape(weights.shape)


def gguf_tensors(model: nn.Module, arch: gguf.MODEL_ARCH) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every weight the file stores."""
    config = model.config
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    result = []
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem, _, suffix = name.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            raise GlmtuneError(f"--gguf: no llama.cpp name for the tensor {name}")
        tensor = tensor.detach().float().cpu()
        if arch == gguf.MODEL_ARCH.LLAMA and stem.endswith("self_attn.q_proj"):
            tensor = _llama_cpp_rotary(tensor, config.num_attention_heads)
        elif arch == gguf.MODEL_ARCH.LLAMA and stem.endswith("self_attn.k_proj"):
            tensor = _llama_cpp_rotary(tensor, config.num_key_value_heads)
        elif arch == gguf.MODEL_ARCH.GEMMA3 and stem.endswith("norm"):
            tensor = tensor + 1
        result.append((f"{mapped}.{suffix}", tensor))
    return result


def _stored_type(tensor: torch.Tensor, matrix_type: Q) -> Q:
    """1-D tensors stay F32, and Q8_0 needs rows in whole blocks of 32, as in llama.cpp."""
    if tensor.dim() < 2:
        return Q.F32
    if matrix_type == Q.Q8_0 and tensor.shape[-1] % 32:
        return Q.F16
    return matrix_type


def write_gguf(model: nn.Module, tokenizer, path: Path, file_type: str = "auto", name: str | None = None) -> Path:
    """Write ``model`` (a plain transformers causal LM) and its tokenizer to ``path``."""
    arch = check_supported(model.config)
    if file_type == "auto":
        file_type = AUTO_TYPES.get(next(model.parameters()).dtype, "f16")
    if file_type not in FILE_TYPES:
        raise GlmtuneError(f"--gguf-type must be auto or one of {', '.join(FILE_TYPES)}, not {file_type}")
    matrix_type, llama_file_type = FILE_TYPES[file_type]
    config = model.config
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name or Path(path).stem)
    _hyperparameters(writer, config, arch)
    writer.add_file_type(llama_file_type)
    add_vocabulary(writer, tokenizer, config.vocab_size, spaces_as_text=arch == gguf.MODEL_ARCH.GEMMA3)
    for tensor_name, tensor in gguf_tensors(model, arch):
        stored = _stored_type(tensor, matrix_type)
        writer.add_tensor(tensor_name, gguf.quants.quantize(tensor.numpy().astype(np.float32), stored), raw_dtype=stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
