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
# Grad-CAM for four faces, one per age group, as a grid of backbones (the paper's Figure 4).
faces=$(ls "$DATA" | awk -F_ '$1<=25{a=a?a:$0} $1>25&&$1<=50{b=b?b:$0} $1>50&&$1<=75{c=c?c:$0} $1>75{d=d?d:$0} END{print a, b, c, d}')
(cd "$DATA" && ../../$BIN/explain $faces $(for b in mobilenet_v2 resnet50 efficientnet_b0; do echo -c "../../$OUT/heads/$b"; done) -o "../../$OUT/cam") \
    || echo "(explain reported a problem; see above)"
echo
echo "demo done: $OUT/features.h5, $OUT/heads/*, $OUT/eval/comparison.md, $OUT/cam/grid_gradcam.png"
