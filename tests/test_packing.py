"""--packing: a micro-batch's examples end to end in one row, with no attention across them and the padded batch's loss."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmtune.config import GlmtuneConfig, parse_config
from glmtune.data.preprocess import IGNORE_INDEX, Example, collate, pack
from glmtune.errors import GlmtuneError
from glmtune.models.chatglm import ChatGLM2Config, ChatGLM2ForConditionalGeneration
from glmtune.recipes.train import run_train
from glmtune.train.objectives import SFTObjective
from glmtune.train.trainer import _packed_attention, enable_gradient_checkpointing
from test_fast_paths import EXAMPLES, prepared


def loss_and_gradients(model, objective: SFTObjective, examples: list[Example]):
    model.zero_grad(set_to_none=True)
    batch = objective.collate(examples, 0)
    loss_sum, _ = objective.loss(model, batch)
    loss = loss_sum / objective.units(batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_loss_and_gradients(packed, padded) -> None:
    assert packed[0] == pytest.approx(padded[0], abs=1e-6)
    assert packed[1].keys() == padded[1].keys()
    for name, gradient in padded[1].items():
        torch.testing.assert_close(packed[1][name], gradient, atol=1e-6, rtol=1e-5)


def test_pack_lays_examples_end_to_end_with_restarting_positions():
    batch = pack(EXAMPLES, padding_value=0)
    lengths = [len(e.input_ids) for e in EXAMPLES]  # 6, 4, 8: 18 tokens, padded to 24
    assert batch["input_ids"].shape == (1, 24)
    assert batch["input_ids"][0, :18].tolist() == [t for e in EXAMPLES for t in e.input_ids]
    assert batch["position_ids"][0, :18].tolist() == [p for n in lengths for p in range(n)]
    assert batch["position_ids"][0, 18:].tolist() == list(range(6))  # the tail is a span of its own
    assert int(batch["attention_mask"].sum()) == 18
    # Each example's first label is dropped (no position predicts it in a padded row), the others kept.
    labels = batch["labels"][0].tolist()
    starts = [0, 6, 10]
    assert all(labels[s] == IGNORE_INDEX for s in starts)
    assert labels[:18] == [label for e in EXAMPLES for label in [IGNORE_INDEX, *e.labels[1:]]]
    assert SFTObjective(packing=True).units(batch) == SFTObjective().units(collate(EXAMPLES, 0))


def test_no_attention_across_packed_examples(tiny_llama):
    """Changing the first example changes nothing the second and third compute, unless positions do not restart."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    changed = [Example([2, 40, 41, 42, 43, 1], EXAMPLES[0].labels), *EXAMPLES[1:]]

    def logits(examples, restart: bool):
        batch = pack(examples, 0)
        positions = batch["position_ids"] if restart else torch.arange(batch["input_ids"].shape[1])[None]
        with torch.no_grad():
            return model(input_ids=batch["input_ids"], position_ids=positions, use_cache=False).logits[0, 6:18]

    torch.testing.assert_close(logits(changed, restart=True), logits(EXAMPLES, restart=True), atol=1e-6, rtol=0)
    assert (logits(changed, restart=False) - logits(EXAMPLES, restart=False)).abs().max() > 1e-3  # one long sequence


@pytest.mark.parametrize("method", ["lora", "full"])
def test_packed_loss_and_gradients_equal_the_padded_ones(tiny_model, method):
    padded = loss_and_gradients(prepared(tiny_model, method), SFTObjective(), EXAMPLES)
    packed = loss_and_gradients(prepared(tiny_model, method), SFTObjective(packing=True), EXAMPLES)
    assert_same_loss_and_gradients(packed, padded)


def test_packed_rows_under_gradient_checkpointing_give_the_padded_gradients(tiny_llama):
    padded = loss_and_gradients(prepared(tiny_llama, "lora"), SFTObjective(), EXAMPLES)
    model = prepared(tiny_llama, "lora")
    enable_gradient_checkpointing(model)
    packed = loss_and_gradients(model, SFTObjective(packing=True), EXAMPLES)
    assert_same_loss_and_gradients(packed, padded)


def test_flex_attention_keeps_packed_examples_apart(tiny_llama):
    """The GPU's path, forward only (flex attention has no CPU backward): the padded batch's loss.
    Examples of 40 tokens: flex attention's CPU kernel is wrong on rows shorter than its 128-token block."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(8):
        ids = torch.randint(3, 50, (40,), generator=generator).tolist()
        examples.append(Example(ids, [IGNORE_INDEX] * 20 + ids[20:]))
    model = prepared(tiny_llama, "lora").eval()
    with torch.no_grad():
        batch = collate(examples, 0)
        padded = SFTObjective().loss(model, batch)[0] / SFTObjective().units(batch)
        model.base_model.model.set_attn_implementation("flex_attention")
        batch = pack(examples, 0)
        packed = SFTObjective(packing=True).loss(model, batch)[0] / SFTObjective().units(batch)
    assert packed.item() == pytest.approx(padded.item(), abs=1e-5)


def test_packing_trains_through_the_cli_path_with_the_padded_runs_losses(tiny_llama, demo_train_file, tmp_path):
    common = dict(do_train=True, model_name_or_path=str(tiny_llama), train_file=str(demo_train_file), max_train_samples=8,
                  per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2, logging_steps=1, save_steps=0,
                  report_to="none", lora_dropout=0.0)
    padded = run_train(GlmtuneConfig(output_dir=str(tmp_path / "padded"), **common))
    packed = run_train(GlmtuneConfig(output_dir=str(tmp_path / "packed"), packing=True, **common))
    assert packed.losses == pytest.approx(padded.losses, abs=1e-5)
    assert len(packed.losses) == 3 and (tmp_path / "packed" / "adapter_model.safetensors").is_file()


def test_packing_is_refused_where_examples_would_see_each_other():
    with pytest.raises(GlmtuneError, match="--packing: P-Tuning v2"):
        GlmtuneConfig(finetuning_type="ptuning", packing=True)
    with pytest.raises(GlmtuneError, match="--packing is for --stage sft"):
        GlmtuneConfig(stage="dpo", packing=True)
    GlmtuneConfig(stage="pt", packing=True)  # LLaMA-Factory sets it for pre-training, whose blocks are packed already
    config = ChatGLM2Config(num_layers=1, padded_vocab_size=64, hidden_size=32, ffn_hidden_size=64, kv_channels=8,
                            num_attention_heads=4, seq_length=64, multi_query_group_num=2)
    with pytest.raises(GlmtuneError, match="native ChatGLM"):
        _packed_attention(ChatGLM2ForConditionalGeneration(config), torch.device("cpu"))


def test_llamafactory_neat_packing_turns_packing_on(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text(json.dumps({"stage": "sft", "finetuning_type": "lora", "neat_packing": True, "output_dir": "out"}))
    assert parse_config([str(path)]).packing
    assert not parse_config([str(path), "neat_packing=false"]).packing
