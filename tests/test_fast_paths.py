"""Speed-ups in the training path compute the same thing as the plain path."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from glmtune.config import GlmtuneConfig
from glmtune.data.preprocess import Example, collate
from glmtune.methods import get_method
from glmtune.train.trainer import DataOrder, _loss

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
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
        model = get_method(method).apply(model, GlmtuneConfig(pre_seq_len=3, lora_dropout=0.0)).train()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.normal_(0, 0.1)
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
