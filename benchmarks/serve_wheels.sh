#!/usr/bin/env bash
# The serve row of generation_throughput.py needs fastapi and uvicorn, which the device image lacks: download
# their wheels (x86-64, Python 3.12) into .whl/ here, then carry ".whl" and begin the device command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src || exit;
# The versions are the ones the test environment runs; the rest of fastapi's needs (anyio, h11, click, ...) are there.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx "/.whl/" .git/info/exclude || echo "/.whl/" >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 \
  typing-inspection==0.4.5 python-multipart==0.0.34 opentelemetry-api==1.45.2 typing_extensions==4.16.0
du -sh .whl
