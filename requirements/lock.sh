#!/usr/bin/env bash
# Regenerates requirements/locked.txt: every direct dependency at the floor pyproject.toml declares
# (uv's lowest-direct resolution), everything else at the newest release compatible with those, and
# torch pinned to the CPU build CI installs. CI runs the suite on this set and on the newest releases
# the ranges allow (see .ci/run), so the floors in pyproject.toml are tested, not just declared.
#   pip install uv && bash requirements/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-uv}"
echo "torch==2.13.0" > /tmp/hf_gradext_torch_pin.txt
"$UV" pip compile pyproject.toml --extra dev --resolution lowest-direct --python-version 3.11 \
    -c /tmp/hf_gradext_torch_pin.txt --no-header --quiet --no-annotate -o requirements/locked.txt
sed -i '1i # The known-good set: floors of pyproject.toml, tested by CI. Regenerate: bash requirements/lock.sh' \
    requirements/locked.txt
