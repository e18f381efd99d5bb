"""--quantization_bit 4/8: accuracy of the quantized base, training on it, checkpoints across bases, the jobs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.methods import get_method
from glmtune.models.loading import load_model
from glmtune.models import quantization
from glmtune.models.quantization import (
    GROUP_SIZE,
    NF4_LEVELS,
    QuantizedEmbedding,
    QuantizedLinear,
    dequantize,
    dequantize_weight,
    group_size,
    is_quantized,
    quantize_weight,
    vocabulary_modules,
)
from glmtune.methods.loading import load_for_inference
from glmtune.recipes.train import run_train
from glmtune.train.trainer import enable_gradient_checkpointing

sys.path.insert(0, str(Path(__file__).parent / "chatglm"))
from _chatglm_reference import AVAILABLE as CHATGLM_AVAILABLE, SKIP_REASON, reference, write_model_folder  # noqa: E402

# The largest rounding error, as a fraction of the absmax of a weight's row (8 bits) or group (4 bits):
# half a step of 1/127, or half the widest gap between neighbouring NF4 levels (-1.0 .. -0.696).
HALF_STEP = {8: 0.5 / 127, 4: max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2}


def quantized_linears(model: nn.Module) -> dict[str, QuantizedLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantized_modules(model: nn.Module) -> dict[str, QuantizedLinear | QuantizedEmbedding]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedEmbedding))}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def sample_ids(model: nn.Module, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(4, model.config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("bits", [8, 4])
def test_rounding_error_is_at_most_half_a_step(bits):
    weight = torch.randn(48, 3 * GROUP_SIZE)
    codes, scale = quantize_weight(weight, bits)
    restored = dequantize_weight(codes, scale, bits, torch.float32)
    groups = weight.view(48, -1, GROUP_SIZE if bits == 4 else weight.shape[1])
    error = (restored - weight).abs().view_as(groups)
    assert (error <= HALF_STEP[bits] * groups.abs().amax(-1, keepdim=True) * (1 + 1e-5)).all()
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8) and codes.numel() == weight.numel() * bits // 8


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_logits_are_close_to_full_precision(tiny_model, bits):
    full = load_model(str(tiny_model), dtype="float32", device="cpu")
    quantized = load_model(str(tiny_model), dtype="float32", device="cpu", quantization_bit=bits)
    ids = sample_ids(full)
    with torch.no_grad():
        expected, actual = full(input_ids=ids).logits, quantized(input_ids=ids).logits
    modules = quantized_modules(quantized)
    originals = {name: full.get_submodule(name).weight for name in modules}
    # The layers' linears at `bits`; the untied vocabulary matrices (the Llama's, not Gemma's tied and
    # scaled one) at 8 bits.
    vocabulary = vocabulary_modules(full)
    assert len(vocabulary) == (2 if tiny_model.name.startswith("llama") else 0) and set(vocabulary) <= set(modules)
    assert all(getattr(m, "bits", 8) == (8 if n in vocabulary else bits) for n, m in modules.items())
    squared_error = sum((m.dequantize(torch.float32) - originals[n]).pow(2).sum() for n, m in modules.items())
    squared_norm = sum(w.pow(2).sum() for w in originals.values())
    weight_error = (squared_error / squared_norm).sqrt().item()
    # Each weight moves by at most HALF_STEP times the absmax of its row (8 bits) or group (4 bits), so
    # the weights' relative error is at most sqrt(sum over weights of (HALF_STEP * absmax)^2 / |W|^2).
    squared_bound = 0.0
    for name, module in modules.items():
        weight, module_bits = originals[name], getattr(module, "bits", 8)
        group = group_size(weight.shape[1]) if module_bits == 4 else weight.shape[1]
        absmax = weight.view(weight.shape[0], -1, group).abs().amax(-1)
        squared_bound += (HALF_STEP[module_bits] * absmax).pow(2).sum().item() * group
    assert weight_error <= (squared_bound / squared_norm.item()) ** 0.5
    # To first order each linear's output moves by the weights' relative error; the errors of the dozen
    # linears of two layers add up and the norms amplify them a little: measured 1.0-2.9x the weight
    # error on the tiny Llama, Gemma and ChatGLM models (8 bits: ~1% of the logits, 4 bits: 9-24%).
    assert relative_error(actual, expected) <= 4 * weight_error
    # The forward computes exactly with the dequantized weights: no error beyond the rounding.
    with torch.no_grad():
        assert torch.allclose(dequantize(quantized)(input_ids=ids).logits, actual, atol=1e-5)
    assert not is_quantized(quantized)


def test_vocabulary_quantization_can_be_turned_off(tiny_llama):
    model = load_model(str(tiny_llama), dtype="float32", device="cpu", quantization_bit=4, quantize_embeddings=False)
    assert type(model.get_input_embeddings()) is nn.Embedding and type(model.get_output_embeddings()) is nn.Linear
    assert all(m.bits == 4 for m in quantized_modules(model).values())


def test_lm_head_in_row_slices_equals_one_matmul(tiny_llama, monkeypatch):
    """A weight bigger than CHUNK_ELEMENTS is dequantized and multiplied a slice at a time: same outputs and gradients."""
    model = load_model(str(tiny_llama), dtype="float32", device="cpu", quantization_bit=4)
    head = model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.bits == 8
    x = torch.randn(2, 5, head.in_features)
    results = []
    for chunk in (head.in_features * head.out_features, head.in_features * 7):  # one slice; slices of 7 rows
        monkeypatch.setattr(quantization, "CHUNK_ELEMENTS", chunk)
        assert len(head.row_slices()) == (1 if chunk > head.in_features * 7 else -(-head.out_features // 7))
        leaf = x.clone().requires_grad_()
        output = head(leaf)
        output.pow(2).sum().backward()
        results.append((output.detach(), leaf.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1])
    torch.testing.assert_close(results[0][0], x @ head.dequantize(torch.float32).T)


@pytest.mark.parametrize("bits", [8, 4])
def test_compiled_dequantization_equals_eager(bits):
    """On CUDA the dequantization runs compiled (``_dequantizer``); the compiled function computes the same weights."""
    weight = torch.randn(24, 2 * GROUP_SIZE, dtype=torch.bfloat16)
    codes, scale = quantize_weight(weight, bits)
    pairs = quantization.nf4_pairs() if bits == 4 else None
    eager = dequantize_weight(codes, scale, bits, torch.bfloat16, pairs)
    try:
        compiled = quantization._compiled_dequantize_weight()(codes, scale, bits, torch.bfloat16, pairs)
    except Exception as error:  # inductor on CPU needs a C++ compiler
        pytest.skip(f"torch.compile does not run here: {type(error).__name__}")
    # Inductor rounds to bf16 once (level x scale in float32); eager rounds the level and the scale first.
    # Both stay within a bf16 step of the exact float32 dequantization.
    exact = dequantize_weight(codes, scale, bits, torch.float32)
    for weights in (compiled, eager):
        torch.testing.assert_close(weights.float(), exact, rtol=2**-7, atol=0)
    assert (compiled.float() - exact).abs().sum() <= (eager.float() - exact).abs().sum()


def train_steps(model: nn.Module, method_name: str, checkpointing: bool, steps: int, learning_rate: float):
    method = get_method(method_name)
    model = method.apply(model, GlmtuneConfig(finetuning_type=method_name, pre_seq_len=4, lora_dropout=0.0))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    trainable = method.trainable_parameters(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=learning_rate)
    ids = sample_ids(model, batch=4, length=16)
    losses, without_gradient = [], None
    for step in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        loss.backward()
        if step == 1:  # LoRA's B starts at zero, so A gets its first gradient in the second step
            without_gradient = [n for n, p in trainable.items() if p.grad is None or not p.grad.abs().sum()]
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return model, losses, without_gradient


LEARNING_RATE = {"lora": 3e-2, "ptuning": 1e-1, "freeze": 3e-2}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "grad-ckpt"])
@pytest.mark.parametrize("bits, method", [(8, "lora"), (4, "lora"), (8, "ptuning"), (4, "ptuning"), (4, "freeze")])
def test_training_on_a_quantized_base(tiny_llama, bits, method, checkpointing):
    model = load_model(str(tiny_llama), dtype="float32", device="cpu", quantization_bit=bits)
    # bitsandbytes on CPU repacks weights on an eval-mode forward and then stops gradients; ours must not.
    model.eval()
    with torch.no_grad():
        model.generate(sample_ids(model, 1, 8), max_new_tokens=3, do_sample=False)
    codes_before = {id(m): m.weight.clone() for m in quantized_linears(model).values()}
    model, losses, without_gradient = train_steps(model, method, checkpointing, steps=8, learning_rate=LEARNING_RATE[method])
    assert losses[-1] < losses[0] - 0.05, losses
    assert without_gradient == []
    remaining = quantized_linears(model).values()  # freeze trains its layers' MLPs unquantized
    assert remaining and all(torch.equal(m.weight, codes_before[id(m)]) for m in remaining)
    assert not any(p.requires_grad for m in remaining for p in m.parameters())


def test_full_finetuning_refuses_a_quantized_base(tiny_llama):
    model = load_model(str(tiny_llama), dtype="float32", device="cpu", quantization_bit=4)
    with pytest.raises(GlmtuneError, match="full trains every weight"):
        get_method("full").apply(model, GlmtuneConfig(finetuning_type="full"))


def test_full_weights_loaded_onto_a_quantized_base_are_quantized(tiny_llama):
    full = load_model(str(tiny_llama), dtype="float32", device="cpu")
    quantized = load_model(str(tiny_llama), dtype="float32", device="cpu", quantization_bit=8)
    with torch.no_grad():
        for parameter in full.parameters():
            parameter.mul_(1.5)
    quantized.load_state_dict(full.state_dict())
    ids = sample_ids(full)
    with torch.no_grad():
        assert relative_error(quantized(input_ids=ids).logits, full(input_ids=ids).logits) < 0.05


def train_config(model: Path, data: Path, output: Path, method: str, bits: int | None, **extra) -> GlmtuneConfig:
    return GlmtuneConfig(
        model_name_or_path=str(model), train_file=str(data), output_dir=str(output), finetuning_type=method,
        quantization_bit=bits, pre_seq_len=4 if method == "ptuning" else None, max_steps=6, save_steps=3,
        logging_steps=1, learning_rate=3e-2, per_device_train_batch_size=4, max_source_length=16,
        max_target_length=16, max_train_samples=8, report_to="none", torch_dtype="float32", lora_target="auto", **extra,
    )


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_checkpoint_trained_quantized_loads_onto_either_base(tiny_llama, demo_train_file, tmp_path, method):
    output = tmp_path / "out"
    result = run_train(train_config(tiny_llama, demo_train_file, output, method, bits=8))
    assert result.losses[-1] < result.losses[0]
    saved = {p.name for p in output.iterdir()}
    assert not saved & {"model.safetensors", "trainable_params.safetensors"}  # only the method's own tensors
    logits = {}
    for bits in (8, None):
        bundle = load_for_inference(GlmtuneConfig(model_name_or_path=str(output), quantization_bit=bits))
        assert any(isinstance(m, QuantizedLinear) for m in bundle.model.modules()) == bool(bits)
        with torch.no_grad():
            logits[bits] = bundle.model(input_ids=sample_ids(bundle.model)).logits
    # The trained tensors are the same on both bases; only the base's 8-bit rounding separates the
    # outputs, which moves these models' logits by about 1% (test_quantized_logits_are_close_...).
    assert relative_error(logits[8], logits[None]) < 0.05


@pytest.mark.parametrize("method", ["lora", "ptuning"])
@pytest.mark.parametrize("bits", [4, 8])
def test_train_job_on_a_transformers_folder(tiny_llama, demo_train_file, tmp_path, method, bits):
    output = tmp_path / "out"
    result = run_train(train_config(tiny_llama, demo_train_file, output, method, bits, gradient_checkpointing=True))
    assert result.losses[-1] < result.losses[0], result.losses
    assert json.loads((output / "glmtune.json").read_text())["config"]["quantization_bit"] == bits


@pytest.mark.skipif(not CHATGLM_AVAILABLE, reason=SKIP_REASON)
@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_train_job_on_a_native_chatglm_folder(tmp_path, version, method):
    folder = write_model_folder(tmp_path / f"chatglm-{version}", version, prefix=None)
    model_file = {"v1": "ice_text.model", "v2": "tokenizer.model"}[version]
    (folder / model_file).write_bytes(reference(version).sp_model.read_bytes())
    data = tmp_path / "train.json"
    records = [{"content": "类型#上衣*颜色#白色", "summary": "这款上衣干净百搭"}, {"content": "hello world", "summary": "the quick brown fox"}]
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records * 2), encoding="utf-8")
    output = tmp_path / "out"
    result = run_train(train_config(folder, data, output, method, 4, gradient_checkpointing=True))
    assert result.losses[-1] < result.losses[0], result.losses
    bundle = load_for_inference(GlmtuneConfig(model_name_or_path=str(output), quantization_bit=4))
    assert any(isinstance(m, QuantizedLinear) for m in bundle.model.modules())
