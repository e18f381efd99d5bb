#!/usr/bin/env bash
# Chinese documents nobody on this project wrote, for `glmtune kb eval` (benchmarks/kb_questions.jsonl):
# pypinyin 0.55.0's README.rst and CHANGELOG.rst, and jieba 0.42.1's package description (PKG-INFO), taken
# from their sdists on PyPI. Usage: bash benchmarks/kb_fetch_docs.sh DIR
set -euo pipefail
out=${1:?usage: kb_fetch_docs.sh DIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps --no-binary :all: -d "$work" pypinyin==0.55.0 jieba==0.42.1 >/dev/null
tar -xzf "$work/pypinyin-0.55.0.tar.gz" -C "$work" pypinyin-0.55.0/README.rst pypinyin-0.55.0/CHANGELOG.rst
tar -xzf "$work/jieba-0.42.1.tar.gz" -C "$work" jieba-0.42.1/PKG-INFO
cp "$work/pypinyin-0.55.0/README.rst" "$work/pypinyin-0.55.0/CHANGELOG.rst" "$out/"
cp "$work/jieba-0.42.1/PKG-INFO" "$out/jieba-PKG-INFO.txt"
sha256sum "$out"/*
