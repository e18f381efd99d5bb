#!/usr/bin/env bash
# The seed's ptuning/evaluate.sh with `python3 main.py` -> `glmtune main`.
# The checkpoint folder records its base model, so --model_name_or_path points at the checkpoint as in the seed.
PRE_SEQ_LEN=8
CHECKPOINT=adgen-chatglm-6b-pt-8-1e-2
STEP=3000
DATA=${DATA:-AdvertiseGen}

CUDA_VISIBLE_DEVICES=0 glmtune main \
    --do_predict \
    --validation_file $DATA/dev.json \
    --test_file $DATA/dev.json \
    --overwrite_cache \
    --prompt_column content \
    --response_column summary \
    --model_name_or_path ./output/$CHECKPOINT/checkpoint-$STEP \
    --output_dir ./output/$CHECKPOINT \
    --overwrite_output_dir \
    --max_source_length 64 \
    --max_target_length 64 \
    --per_device_eval_batch_size 1 \
    --predict_with_generate \
    --pre_seq_len $PRE_SEQ_LEN \
    --quantization_bit 4 "$@"
