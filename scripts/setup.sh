#!/usr/bin/env bash
# Create .venv and install the project with its test extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# The one torch/torchvision pair that imports together (see docs/install.md).
.venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -e ".[test]"
# h5ls is optional (one test uses it); install it where apt works.
if ! command -v h5ls >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && apt-get install -y -qq hdf5-tools) >/dev/null 2>&1 || echo "note: hdf5-tools not installed; the h5ls test will skip"
fi
