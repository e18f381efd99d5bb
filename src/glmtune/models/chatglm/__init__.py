"""Native ChatGLM-6B (GLM v1) and ChatGLM2/3-6B (GLM v2) models and tokenizers in plain PyTorch.

They load the original THUDM checkpoint folders as they are and reproduce the original code's outputs
(logits, losses, greedy generations, masks, positions, tokenization) without remote code.
"""

from .common import ChatGLMOutput, GenerationOutput
from .loading import chatglm_version, enable_ptuning, is_chatglm_config, load_chatglm_model, read_state_dict
from .modeling_v1 import ChatGLMConfig, ChatGLMForConditionalGeneration
from .modeling_v2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from .preprocessing import build_generation_inputs, build_train_example
from .tokenization import ChatGLM2Tokenizer, ChatGLMTokenizer, load_chatglm_tokenizer

__all__ = [
    "ChatGLM2Config",
    "ChatGLM2ForConditionalGeneration",
    "ChatGLM2Tokenizer",
    "ChatGLMConfig",
    "ChatGLMForConditionalGeneration",
    "ChatGLMOutput",
    "ChatGLMTokenizer",
    "GenerationOutput",
    "build_generation_inputs",
    "build_train_example",
    "chatglm_version",
    "enable_ptuning",
    "is_chatglm_config",
    "load_chatglm_model",
    "load_chatglm_tokenizer",
    "read_state_dict",
]
