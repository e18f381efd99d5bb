#!/usr/bin/env bash
# One issue-#18 experiment: glmtune train (150 steps x batch 8 on ADGEN train.json) then glmtune predict on dev.json.
# Usage: bash benchmarks/quality/run_glmtune.sh NAME "extra train flags" "extra predict flags"
# Writes $QUALITY_RUNS/NAME/{train.log,predict.log,times,model/,pred/predict_results.json} (default output/quality).
set -uo pipefail
NAME=$1; TRAIN=$2; PRED=$3
DATA=${DATA:-../shared/data/adgen}
D=${QUALITY_RUNS:-output/quality}/$NAME; mkdir -p "$D"
echo "start $(date -u)" > "$D/times"
python -m glmtune train --train_file "$DATA/train.json" --max_steps 150 --per_device_train_batch_size 8 \
  --save_steps 0 --report_to none --overwrite_output_dir --output_dir "$D/model" $TRAIN > "$D/train.log" 2>&1
echo "trained $(date -u)" >> "$D/times"
python -m glmtune predict --model_name_or_path "$D/model" --test_file "$DATA/dev.json" --output_dir "$D/pred" \
  --per_device_eval_batch_size 16 $PRED > "$D/predict.log" 2>&1
echo "predicted $(date -u)" >> "$D/times"
