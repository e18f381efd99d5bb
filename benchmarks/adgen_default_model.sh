#!/usr/bin/env bash
# ADGEN end to end on the bundled default model (CPU is enough): LoRA and P-Tuning v2 with the seed's
# flags, glmtune predict on dev.json after each, and glmtune compare. Results go to $RUN (default output/adgen).
# Usage: bash benchmarks/adgen_default_model.sh [path/to/adgen]   (default ../shared/data/adgen)
set -euo pipefail
DATA=${1:-../shared/data/adgen}
RUN=${RUN:-output/adgen}
STEPS=${STEPS:-100}
common=(--train_file "$DATA/train.json" --prompt_column content --response_column summary
        --max_source_length 64 --max_target_length 64 --per_device_train_batch_size 4 --gradient_accumulation_steps 1
        --max_steps "$STEPS" --logging_steps 10 --save_steps "$STEPS" --torch_dtype bfloat16 --overwrite_output_dir)
predict=(--test_file "$DATA/dev.json" --prompt_column content --response_column summary --max_source_length 64
         --max_target_length 64 --per_device_eval_batch_size 16 --torch_dtype bfloat16)

glmtune train "${common[@]}" --finetuning_type lora --learning_rate 5e-4 --output_dir "$RUN/lora"
glmtune train "${common[@]}" --pre_seq_len 16 --learning_rate 1e-2 --output_dir "$RUN/ptuning"
glmtune predict "${predict[@]}" --output_dir "$RUN/base-predict"
glmtune predict "${predict[@]}" --model_name_or_path "$RUN/lora/checkpoint-$STEPS" --output_dir "$RUN/lora"
glmtune predict "${predict[@]}" --ptuning_checkpoint "$RUN/ptuning/checkpoint-$STEPS" --output_dir "$RUN/ptuning"
glmtune compare "$RUN/lora" "$RUN/ptuning" "${predict[@]}" --max_predict_samples 8 --output_dir "$RUN/compare"
