# Usage: python benchmarks/llamafactory_tiny_model.py $PWD  (the glmtune checkout; LLaMA-Factory's data/ copied to /tmp/lf/data)
# A tiny random Llama with a ChatML chat template (Qwen's layout, honouring enable_thinking), for the LLaMA-Factory runs
# (qwen3_lora_sft.yaml, qwen3_lora_pretrain.yaml, qwen3_lora_dpo.yaml).
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1] + "/tests")
import torch
from tiny_models import build_tokenizer, corpus_texts
from transformers import LlamaConfig, LlamaForCausalLM
data = Path("/tmp/lf/data")
# The characters of the data the runs read: sft's identity + alpaca_en_demo, pt's c4_demo, dpo's dpo_en_demo.
texts = corpus_texts() + [json.dumps(json.load(open(data / f)), ensure_ascii=False)
                          for f in ("identity.json", "alpaca_en_demo.json", "dpo_en_demo.json")]
texts += [json.loads(line)["text"] for line in open(data / "c4_demo.jsonl", encoding="utf-8")]
tok = build_tokenizer(texts + ["<|im_start|><|im_end|><think></think>"])
tok.chat_template = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
    "<think>\n\n</think>\n\n{% endif %}{% endif %}")
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
model.save_pretrained("/tmp/lf/tiny-chat-llama"); tok.save_pretrained("/tmp/lf/tiny-chat-llama")
print(len(tok))
