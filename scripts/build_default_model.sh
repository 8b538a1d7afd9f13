#!/usr/bin/env bash
# Rebuild each shipped model (pipeline/models/) from UTKFace, in one command, from the repository root:
#
#   TORCH_HOME=../shared/torch scripts/build_default_model.sh [UTKFACE_DIR] [WORK_DIR]
#
# featurize (MobileNetV2, --faces detect) -> train-head with the paper and the strong recipe -> the head with
# the better validation accuracy is copied into the package with its weights hash and test_files.txt ->
# evaluate on its test split -> its test faces pasted into scenes (benchmarks/faces.py). MODEL_CARD.md quotes
# the numbers printed at the end. FEATURES=file.h5 reuses a feature file made by the same featurize command.
# BIN=folder runs the commands from that folder (e.g. .venv/bin).
set -euo pipefail

DATA=${1:-../shared/data/utkface}
WORK=${2:-build/default-model}
BIN=${BIN:+$BIN/}
PY=${PY:-${BIN}python}
NAME=mobilenet_v2_utkface_faces
MODEL=pipeline/models/$NAME
FEATURES=${FEATURES:-$WORK/mnv2_detect.h5}
mkdir -p "$WORK"

if [ ! -f "$FEATURES" ]; then
  "${BIN}featurize" "$DATA" -o "$FEATURES" --backbones mobilenet_v2 --faces detect --engine onnxruntime --device cpu
fi
for recipe in paper strong; do
  "${BIN}train-head" "$FEATURES" --backbones mobilenet_v2 --recipe "$recipe" --seed 0 -o "$WORK/$recipe"
done
"$PY" -m pipeline.models.build "$FEATURES" "$WORK/paper" "$WORK/strong" --into "$MODEL" | tee "$WORK/package.json"
# The scenes get only the model's test faces: every other UTKFace file is excluded.
ls "$DATA" | grep -vxF -f "$MODEL/test_files.txt" > "$WORK/not_test_files.txt"
"${BIN}evaluate" -c "$MODEL" -f "$FEATURES" --split test -o "$WORK/evaluate"
"$PY" -m benchmarks.faces --data "$DATA" --head "$MODEL" --exclude "$WORK/not_test_files.txt" \
  --scenes "${SCENES:-300}" --crop-faces detect --speed-backbones "" --work "$WORK/scenes" | tee "$WORK/scenes.md"
du -ch "$MODEL"/* | tail -1
