import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from glmtune.config import GlmtuneConfig
from glmtune.eval.generation import GenerationSettings, generate_batch, generate_texts
from glmtune.methods import get_method


def prompts_of(tokenizer):
    texts = ["类型#上衣*颜色#白色", "类型#裙", "类型#裤*版型#宽松*风格#复古*图案#格子", "问"]
    return [tokenizer(t)["input_ids"] for t in texts]


def float32_model(folder, method: str | None):
    """The model in ``folder`` in float32, with a random P-Tuning v2 prefix for ``method="ptuning"``."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if method:
        model = get_method(method).apply(model, GlmtuneConfig(pre_seq_len=3))
        with torch.no_grad():
            model.prefix_encoder.embedding.weight.normal_(0, 2)
    return model.eval()


@pytest.mark.parametrize("method", [None, "ptuning"])
def test_batched_greedy_equals_unbatched(tiny_model, method):
    model = float32_model(tiny_model, method)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = prompts_of(tokenizer)
    settings = GenerationSettings(max_new_tokens=12)
    stops = [tokenizer.eos_token_id]
    batched = generate_batch(model, prompts, tokenizer.pad_token_id, stops, settings)
    one_by_one = [generate_batch(model, [p], tokenizer.pad_token_id, stops, settings)[0] for p in prompts]
    assert batched == one_by_one
    assert any(len(tokens) > 0 for tokens in batched)


@pytest.mark.parametrize("method", [None, "ptuning"])
def test_compiled_decode_steps_pick_the_eager_steps_tokens(tiny_llama, method):
    """--compile_generation: the prefill and the decode step through torch.compile (attending over the whole cache) decode
    as eager ones do; two batches of different shapes, so the prefill compiles a second (static) shape too."""
    model = float32_model(tiny_llama, method)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    stops = [tokenizer.eos_token_id]
    for prompts in (prompts_of(tokenizer), prompts_of(tokenizer)[1::2]):
        eager = generate_batch(model, prompts, tokenizer.pad_token_id, stops, GenerationSettings(max_new_tokens=12))
        frames = torch._dynamo.utils.counters["frames"]["ok"]
        compiled = generate_batch(model, prompts, tokenizer.pad_token_id, stops,
                                  GenerationSettings(max_new_tokens=12, compile_steps=True))
        assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # prefill and steps did go through torch.compile
        assert compiled == eager and any(eager)


def test_generate_texts_keeps_prompt_order_and_sampling_is_seeded(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = prompts_of(tokenizer)
    greedy, _ = generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=5), batch_size=2, show_progress=False)
    singles = [generate_texts(model, tokenizer, [p], GenerationSettings(max_new_tokens=5), show_progress=False)[0][0] for p in prompts]
    assert greedy == singles
    sampled = [generate_texts(model, tokenizer, prompts, GenerationSettings(max_new_tokens=5, do_sample=True, seed=3),
                              batch_size=4, show_progress=False)[0] for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_penalties_match_transformers_and_batch_like_single_rows(tiny_llama):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = prompts_of(tokenizer)
    settings = GenerationSettings(max_new_tokens=16, repetition_penalty=1.5, no_repeat_ngram_size=2)
    plain = [generate_batch(model, [p], tokenizer.pad_token_id, [], GenerationSettings(max_new_tokens=16))[0] for p in prompts]
    ours = [generate_batch(model, [p], tokenizer.pad_token_id, [], settings)[0] for p in prompts]
    for prompt, tokens in zip(prompts, ours):
        ids = torch.tensor([prompt])
        reference = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                                   repetition_penalty=1.5, no_repeat_ngram_size=2, eos_token_id=None,
                                   pad_token_id=tokenizer.pad_token_id)
        assert tokens == reference[0, len(prompt):].tolist()
        sequence = prompt + tokens
        for end in range(len(prompt), len(sequence)):  # no generated token completes an earlier bigram
            assert tuple(sequence[end - 1 : end + 1]) not in set(zip(sequence[: end - 1], sequence[1:end]))
    assert ours != plain  # the penalties changed something
    assert generate_batch(model, prompts, tokenizer.pad_token_id, [], settings) == ours


def test_top_k_one_samples_the_greedy_tokens(tiny_llama):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    prompts = prompts_of(tokenizer)
    greedy = generate_batch(model, prompts, tokenizer.pad_token_id, [], GenerationSettings(max_new_tokens=8))
    top1 = generate_batch(model, prompts, tokenizer.pad_token_id, [],
                          GenerationSettings(max_new_tokens=8, do_sample=True, top_k=1, temperature=2.0, seed=5))
    wide = generate_batch(model, prompts, tokenizer.pad_token_id, [],
                          GenerationSettings(max_new_tokens=8, do_sample=True, top_p=1.0, temperature=5.0, seed=5))
    assert top1 == greedy and wide != greedy


TRITON_MATVEC_CHECK = """
import torch
from glmtune.models.quantization import NF4_LEVELS, dequantize_weight, quantize_weight
from glmtune.models.quantized_matvec import quantized_matvec

torch.manual_seed(0)
for bits in (4, 8):
    for rows, out_features, in_features in ((1, 40, 256), (3, 33, 640), (4, 5, 960), (2, 7, 1030)):
        codes, scale = quantize_weight(torch.randn(out_features, in_features), bits)
        x = torch.randn(rows, in_features)
        levels = torch.tensor(NF4_LEVELS) if bits == 4 else None
        expected = torch.nn.functional.linear(x, dequantize_weight(codes, scale, bits, torch.float32))
        actual = quantized_matvec(x, codes, scale, bits, levels, blocks=(16, 128, 4))
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)  # float32 sums in another order
        print("ok", bits, rows, out_features, in_features)
"""


def test_triton_matvec_equals_dequantize_then_multiply():
    """The CUDA batch-1 kernels, run by Triton's interpreter on the CPU (set before triton is imported, hence a
    process of its own), at the edges of their blocks: 33 features, 640 and 960 inputs (NF4: 320 and 480 code
    bytes against 128 a step), and 1,030 inputs, which 64 does not divide (NF4: one group a row)."""
    pytest.importorskip("triton")
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", TRITON_MATVEC_CHECK], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("ok") == 8


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_decode_attention_equals_masked_sdpa_with_grouped_heads(kv_heads):
    from glmtune.eval.decoding import decode_attention

    torch.manual_seed(0)
    rows, heads, visible, head_dim = 3, 4, 9, 8
    query = torch.randn(rows, heads, 1, head_dim)
    key, value = torch.randn(2, rows, kv_heads, visible, head_dim)
    mask = torch.rand(rows, 1, 1, visible) > 0.3
    mask[..., -1] = True
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    ours, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    expanded = [t.repeat_interleave(heads // kv_heads, dim=1) for t in (key, value)]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *expanded, attn_mask=mask, scale=0.3)
    assert ours.shape == (rows, 1, heads, head_dim)
    torch.testing.assert_close(ours, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_decode_attention_reads_a_shared_prefix_as_if_every_row_held_it(kv_heads):
    from glmtune.eval.decoding import SHARED_PREFIX, decode_attention

    torch.manual_seed(0)
    rows, heads, prefix, visible, head_dim = 3, 4, 5, 7, 8
    query = torch.randn(rows, heads, 1, head_dim)
    key, value = torch.randn(2, rows, kv_heads, visible, head_dim)
    shared = tuple(torch.randn(1, kv_heads, prefix, head_dim) for _ in range(2))
    mask = torch.rand(rows, 1, 1, prefix + visible) > 0.3
    mask[..., :prefix] = True
    mask[..., -1] = True
    module = torch.nn.Module()
    module.num_key_value_groups = heads // kv_heads
    setattr(module, SHARED_PREFIX, shared)
    ours, _ = decode_attention(module, query, key, value, mask, scaling=0.3)
    whole = [torch.cat([p.expand(rows, -1, -1, -1), t], dim=2).repeat_interleave(heads // kv_heads, dim=1)
             for p, t in zip(shared, (key, value))]
    expected = torch.nn.functional.scaled_dot_product_attention(query, *whole, attn_mask=mask, scale=0.3)
    torch.testing.assert_close(ours, expected.transpose(1, 2), atol=1e-6, rtol=1e-5)
    # what SDPA gets when decode_attention hands a call on (here: a query of two positions)
    two = torch.randn(rows, heads, 2, head_dim)
    mask2 = mask.expand(rows, 1, 2, prefix + visible)
    handed_on, _ = decode_attention(module, two, key, value, mask2, scaling=0.3)
    expected2 = torch.nn.functional.scaled_dot_product_attention(two, *whole, attn_mask=mask2, scale=0.3)
    torch.testing.assert_close(handed_on, expected2.transpose(1, 2), atol=1e-6, rtol=1e-5)
