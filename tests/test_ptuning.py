"""P-Tuning v2 on transformers decoders: prefix through the KV cache, gradient checkpointing, generation."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmtune.config import GlmtuneConfig
from glmtune.eval.generation import GenerationSettings, generate_batch
from glmtune.methods import get_method
from glmtune.train.trainer import enable_gradient_checkpointing


def prefixed_model(folder, projection: bool, seed: int = 0, attention: str = "sdpa"):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation=attention)
    config = GlmtuneConfig(finetuning_type="ptuning", pre_seq_len=3, prefix_projection=projection, prefix_hidden_size=32)
    return get_method("ptuning").apply(base, config)


BATCH = dict(
    input_ids=torch.tensor([[2, 10, 11, 12, 13, 14], [2, 20, 21, 22, 0, 0]]),
    attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]),
    labels=torch.tensor([[-100, -100, 11, 12, 13, 14], [-100, -100, 21, 22, -100, -100]]),
)


@pytest.mark.parametrize("projection", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model, projection):
    gradients = []
    for checkpointing in (False, True):
        model = prefixed_model(tiny_model, projection)
        model.train()
        if checkpointing:
            enable_gradient_checkpointing(model)
        model(**BATCH, use_cache=False).loss.backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys() and gradients[0]
    for name in gradients[0]:
        assert gradients[0][name].abs().sum() > 0, name
        torch.testing.assert_close(gradients[0][name], gradients[1][name], atol=1e-6, rtol=1e-5)


def test_only_the_prefix_encoder_trains(tiny_model):
    model = prefixed_model(tiny_model, projection=True)
    trainable = get_method("ptuning").trainable_parameters(model)
    assert trainable and all(n.startswith("prefix_encoder.") for n in trainable)
    assert all(not p.requires_grad for n, p in model.base_model.named_parameters())


def test_prefix_changes_the_logits_and_generation_uses_it(tiny_model):
    model = prefixed_model(tiny_model, projection=False).eval()
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_(0, 3)  # a strong prefix, so it must show
        base_logits = model.base_model(input_ids=BATCH["input_ids"][:1]).logits
        prefixed_logits = model(input_ids=BATCH["input_ids"][:1]).logits
    assert not torch.allclose(base_logits, prefixed_logits, atol=1e-3)

    # The first generated token is the argmax of the prefixed model's last logits, not the base's.
    prompt = BATCH["input_ids"][0].tolist()
    settings = GenerationSettings(max_new_tokens=1)
    (prefixed_token,) = generate_batch(model, [prompt], 0, [], settings)
    (base_token,) = generate_batch(model.base_model, [prompt], 0, [], settings)
    assert prefixed_token == [int(prefixed_logits[0, -1].argmax())]
    assert base_token == [int(base_logits[0, -1].argmax())]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_cached_generation_matches_full_recompute_with_prefix(tiny_model, attention):
    """Decoding step by step through the prefix cache equals re-running the whole sequence each time, with the
    prefix read once for all rows (sdpa: decode_attention) or copied in front of the rows (eager attention)."""
    model = prefixed_model(tiny_model, projection=True, attention=attention).eval()
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.normal_(0, 2)
    prompt = [2, 10, 11, 12]
    (generated,) = generate_batch(model, [prompt], 0, [], GenerationSettings(max_new_tokens=6))
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            sequence.append(int(model(input_ids=torch.tensor([sequence])).logits[0, -1].argmax()))
    assert generated == sequence[len(prompt):]


def test_compiled_layers_share_one_graph_with_the_prefix():
    """Every layer gets its own prefix without being specialized on its index: the compiled graphs do not
    grow with the number of layers. Before, each layer was one more compiled entry, and past dynamo's
    recompile limit (8) the remaining layers and every new sequence length ran eagerly."""
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    from glmtune.models.introspect import decoder_layers

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=10,
                         num_attention_heads=4, num_key_value_heads=2)
    model = get_method("ptuning").apply(LlamaForCausalLM(config), GlmtuneConfig(pre_seq_len=3)).train()
    reference = [model(input_ids=torch.arange(4, 4 + length).repeat(2, 1), labels=torch.arange(4, 4 + length).repeat(2, 1),
                       use_cache=False).loss.item() for length in (6, 9)]
    torch._dynamo.reset()
    counters.clear()
    for layer in decoder_layers(model):
        layer.forward = torch.compile(layer.forward, dynamic=True, backend="eager")
    for length, expected in zip((6, 9, 6), reference + reference[:1]):
        ids = torch.arange(4, 4 + length).repeat(2, 1)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        assert loss.item() == pytest.approx(expected, abs=1e-5)
    # Layer 0's input does not require grad, the others' do; each is compiled for the first length, then dynamic.
    assert counters["frames"]["total"] <= 4
    assert not counters["graph_break"]
    torch._dynamo.reset()


def test_decode_steps_read_the_prefix_once_for_all_rows(tiny_model):
    """Every layer's attention module is found, so decode steps take the shared-prefix path (not the per-row copies)."""
    from glmtune.eval.decoding import SlotDecoder

    model = prefixed_model(tiny_model, projection=False).eval()
    decoder = SlotDecoder(model, 2, 16)
    layers = model.base_model.config.num_hidden_layers
    assert [m.layer_idx for m in decoder._attention_modules] == list(range(layers))
    decoder.position = decoder.prefix_length + 4
    decoder.prefill([0, 1], [[2, 10, 11, 12], [2, 20]], 0)
    keys = decoder.cache.layers[0].keys
    assert keys.shape[0] == 2 and keys.shape[2] == 16  # the rows hold their own 16 positions; the prefix is stored once
    assert decoder.cache.layers[0].prefix[0].shape[:1] == (1,)
