#!/usr/bin/env bash
# Prepared for a lent GPU machine (torch + torchvision, no DALI, nothing to install).
# Times featurize on a full-UTKFace-sized set: 23,708 200x200 JPEGs, 3 backbones x 2 views.
# UTKFace itself cannot travel to that machine (120 MB, the tree limit is 64 MiB), so the set
# is built from the shipped sample under new names: same size, same decode and forward work.
# Random-init weights: same speed as ImageNet weights, and nothing large to carry.
#   run: bash benchmarks/gpu_featurize.sh      (writes $OUT/gpu_featurize.json when OUT is set)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${N:-23708}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 benchmarks/featurize.py --images "$N" --data sample/utkface --device cuda \
    --decoder torch --modes a,c --weights none --batch-size 256 --no-double \
    ${OUT:+--json "$OUT/gpu_featurize.json"}
