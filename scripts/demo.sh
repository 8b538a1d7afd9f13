#!/usr/bin/env bash
# The main job on the shipped 96-face sample (or DATA=/path/to/UTKFace):
# featurize with all three backbones -> the paper's head on each -> evaluate -> Grad-CAM.
# With 96 faces the accuracies are only a smoke test; see README "Results" for the full set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -z "${TORCH_HOME:-}" ] && [ -d ../shared/torch/hub/checkpoints ]; then
    export TORCH_HOME="$(cd ../shared/torch && pwd)"
fi
OUT="${OUT:-demo}"
DATA="${DATA:-sample/utkface}"
BIN=.venv/bin
mkdir -p "$OUT"

$BIN/featurize "$DATA" -o "$OUT/features.h5"
for backbone in mobilenet_v2 resnet50 efficientnet_b0; do
    $BIN/train-head "$OUT/features.h5" --backbones "$backbone" -o "$OUT/heads/$backbone" --quiet
done
$BIN/evaluate "$OUT"/heads/* --features "$OUT/features.h5" --split test --tta -o "$OUT/eval"
# Grad-CAM for the first test face of each age group, as a grid of backbones (the paper's Figure 4).
mapfile -t faces < <($BIN/python - "$OUT/features.h5" "$DATA" <<'PY'
import sys
from pipeline.features.read import read_meta
meta = read_meta(sys.argv[1])
for group in range(4):
    rows = [i for i in range(len(meta["path"])) if meta["split"][i] == "test" and meta["group"][i] == group]
    if rows:
        print(f"{sys.argv[2]}/{meta['path'][rows[0]]}")
PY
)
$BIN/explain "${faces[@]}" -c "$OUT/heads/mobilenet_v2" -c "$OUT/heads/resnet50" -c "$OUT/heads/efficientnet_b0" \
    -o "$OUT/cam"
echo
echo "demo done: $OUT/features.h5, $OUT/heads/*, $OUT/eval/comparison.md, $OUT/cam/grid_gradcam.png"
