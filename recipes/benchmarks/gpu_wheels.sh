#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before using a lent GPU machine, from the repository root.
# Downloads into .whl/ (in .gitignore) the wheels the device image lacks or has in older versions
# than pyproject.toml requires: the image has torch, accelerate, peft, safetensors, tokenizers,
# huggingface-hub, pyarrow, pandas, xxhash, matplotlib, ... but transformers 5.17 (we need >= 5.23) and no
# datasets / evaluate / opacus / dill / multiprocess. Python there is 3.12 (x86-64).
# Then pass `carry: [".whl"]` to the device tool; gpu_run.sh installs them into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"  # any interpreter with pip; the wheels are for the device's Python 3.12 anyway
mkdir -p .whl
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d .whl \
  transformers==5.23.0 datasets==5.2.0 evaluate==0.4.6 opacus==1.6.0 dill==0.4.1 multiprocess==0.70.19
du -sh .whl && ls .whl
