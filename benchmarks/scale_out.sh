#!/usr/bin/env bash
# Scale-out benchmark in one call on 2 GPUs (about 5-7 minutes on 2 H200s; each stage has its own time limit,
# 8 min 20 s in all): LoRA on 1 vs 2 processes, then an FSDP full fine-tune that writes a sharded (DCP)
# checkpoint and a second run that resumes from it. Every stage writes its JSON as it ends (to $OUT, else
# benchmarks/results), so a failed or timed-out stage loses only its own numbers.
#
#   bash benchmarks/scale_out.sh             # on the GPU machine
#   bash benchmarks/scale_out.sh --tiny      # CPU check: gloo, tiny proxy
#   LORA_FLAGS="--group --compile" bash benchmarks/scale_out.sh   # the fast 1-GPU flags (about 2 min more)
set -u
cd "$(dirname "$0")/.."
WORK=${SCALE_OUT_WORK:-$PWD/.scale_out_work}  # the full-model checkpoint is about 92 GB: a disk, not $OUT
rm -rf "$WORK" && mkdir -p "$WORK"
df -h "$WORK" | tail -1
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null

stage() {  # stage SECONDS PROCESSES SCRIPT-ARGS...
    local limit=$1 processes=$2 started=$SECONDS
    shift 2
    timeout -k 30 "$limit" python3 -m torch.distributed.run --nproc_per_node "$processes" --master_port 29517 \
        benchmarks/scale_out.py "$@" --workdir "$WORK" 2>&1 | tr "\r" "\n" | grep -v -E "step/s|it/s|warnings.warn" | tail -20
    echo "== stage '$*' on $processes process(es): exit ${PIPESTATUS[0]}, $((SECONDS - started)) s"
}

stage 75 1 lora ${LORA_FLAGS:-} "$@"
stage 75 2 lora ${LORA_FLAGS:-} "$@"
stage 160 2 full --phase first "$@"
stage 190 2 full --phase resume "$@"
python3 benchmarks/scale_out.py summary
rm -rf "$WORK"
