"""Speed-ups in the training path compute the same thing as the plain path."""

import functools

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from glmtune.config import GlmtuneConfig
from glmtune.data.preprocess import Example, collate
from glmtune.methods import get_method
from glmtune.models.chatglm import ChatGLM2Config, ChatGLM2ForConditionalGeneration, ChatGLMConfig, ChatGLMForConditionalGeneration
from glmtune.models.chatglm import enable_ptuning
from glmtune.train.loss import CHUNK_ROWS, SUPPORTED_MODEL_TYPES, label_loss, supports_label_loss
from glmtune.errors import GlmtuneError
from glmtune.train.trainer import DataOrder, _loss, _prepare_layers, enable_gradient_checkpointing
from tiny_models import build_model_folder

EXAMPLES = [
    Example([2, 10, 11, 12, 13, 1], [-100, -100, -100, 12, 13, 1]),
    Example([2, 20, 21, 1], [-100, -100, 21, 1]),
    Example([2, 30, 31, 32, 33, 34, 35, 1], [-100, -100, -100, -100, 33, 34, 35, 1]),
]


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_right_padded_rows_need_no_attention_mask(tiny_model, method):
    """The training loss runs without a mask; with the padding mask it is the same loss and gradients."""
    batch = collate(EXAMPLES, 0)
    results = []
    for with_mask in (True, False):
        model = prepared(tiny_model, method)
        if with_mask:
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         use_cache=False).loss
        else:
            loss = _loss(model, batch, torch.autocast("cpu", enabled=False))
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-6)
    for name, gradient in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], gradient, atol=1e-6, rtol=1e-5)


def test_group_by_length_sorts_windows_and_covers_every_example():
    lengths = [(i * 37) % 101 for i in range(400)]
    order = DataOrder(400, 4, seed=3, lengths=lengths)
    batches = [order.batch(i) for i in range(100)]
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(400))
    window = flat[:200]  # 50 batches of 4
    assert [lengths[i] for i in window] == sorted((lengths[i] for i in window), reverse=True)
    assert DataOrder(400, 4, seed=3, lengths=lengths).batch(57) == batches[57]  # stateless: resume sees the same
    assert order.batch(100) != batches[0]  # the next epoch is another shuffle


NO_AUTOCAST = torch.autocast("cpu", enabled=False)


def loss_and_gradients(model, batch, label_only: bool, chunk_rows: int = CHUNK_ROWS, seed: int = 0):
    """fp32 loss and the gradients of every trainable parameter, from a fresh backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks (ChatGLM's prefix dropout) for both paths
    if label_only:
        loss = label_loss(model, batch["input_ids"], batch["labels"], chunk_rows)
    else:
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    loss.backward()
    gradients = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert gradients and all(g is not None and g.abs().sum() > 0 for g in gradients.values())
    return loss.item(), gradients


def assert_label_loss_matches(model, batch, chunk_rows: int = CHUNK_ROWS):
    assert supports_label_loss(model)  # otherwise _loss would silently take the plain path
    plain_loss, plain_gradients = loss_and_gradients(model, batch, label_only=False)
    loss, gradients = loss_and_gradients(model, batch, label_only=True, chunk_rows=chunk_rows)
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert gradients.keys() == plain_gradients.keys()
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)


def prepared(folder, method: str, dtype: torch.dtype = torch.float32):
    """``method`` on the model in ``folder``, with random LoRA B matrices so that LoRA's gradients are not zero."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model = get_method(method).apply(model, GlmtuneConfig(pre_seq_len=3, lora_dropout=0.0, freeze_trainable_layers=1))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    return model.train()


@pytest.mark.parametrize("chunk_rows", [CHUNK_ROWS, 3])  # 3: several chunks, each recomputed in backward
@pytest.mark.parametrize("method", ["lora", "ptuning", "freeze", "full"])
def test_label_loss_matches_the_models_loss(tiny_model, method, chunk_rows):
    """Same loss and gradients as the model's own loss (Gemma: tied head, so `full` checks the head's
    gradient reaching the embeddings)."""
    assert_label_loss_matches(prepared(tiny_model, method), collate(EXAMPLES, 0), chunk_rows)


@pytest.mark.parametrize("method", ["lora", "ptuning"])
def test_label_loss_with_gradient_checkpointing_matches(tiny_llama, method):
    model = prepared(tiny_llama, method)
    batch = collate(EXAMPLES, 0)
    _, plain_gradients = loss_and_gradients(model, batch, label_only=False)
    enable_gradient_checkpointing(model)
    _, gradients = loss_and_gradients(model, batch, label_only=True, chunk_rows=3)
    for name, gradient in plain_gradients.items():
        torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("gemma"), "gemma")


def test_label_loss_applies_gemmas_final_logit_softcapping(tiny_gemma):
    model = prepared(tiny_gemma, "lora")
    assert model.config.model_type == "gemma3_text"
    batch = collate(EXAMPLES, 0)
    uncapped, _ = loss_and_gradients(model, batch, label_only=False)
    model.config.final_logit_softcapping = 0.1  # strong enough to change the loss of a tiny random model
    capped, _ = loss_and_gradients(model, batch, label_only=False)
    assert abs(capped - uncapped) > 1e-3  # far above float noise: the cap reached the loss
    assert_label_loss_matches(model, batch, chunk_rows=3)


def test_label_loss_under_autocast_and_in_eval(tiny_llama):
    """bf16 autocast stays close to the plain path, and no_grad evaluation needs no backward graph."""
    model = prepared(tiny_llama, "lora")
    batch = collate(EXAMPLES, 0)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():
        fast, plain = _loss(model, batch, autocast), _loss(model, batch, autocast, label_only=False)
    assert fast.dtype == torch.float32 and not fast.requires_grad
    assert fast.item() == pytest.approx(plain.item(), abs=2e-2)


def test_label_loss_without_labels_is_zero_and_still_backpropagates(tiny_llama):
    model = prepared(tiny_llama, "lora")
    batch = collate([Example([2, 10, 11, 1], [-100, -100, -100, -100])], 0)
    loss = label_loss(model, batch["input_ids"], batch["labels"])
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


TINY_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)


@pytest.mark.parametrize("model_type", sorted(SUPPORTED_MODEL_TYPES - {"llama", "gemma3_text", "chatglm"}))
def test_every_supported_model_type_matches(model_type):
    """Each supported model type computes `head(final hidden state)` (softcapped for Gemma 2): checked here,
    with every parameter (head included) trained."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **TINY_COMMON), dtype=torch.float32)
    assert_label_loss_matches(model.train(), collate(EXAMPLES, 0), chunk_rows=3)


def chatglm_model(version: int):
    torch.manual_seed(0)
    if version == 1:
        config = ChatGLMConfig(vocab_size=200, hidden_size=32, num_layers=2, num_attention_heads=4, inner_hidden_size=64,
                               max_sequence_length=64, bos_token_id=194, eos_token_id=195, mask_token_id=190,
                               gmask_token_id=191, pad_token_id=3)
        model = ChatGLMForConditionalGeneration(config)
        # prompt, [gMASK], <sop> (bos), answer, <eop>; right-padded with the pad id
        rows = [([10, 11, 12, 191, 194, 20, 21, 195], 4), ([13, 14, 191, 194, 22, 195, 3, 3], 3)]
    else:
        config = ChatGLM2Config(num_layers=2, padded_vocab_size=200, hidden_size=32, ffn_hidden_size=64, kv_channels=8,
                                num_attention_heads=4, seq_length=64, multi_query_group_num=2)
        model = ChatGLM2ForConditionalGeneration(config)
        # [gMASK], sop, prompt, answer, eos; right-padded with the pad id
        rows = [([5, 6, 10, 11, 20, 21, 2, 0], 4), ([5, 6, 12, 22, 2, 0, 0, 0], 3)]
    enable_ptuning(model, pre_seq_len=3, prefix_projection=True, prefix_hidden_size=16)
    input_ids = torch.tensor([ids for ids, _ in rows])
    labels = torch.tensor([[-100] * start + [t if t != config.pad_token_id else -100 for t in ids[start:]] for ids, start in rows])
    return model.train(), {"input_ids": input_ids, "labels": labels}


@pytest.mark.parametrize("version", [1, 2])
def test_native_chatglm_ptuning_matches(version):
    """ChatGLM2/3 record their last hidden state before the final norm; the hook on the decoder does not."""
    model, batch = chatglm_model(version)
    assert_label_loss_matches(model, batch)
    assert_label_loss_matches(model, batch, chunk_rows=2)


@pytest.mark.parametrize("version", [0, 1, 2])  # 0: a transformers model; 1, 2: native ChatGLM-6B and ChatGLM2
def test_the_head_runs_only_on_label_rows(tiny_llama, version):
    """The model's own head gets no position (its last-position logits were a 4 ms batched GEMM a step on the H200)."""
    if version:
        model, batch = chatglm_model(version)
        head = model.lm_head if version == 1 else model.transformer.output_layer
    else:
        model, batch = prepared(tiny_llama, "lora"), collate(EXAMPLES, 0)
        head = model.get_output_embeddings()
    rows_seen = []
    hook = head.register_forward_hook(lambda module, args, output: rows_seen.append(args[0].shape[:-1].numel()))
    try:
        label_loss(model, batch["input_ids"], batch["labels"])
    finally:
        hook.remove()
    label_positions = int((batch["labels"][:, 1:] != -100).sum())
    assert sorted(rows_seen) == [0, label_positions]


def test_checkpointing_some_layers_gives_the_same_gradients(tiny_llama):
    """--gradient_checkpointing_layers N recomputes only the first N layers; the gradients do not change."""
    batch = collate(EXAMPLES, 0)
    results = []
    for layer_count in (None, 1, 0):
        model = prepared(tiny_llama, "lora")
        enable_gradient_checkpointing(model, layer_count)
        wrapped = [layer.forward.__name__ == "checkpointed" for layer in model.base_model.model.model.layers]
        assert wrapped == [True, True] if layer_count is None else [i < layer_count for i in range(2)]
        _loss(model, batch, torch.autocast("cpu", enabled=False)).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for gradients in results[1:]:
        for name, gradient in results[0].items():
            torch.testing.assert_close(gradients[name], gradient, atol=1e-6, rtol=1e-5)


def test_activation_memory_budget_keeps_fewer_activations_for_the_same_loss_and_gradients(tiny_llama, monkeypatch):
    """--activation_memory_budget: the compiled layers save less for backward and recompute the rest, with the same
    loss and gradients. The partitioner is the one inductor uses; only the code generation is left out here."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager_decomp_partition"))
    batch = collate(EXAMPLES, 0)
    results = {}
    for budget in (1.0, 0.1):
        torch._dynamo.reset()
        model = prepared(tiny_llama, "lora")
        _prepare_layers(model, GlmtuneConfig(torch_compile=True, activation_memory_budget=budget), torch.float32)
        saved_bytes = []

        def pack(tensor):
            if not isinstance(tensor, torch.nn.Parameter):
                saved_bytes.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            results[budget] = (*loss_and_gradients(model, batch, label_only=True), sum(saved_bytes))
    (loss, gradients, saved), (budget_loss, budget_gradients, budget_saved) = results[1.0], results[0.1]
    assert budget_saved < 0.8 * saved
    assert budget_loss == pytest.approx(loss, abs=1e-6)
    for name, gradient in gradients.items():
        torch.testing.assert_close(budget_gradients[name], gradient, atol=1e-6, rtol=1e-5)


def test_activation_memory_budget_needs_the_compiler(tiny_llama):
    with pytest.raises(GlmtuneError, match="--activation_memory_budget .* --torch_compile"):
        _prepare_layers(prepared(tiny_llama, "lora"), GlmtuneConfig(activation_memory_budget=0.5), torch.float32)
