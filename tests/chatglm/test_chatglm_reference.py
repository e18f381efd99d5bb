"""Every reference case of the original THUDM code, run through `load_chatglm_model`."""

from __future__ import annotations

import pytest
import torch

from _chatglm_reference import case_params, forward_inputs, reference, requires_reference
from glmtune.models.chatglm.modeling_v2 import rotary_table

TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize(("version", "name"), case_params(("single", "batch_left_pad", "train_loss", "mask_token")))
def test_forward_logits_and_loss(reference_model, version, name):
    ref = reference(version)
    case = ref.cases[name]
    model = reference_model(version, case["model"])
    with torch.no_grad():
        out = model(**forward_inputs(ref, case), use_cache=False)

    expected = ref.tensor(case, "logits")
    valid = ref.tensor(case, "valid_positions")
    if valid is None:
        valid = torch.ones(expected.shape[:2], dtype=torch.bool)
    torch.testing.assert_close(out.logits[valid], expected[valid], **TOLERANCE)
    if "labels" in case["forward_inputs"]:
        assert out.loss.dtype == torch.float32
        assert abs(out.loss.item() - ref.tensor(case, "loss").item()) <= 1e-5
        assert abs(out.loss.item() - case["loss"]) <= 1e-5


@pytest.mark.parametrize(("version", "name"), case_params(("single", "batch_left_pad", "train_loss", "mask_token")))
def test_layer_masks_and_positions(reference_model, version, name):
    """The mask / positions the first block receives, as recorded from the original."""
    ref = reference(version)
    case = ref.cases[name]
    model = reference_model(version, case["model"])
    inputs = forward_inputs(ref, case)
    mask, positions, past = model.transformer.prepare_layer_inputs(
        inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids"), None, torch.float32
    )
    assert (past is not None) == (case["prefix"] is not None)
    if version == "v1":
        assert torch.equal(mask, ref.tensor(case, "layer_attention_mask"))
        assert torch.equal(positions, ref.tensor(case, "layer_position_ids"))
    else:
        if case["layer_full_attention_mask_is_none"]:
            assert mask is None
        else:
            assert torch.equal(mask, ref.tensor(case, "layer_full_attention_mask"))
        expected_positions = ref.tensor(case, "layer_position_ids")
        if expected_positions is not None:
            assert torch.equal(positions, expected_positions)


GENERATION_KINDS = ("single", "batch_left_pad", "mask_token", "batch_left_pad_eos")


@pytest.mark.parametrize(("version", "name"), case_params(GENERATION_KINDS))
def test_greedy_generation(reference_model, version, name):
    ref = reference(version)
    case = ref.cases[name]
    model = reference_model(version, case["model"])
    out = model.generate(
        **forward_inputs(ref, case),
        max_new_tokens=8,
        do_sample=False,
        num_beams=1,
        eos_token_id=case.get("eos_token_id_override"),
        pad_token_id=case.get("pad_token_id"),
        output_logits=True,
        return_dict_in_generate=True,
    )
    expected = ref.tensor(case, "gen_sequences")
    assert out.sequences.tolist() == expected.tolist()
    steps = torch.stack(out.logits, dim=1)
    torch.testing.assert_close(steps, ref.tensor(case, "gen_step_logits")[:, : steps.shape[1]], **TOLERANCE)


@requires_reference
@pytest.mark.parametrize("version", ["v1", "v2"])
def test_hidden_states(reference_model, version):
    """Block inputs and the last state (v1: after the final norm, v2: before it), as each original records."""
    ref = reference(version)
    case = ref.cases["base.single"]
    model = reference_model(version, "base")
    with torch.no_grad():
        out = model(**forward_inputs(ref, case), use_cache=False, output_hidden_states=True)
    torch.testing.assert_close(torch.stack(out.hidden_states), ref.tensor(case, "hidden_states"), **TOLERANCE)


@requires_reference
def test_v2_rotary_table():
    ref = reference("v2")
    case = ref.cases["base.single"]
    table = rotary_table(ref.tensor(case, "position_ids"), ref.config["kv_channels"], torch.float32)
    torch.testing.assert_close(table.transpose(0, 1), ref.tensor(case, "rotary_pos_emb"), **TOLERANCE)
