"""glmtune.memory.estimate_memory against counted bytes, CPU allocations and the H200 baseline measurements."""

from __future__ import annotations

import json
import sys
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from glmtune.config import GlmtuneConfig
from glmtune.memory import estimate_for, estimate_memory, format_estimate
from glmtune.methods import get_method
from glmtune.models.chatglm import ChatGLMConfig
from glmtune.models.loading import load_model
from glmtune.models.quantization import QuantizedEmbedding, QuantizedLinear
from glmtune.train.trainer import _loss, enable_gradient_checkpointing

sys.path.insert(0, str(Path(__file__).parent / "chatglm"))
from _chatglm_reference import AVAILABLE as CHATGLM_AVAILABLE, SKIP_REASON, write_model_folder  # noqa: E402

BASELINE = Path(__file__).resolve().parents[1].parent / "shared" / "bench" / "baseline_h200.json"


class AllocationTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages that ops create inside the region (any device, CPU included)."""

    def __init__(self):
        super().__init__()
        self.live = WeakIdKeyDictionary()
        self.current = self.peak = 0

    def _free(self, size: int) -> None:
        self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor):
                continue
            storage = tensor.untyped_storage()
            if storage.data_ptr() in inputs or storage in self.live or not storage.nbytes():
                continue  # a view or an in-place result: no new memory
            self.live[storage] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, storage.nbytes())
        return out


def frozen_bytes(model: torch.nn.Module) -> int:
    parameters = sum(p.nbytes for p in model.parameters() if not p.requires_grad)
    quantized = (QuantizedLinear, QuantizedEmbedding)
    return parameters + sum(m.weight.nbytes + m.weight_scale.nbytes for m in model.modules() if isinstance(m, quantized))


def apply_method(model: torch.nn.Module, method: str, pre_seq_len: int):
    method_object = get_method(method)
    config = GlmtuneConfig(finetuning_type=method, pre_seq_len=pre_seq_len if method == "ptuning" else None, lora_dropout=0.05)
    return method_object.apply(model, config), method_object


def prepared(folder: Path, method: str, bits: int | None):
    return apply_method(load_model(str(folder), dtype="float32", device="cpu", quantization_bit=bits), method, 8)


@pytest.mark.parametrize("bits, method", [(None, "lora"), (8, "ptuning"), (8, "freeze"), (4, "lora"), (4, "ptuning")])
def test_weight_term_is_the_loaded_models_bytes(tiny_model, bits, method):
    model, method_object = prepared(tiny_model, method, bits)
    estimate = estimate_memory(tiny_model, method, bits, pre_seq_len=8, dtype="float32", device="cpu")
    assert estimate["weights"] == frozen_bytes(model)
    assert estimate["trainable_parameters"] == sum(p.numel() for p in method_object.trainable_parameters(model).values())


def test_estimate_for_the_train_flags(tiny_llama):
    config = GlmtuneConfig(model_name_or_path=str(tiny_llama), quantization_bit=4, pre_seq_len=16, per_device_train_batch_size=8,
                           max_source_length=32, max_target_length=48, gradient_checkpointing=True)
    expected = estimate_memory(tiny_llama, "ptuning", 4, batch_size=8, source_length=32, target_length=48, pre_seq_len=16,
                               gradient_checkpointing=True)
    assert estimate_for(config) == expected
    assert format_estimate(expected).splitlines()[-1].startswith("expected peak")


@pytest.mark.skipif(not CHATGLM_AVAILABLE, reason=SKIP_REASON)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("bits", [8, 4])
def test_weight_term_on_native_chatglm(tmp_path, version, bits):
    folder = write_model_folder(tmp_path / version, version, prefix=None)
    model, _ = prepared(folder, "ptuning", bits)
    assert estimate_memory(folder, "ptuning", bits, pre_seq_len=8, dtype="float32", device="cpu")["weights"] == frozen_bytes(model)


def test_chatglm_6b_weights_by_hand():
    layer_linears = 28 * 4096 * (3 * 4096 + 4096 + 2 * 16384)  # query_key_value, dense, the two MLP linears
    rows = 28 * (3 * 4096 + 4096 + 16384 + 4096)
    vocabulary = 2 * 130528 * 4096  # word embeddings and lm_head
    rest = 28 * (4 * 4096 + 3 * 4096 + 4096 + 16384 + 4096) + 2 * 4096  # norms, biases
    int8_vocabulary = vocabulary + 4 * 2 * 130528  # int8 and a float32 scale per row
    expected = {
        (None, True): 2 * (layer_linears + vocabulary + rest),
        (8, True): layer_linears + 4 * rows + int8_vocabulary + 2 * rest,
        (4, True): layer_linears // 2 + 2 * layer_linears // 64 + int8_vocabulary + 2 * rest,  # bf16 group scales
        (4, False): layer_linears // 2 + 2 * layer_linears // 64 + 2 * (vocabulary + rest),
    }
    for (bits, embeddings), weights in expected.items():
        assert estimate_memory(ChatGLMConfig(), "lora", bits, quantize_embeddings=embeddings)["weights"] == weights
    assert round(expected[4, True] / 2**30, 2) == 3.79
    float32_base = layer_linears // 2 + 4 * layer_linears // 64 + int8_vocabulary + 4 * rest  # float32 group scales
    assert estimate_memory(ChatGLMConfig(), "lora", 4, dtype="float32")["weights"] == float32_base


def measure_training_step(folder: Path, method: str, checkpointing: bool, batch: int, length: int) -> int:
    """Bytes allocated at the peak of one bf16 training step of glmtune's loss (optimizer state already created)."""
    model = load_model(str(folder), dtype="bfloat16", device="cpu", quantization_bit=4)
    model, method_object = apply_method(model, method, 16)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW(method_object.trainable_parameters(model).values(), lr=1e-4)
    ids = torch.randint(5, 250, (batch, length), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, : length // 2] = -100

    def step() -> None:
        loss = _loss(model, {"input_ids": ids, "labels": labels}, torch.autocast("cpu", dtype=torch.bfloat16))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with AllocationTracker() as tracker:
        step()
    return tracker.peak


@pytest.fixture(scope="module")
def activation_heavy_llama(tmp_path_factory) -> Path:
    """Six layers of width 256 and a 256-token vocabulary: activations, not logits, dominate the step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=256, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("llama-activations")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "grad-ckpt"])
@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_peak_matches_cpu_allocations(activation_heavy_llama, method, checkpointing):
    measured = measure_training_step(activation_heavy_llama, method, checkpointing, batch=4, length=64)
    estimate = estimate_memory(activation_heavy_llama, method, 4, batch_size=4, source_length=32, target_length=32,
                               pre_seq_len=16, gradient_checkpointing=checkpointing, device="cpu")
    # The tracker sees what the step allocates: everything but the weights, the float32 trainable
    # parameters and AdamW's moments (4·T + 8·T), which exist before it.
    predicted = estimate["peak"] - estimate["weights"] - 12 * estimate["trainable_parameters"]
    # Measured: 0.88-1.03 without checkpointing; with it the estimate runs 13-30% high (when a layer's
    # recomputation meets its gradients varies), which errs on the side of fitting.
    assert 0.8 < predicted / measured < (1.35 if checkpointing else 1.15), (predicted, measured)


@pytest.mark.skipif(not BASELINE.is_file(), reason=f"{BASELINE} not found")
def test_peak_matches_the_h200_baseline():
    """../shared/bench measured a 7.66B Llama-shaped model (bf16, LoRA r8 on q,v, dropout 0.1, 128 tokens) on an H200."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from common import proxy_config

    runs = json.loads(BASELINE.read_text())["configs"]
    config = proxy_config(tiny=False).to_dict()
    settings = {"A": dict(method="lora"), "B": dict(method="lora", gradient_checkpointing=True),
                "D": dict(method="lora", batch_size=16), "C0": dict(method="ptuning"),
                "C": dict(method="ptuning", prefix_projection=True)}
    for name, kwargs in settings.items():
        estimate = estimate_memory(config, lora_target="q_proj,v_proj", lora_dropout=0.1, label_only_loss=False,  # HF Trainer's loss
                                   **{"batch_size": 1, **kwargs})
        measured = runs[name]["peak_alloc_gib"]
        assert abs(estimate["peak"] / 2**30 / measured - 1) < 0.05, (name, estimate["peak"] / 2**30, measured)
