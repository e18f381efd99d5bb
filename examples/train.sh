#!/usr/bin/env bash
# The seed's ptuning/train.sh with one word changed: `python main.py` -> `glmtune main`.
# Data: ADGEN as in the tutorial (DATA=AdvertiseGen) or any JSON/JSON-lines file with these columns.
# Model: a local THUDM/chatglm-6b folder, any transformers decoder, or leave the flag out for the bundled Gemma 3 270M.
PRE_SEQ_LEN=8
LR=1e-2
DATA=${DATA:-AdvertiseGen}
MODEL=${MODEL:-THUDM/chatglm-6b}

CUDA_VISIBLE_DEVICES=0 glmtune main \
    --do_train \
    --train_file $DATA/train.json \
    --validation_file $DATA/dev.json \
    --prompt_column content \
    --response_column summary \
    --overwrite_cache \
    --model_name_or_path $MODEL \
    --output_dir output/adgen-chatglm-6b-pt-$PRE_SEQ_LEN-$LR \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --predict_with_generate \
    --max_steps 3000 \
    --logging_steps 10 \
    --save_steps 1000 \
    --learning_rate $LR \
    --pre_seq_len $PRE_SEQ_LEN \
    --quantization_bit 4 "$@"

