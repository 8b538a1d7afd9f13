#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Real-weight and full-data
# tests run when ../shared holds UTKFace and the ImageNet weights, else skip.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${TORCH_HOME:-}" ] && [ -d ../shared/torch/hub/checkpoints ]; then
    export TORCH_HOME="$(cd ../shared/torch && pwd)"
fi
exec .venv/bin/python -m pytest -q "$@"
