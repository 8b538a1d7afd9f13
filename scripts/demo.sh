#!/usr/bin/env bash
# The main job on the shipped 96-face sample (or DATA=/path/to/UTKFace):
# featurize with all three backbones -> the paper's head on each -> evaluate -> Grad-CAM,
# then predict with the model shipped in the package.
# With 96 faces the accuracies are only a smoke test; see docs/results.md for the full set.
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
heads=()
for head in "$OUT"/heads/*; do heads+=(-c "$head"); done
$BIN/evaluate "${heads[@]}" -f "$OUT/features.h5" --split test --tta -o "$OUT/eval"
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
# The shipped default model on a sample picture (exit 3 means a picture was skipped, with the reason printed).
$BIN/predict "${faces[0]}" -o "$OUT/predict.json" || [ $? -eq 3 ]
echo
echo "demo done: $OUT/features.h5, $OUT/heads/*, $OUT/eval/comparison.md, $OUT/cam/grid_gradcam.png, $OUT/predict.json"
