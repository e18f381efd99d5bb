"""GLM-4 through transformers' native ``glm`` and ``glm4`` models: every method trains, and predict, chat
(the engine), serve and export work with GLM-4's chat template."""

import json
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM

from glmtune.config import GlmtuneConfig
from glmtune.data.templates import ChatTemplate, get_template
from glmtune.export import run_export
from glmtune.methods.loading import load_for_inference
from glmtune.recipes.predict import run_predict
from glmtune.recipes.train import run_train
from glmtune.serve.api import create_app
from glmtune.serve.engine import Engine
from tiny_models import DEMO_TRAIN, build_glm_folder

QUERY = "类型#上衣*颜色#白色"


@pytest.fixture(scope="module", params=["glm", "glm4"])
def glm_model(request, tmp_path_factory) -> Path:
    return build_glm_folder(tmp_path_factory.mktemp(request.param), request.param)


def glm_config(model: Path, output: Path, method: str, **overrides) -> GlmtuneConfig:
    values = dict(do_train=True, model_name_or_path=str(model), train_file=str(DEMO_TRAIN), output_dir=str(output),
                  finetuning_type=method, pre_seq_len=4, freeze_trainable_layers=1, max_steps=6, save_steps=0,
                  learning_rate={"ptuning": 0.2}.get(method, 2e-2), max_train_samples=8, report_to="none",
                  logging_steps=1, lora_dropout=0.0, max_new_tokens=6)
    values.update(overrides)
    return GlmtuneConfig(**values)


def test_glm4_chat_template_is_used_and_answers_end_with_eos(glm_model):
    from glmtune.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(glm_model))
    template = get_template("auto", tokenizer)
    assert isinstance(template, ChatTemplate) and not template.answer_has_end_marker
    from glmtune.data.formats import Conversation, Turn
    from glmtune.data.preprocess import encode_conversation

    example = encode_conversation(Conversation([Turn("问", "答")]), tokenizer, template, 32, 32)
    assert tokenizer.decode(example.input_ids) == "[gMASK]<sop><|user|>\n问<|assistant|>\n答<|endoftext|>"
    answer = [t for t in example.labels if t != -100]
    assert tokenizer.decode(answer) == "\n答<|endoftext|>"


@pytest.mark.parametrize("method", ["lora", "ptuning", "freeze", "full"])
def test_every_method_trains_a_glm4_model(glm_model, tmp_path, method):
    result = run_train(glm_config(glm_model, tmp_path / method, method))
    assert result.losses[-1] < result.losses[0] - 0.03, result.losses
    bundle = load_for_inference(GlmtuneConfig(model_name_or_path=str(tmp_path / method)))
    assert type(bundle.model).__name__ in {"GlmForCausalLM", "Glm4ForCausalLM", "PeftModelForCausalLM", "PrefixTuningModel"}


def test_glm4_quantized_lora_trains(glm_model, tmp_path):
    result = run_train(glm_config(glm_model, tmp_path / "q", "lora", quantization_bit=4))
    assert result.losses[-1] < result.losses[0]


@pytest.fixture(scope="module")
def glm_lora(glm_model, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("glm_lora") / "lora"
    run_train(glm_config(glm_model, output, "lora", max_steps=10))
    return output


def test_glm4_predict_chat_serve_and_export(glm_model, glm_lora, tmp_path):
    test_file = tmp_path / "test.jsonl"
    test_file.write_text(json.dumps({"content": QUERY, "summary": "干净百搭"}, ensure_ascii=False) + "\n", encoding="utf-8")
    inference = GlmtuneConfig(model_name_or_path=str(glm_lora), max_new_tokens=6)
    # chat decodes without predict's default 4-gram ban; predict gets the same decoding so the answers compare
    metrics = run_predict(GlmtuneConfig(model_name_or_path=str(glm_lora), test_file=str(test_file),
                                        output_dir=str(tmp_path / "predict"), max_new_tokens=6, no_repeat_ngram_size=0))
    assert "predict_bleu-4" in metrics
    predicted = json.loads((tmp_path / "predict" / "generated_predictions.txt").read_text(encoding="utf-8").splitlines()[0])

    engine = Engine.from_config(inference)
    try:
        prompt = engine.chat_prompt([], QUERY)
        assert engine.tokenizer.decode(prompt).endswith(f"<|user|>\n{QUERY}<|assistant|>")
        chat_answer = "".join(engine.stream(prompt, engine.default_settings(max_new_tokens=6)))
        assert chat_answer.strip() == predicted["predict"].strip()

        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        try:
            reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60, json={
                "model": glm_lora.name, "max_tokens": 6, "temperature": 0,
                "messages": [{"role": "user", "content": QUERY}]})
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == chat_answer
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    finally:
        engine.close()

    folder = run_export(inference, str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert type(merged).__name__ in {"GlmForCausalLM", "Glm4ForCausalLM"}
    ids = torch.tensor([prompt])
    torch.testing.assert_close(merged(ids).logits, load_for_inference(inference).model(ids).logits, atol=1e-4, rtol=1e-4)


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
