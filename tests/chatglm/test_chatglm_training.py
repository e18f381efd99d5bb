"""Loading variants, save/reload, P-Tuning v2 set-up, gradient checkpointing, LoRA and short training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from _chatglm_reference import forward_inputs, reference, requires_reference, write_model_folder
from glmtune.models.chatglm import (
    chatglm_version,
    enable_ptuning,
    is_chatglm_config,
    load_chatglm_model,
)

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}
pytestmark = requires_reference


def _logits(model, ref, case) -> torch.Tensor:
    with torch.no_grad():
        return model(**forward_inputs(ref, case), use_cache=False).logits


def _train_batch(version: str) -> dict[str, torch.Tensor]:
    ref = reference(version)
    case = ref.cases["base.train_loss"]
    return {"input_ids": ref.tensor(case, "input_ids"), "labels": ref.tensor(case, "labels")}


def test_config_detection():
    assert is_chatglm_config(reference("v1").config) and is_chatglm_config(reference("v2").config)
    assert chatglm_version(reference("v1").config) == 1
    assert chatglm_version(reference("v2").config) == 2
    assert not is_chatglm_config({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_save_pretrained_roundtrip(reference_model, tmp_path, version):
    ref = reference(version)
    case = ref.cases["ptuning_proj.single"]
    model = reference_model(version, "ptuning_proj")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert chatglm_version(saved) == chatglm_version(ref.config)
    assert (saved["pre_seq_len"], saved["prefix_projection"]) == (4, True)

    reloaded = load_chatglm_model(tmp_path)
    assert type(reloaded) is type(model)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(_logits(reloaded, ref, case), _logits(model, ref, case), atol=0, rtol=0)
    torch.testing.assert_close(_logits(reloaded, ref, case), ref.tensor(case, "logits"), **TOLERANCE)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("model_name", ["ptuning_noproj", "ptuning_proj"])
def test_seed_prefix_checkpoint(tmp_path, version, model_name):
    """A seed-style `checkpoint-3000/pytorch_model.bin` with only the prefix encoder loads onto the base."""
    ref = reference(version)
    case = ref.cases[f"{model_name}.single"]
    base = write_model_folder(tmp_path / "base", version, prefix=None)
    checkpoint = tmp_path / "checkpoint-3000"
    checkpoint.mkdir()
    torch.save(load_file(str(ref.directory / case["prefix"]["prefix_weights"])), checkpoint / "pytorch_model.bin")

    model = load_chatglm_model(base, prefix_checkpoint=checkpoint)
    assert model.config.pre_seq_len == case["prefix"]["pre_seq_len"]
    assert model.config.prefix_projection == case["prefix"]["prefix_projection"]
    torch.testing.assert_close(_logits(model, ref, case), ref.tensor(case, "logits"), **TOLERANCE)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_sharded_checkpoint(tmp_path, version, fmt):
    """Original-style shards with an index file (the inv_freq buffers included, as in the real index)."""
    ref = reference(version)
    case = ref.cases["base.single"]
    weights = load_file(str(ref.directory / "model.safetensors"))
    names = sorted(weights)
    shards = {f"pytorch_model-0000{i + 1}-of-00002.{fmt}": names[i::2] for i in range(2)}
    weight_map = {}
    for shard, keys in shards.items():
        part = {k: weights[k] for k in keys}
        torch.save(part, tmp_path / shard) if fmt == "bin" else save_file(part, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(keys, shard))
    index_name = "pytorch_model.bin.index.json" if fmt == "bin" else "model.safetensors.index.json"
    (tmp_path / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(ref.config))

    model = load_chatglm_model(tmp_path)
    torch.testing.assert_close(_logits(model, ref, case), ref.tensor(case, "logits"), **TOLERANCE)
    half = load_chatglm_model(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_v1_checkpoint_without_lm_head(tmp_path):
    """A ChatGLM-6B checkpoint without lm_head.weight gets the head tied to (copied from) the embeddings."""
    folder = write_model_folder(tmp_path / "tied", "v1", prefix=None)
    weights = load_file(str(folder / "model.safetensors"))
    del weights["lm_head.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    model = load_chatglm_model(folder)
    assert torch.equal(model.lm_head.weight, weights["transformer.word_embeddings.weight"])
    model.save_pretrained(tmp_path / "saved")
    assert torch.equal(load_chatglm_model(tmp_path / "saved").lm_head.weight, model.lm_head.weight)


def _prefix_model(reference_model, version: str):
    torch.manual_seed(0)
    model = copy.deepcopy(reference_model(version, "base"))
    enable_ptuning(model, pre_seq_len=3, prefix_projection=True, prefix_hidden_size=32)
    return model


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_enable_ptuning(reference_model, version):
    model = _prefix_model(reference_model, version)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("transformer.prefix_encoder.") for n in trainable)
    assert (model.config.pre_seq_len, model.config.prefix_projection, model.config.prefix_hidden_size) == (3, True, 32)
    assert model.transformer.prefix_encoder.trans[0].out_features == 32
    # The prefix changes the output, and it takes part in generation.
    base = reference_model(version, "base")
    batch = _train_batch(version)
    model.eval()
    with torch.no_grad():
        assert not torch.allclose(model(batch["input_ids"]).logits, base(batch["input_ids"]).logits)
    single = forward_inputs(reference(version), reference(version).cases["base.single"])
    generated = model.generate(**single, max_new_tokens=2, eos_token_id=[])
    assert generated.shape == (1, single["input_ids"].shape[1] + 2)


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_ptuning_gradient_checkpointing(reference_model, version, use_reentrant):
    """Prefix gradients are identical with and without gradient checkpointing (train mode, prefix dropout on)."""
    plain = _prefix_model(reference_model, version)
    checkpointed = copy.deepcopy(plain)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # newer transformers renamed the method
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    batch = _train_batch(version)

    grads, block_calls = [], []
    for model in (plain, checkpointed):
        model.train()
        calls = []
        blocks = model.transformer.layers if version == "v1" else model.transformer.encoder.layers
        hooks = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in blocks]
        torch.manual_seed(1)
        model(**batch).loss.backward()
        for hook in hooks:
            hook.remove()
        block_calls.append(len(calls))
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})

    num_layers = reference(version).config["num_layers"]
    assert block_calls == [num_layers, 2 * num_layers]  # checkpointed blocks ran again in backward
    assert grads[0].keys() == grads[1].keys()
    assert all(g is not None and g.abs().sum() > 0 for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ptuning_training_reduces_loss(reference_model, version):
    model = _prefix_model(reference_model, version)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    batch = _train_batch(version)
    model.train()
    torch.manual_seed(2)
    losses = []
    for _ in range(5):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_lora_with_peft(reference_model, version):
    peft = pytest.importorskip("peft")
    ref = reference(version)
    model = copy.deepcopy(reference_model(version, "base"))
    lora = peft.get_peft_model(
        model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"], task_type="CAUSAL_LM")
    )
    case = ref.cases["base.train_loss"]
    lora.train()
    out = lora(input_ids=ref.tensor(case, "input_ids"), labels=ref.tensor(case, "labels"))
    assert abs(out.loss.item() - case["loss"]) <= 1e-5  # LoRA starts as a no-op
    out.loss.backward()
    with_grad = [n for n, p in lora.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)

    lora.eval()
    single = ref.cases["base.single"]
    generated = lora.generate(**forward_inputs(ref, single), max_new_tokens=8)
    assert generated.tolist() == ref.tensor(single, "gen_sequences").tolist()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sampling(reference_model, version):
    ref = reference(version)
    case = ref.cases["base.single"]
    model = reference_model(version, "base")
    inputs = forward_inputs(ref, case)
    greedy = ref.tensor(case, "gen_sequences")
    top1 = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_k=1)
    assert top1.tolist() == greedy.tolist()
    tiny_p = model.generate(**inputs, max_new_tokens=8, do_sample=True, top_p=1e-6)
    assert tiny_p.tolist() == greedy.tolist()

    samples = [
        model.generate(
            **inputs, max_new_tokens=8, do_sample=True, temperature=5.0, top_p=0.95,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in (0, 0, 1)
    ]
    prompt_length = inputs["input_ids"].shape[1]
    assert samples[0].tolist() == samples[1].tolist()
    assert samples[0][:, :prompt_length].tolist() == inputs["input_ids"].tolist()
    assert prompt_length < samples[0].shape[1] <= prompt_length + 8
    assert samples[0].tolist() != greedy.tolist()
    assert samples[0].tolist() != samples[2].tolist()
