"""The README's main job: LoRA on the bundled Gemma 3 270M with the bundled sample, then before/after."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from rich.console import Console

from glmtune.config import GlmtuneConfig
from glmtune.recipes.predict import run_compare
from glmtune.recipes.train import run_train

console = Console()


def demo_data_folder() -> Path:
    return Path(str(files("glmtune").joinpath("demo_data")))


def run_demo(steps: int, output_dir: str, compare_examples: int = 4) -> str:
    data = demo_data_folder()
    # Default dtype (float32 on a CPU): a bf16 matmul ran 150x slower than float32 on a CPU without
    # AVX-512 BF16 (benchmarks/QUALITY.md); lengths are sized from the data (--max_*_length auto).
    config = GlmtuneConfig(
        do_train=True, train_file=str(data / "demo_train.jsonl"), validation_file=str(data / "demo_dev.jsonl"),
        prompt_column="content", response_column="summary", output_dir=output_dir, overwrite_output_dir=True,
        finetuning_type="lora", lora_rank=16, lora_alpha=32, lora_target="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        per_device_train_batch_size=4, learning_rate=1e-3, warmup_steps=5,
        max_steps=steps, logging_steps=10, save_steps=0, report_to="none",
        max_predict_samples=compare_examples, per_device_eval_batch_size=compare_examples,
    )
    console.print(f"[bold]glmtune demo[/]: LoRA on the bundled Gemma 3 270M, {steps} steps on {data / 'demo_train.jsonl'}")
    run_train(config)
    table = run_compare(config, [output_dir], names=["before", "after"])
    print(table)  # plain print: rich would re-wrap the Chinese text at the terminal width
    return table
