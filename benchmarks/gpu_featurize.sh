#!/usr/bin/env bash
# The first GPU run: which libraries it really uses, the speed, and the proof (featurize --verify).
#
#   bash benchmarks/gpu_featurize.sh                    # writes into $OUT (default /tmp/gpu_featurize)
#   REQUIRE_FROM=features.h5 bash benchmarks/gpu_featurize.sh   # demand that file's torch/torchvision/DALI
#   PYTHON=/path/to/python N=2000 SKIP_SPEED=1 ...      # other interpreter, fewer images, verify only
#
# 1. Versions. Prints the python, torch, torchvision and DALI this run imports (from the interpreter
#    it runs, $PYTHON, default .venv/bin/python, else python3) and fails when they are not
#    the ones required (exit 1): those recorded in REQUIRE_FROM's `versions` attribute when given (the cache
#    the GPU features must match), else the pins scripts/setup.sh installs.
# 2. Speed: benchmarks/featurize.py on a full-UTKFace-sized set (23,708 200x200 JPEGs made from the
#    shipped sample under new names; UTKFace itself cannot travel to a lent machine), random-init weights.
# 3. Proof: featurize the 96-image sample on the GPU with every GPU decoder there is (DALI if it
#    imports, and torchvision's nvJPEG), all three backbones with BatchNorm statistics calibrated on
#    random inputs (random init alone gives features ~1e-9, which float16 stores as 0; ImageNet
#    weights may not be on the machine), then `--verify 32` against the CPU reference path.
#    A mismatch exits 1; nothing here installs anything.
# 4. The GPU tests (`pytest -m gpu`, failing rather than skipping when no GPU is seen) and the
#    train-head benchmark on CUDA (SKIP_TESTS=1 leaves both out).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
OUT="${OUT:-/tmp/gpu_featurize}"
N="${N:-23708}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

echo "== versions (interpreter: $PYTHON)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not found"
"$PYTHON" - "$OUT/versions.json" "${REQUIRE_FROM:-}" <<'EOF'
import json, re, sys
from pathlib import Path

found = {"python": sys.version.split()[0]}
try:
    import torch, torchvision
except ImportError as err:
    sys.exit(f"error: {sys.executable} cannot import torch/torchvision ({err}); set PYTHON to the project's venv")
found.update(torch=torch.__version__, torchvision=torchvision.__version__, cuda=torch.version.cuda,
             gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import nvidia.dali
    found["dali"] = nvidia.dali.__version__
except (ImportError, OSError):
    found["dali"] = None
for key, value in found.items():
    print(f"  {key:12s} {value}")
Path(sys.argv[1]).write_text(json.dumps(found, indent=1))

base = lambda v: None if v is None else str(v).split("+")[0]  # 2.14.1+cu130 -> 2.14.1
if sys.argv[2]:
    import h5py
    with h5py.File(sys.argv[2], "r") as h5:
        required = json.loads(h5.attrs["versions"])
    source = f"{sys.argv[2]} (attribute versions)"
    keys = ["torch", "torchvision"] + (["dali"] if required.get("dali") else [])
else:
    setup = Path("scripts/setup.sh").read_text()
    required = dict(re.findall(r"\b(torch|torchvision)==([\w.]+)", setup))
    source = "scripts/setup.sh pins"
    keys = ["torch", "torchvision"]
wrong = [f"{k} {found.get(k)} (required {required.get(k)})" for k in keys if base(found.get(k)) != base(required.get(k))]
if wrong:
    sys.exit("error: this interpreter does not run the library versions the features require, from "
             f"{source}: " + "; ".join(wrong) + ". Use the matching environment (PYTHON=...), "
             "or featurize again with these versions.")
if not found["gpu"]:
    sys.exit("error: torch sees no CUDA GPU here; this script is for the GPU machine")
print(f"  versions match {source}")
EOF

if [ -z "${SKIP_SPEED:-}" ]; then
    echo "== speed: $N images, 3 backbones x 2 views"
    "$PYTHON" -m benchmarks.featurize --images "$N" --data sample/utkface --device cuda \
        --decoder auto --modes a,c --weights none --batch-size 256 --no-double --json "$OUT/gpu_featurize.json"
fi

echo "== verify: GPU features against the CPU reference path"
"$PYTHON" - "$OUT/weights" <<'EOF'
# BatchNorm statistics from random inputs: features of order 1 without downloading anything.
import sys
from pathlib import Path
import torch, torchvision

folder = Path(sys.argv[1]); folder.mkdir(parents=True, exist_ok=True)
torch.manual_seed(0)
for name in ("mobilenet_v2", "resnet50", "efficientnet_b0"):
    path = folder / f"{name}_calibrated.pth"
    if path.exists():
        continue
    model = getattr(torchvision.models, name)(weights=None).cuda()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 224, 224, device="cuda"))
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
EOF
WEIGHTS="mobilenet_v2=$OUT/weights/mobilenet_v2_calibrated.pth,resnet50=$OUT/weights/resnet50_calibrated.pth,efficientnet_b0=$OUT/weights/efficientnet_b0_calibrated.pth"
DECODERS="torch"
if "$PYTHON" -c "import nvidia.dali" 2>/dev/null; then DECODERS="dali torch"; fi
status=0
for decoder in $DECODERS; do
    echo "-- decoder $decoder on the GPU, float16 autocast"
    rm -f "$OUT/verify_$decoder.h5"
    if ! "$PYTHON" featurize.py sample/utkface -o "$OUT/verify_$decoder.h5" --device cuda --decoder "$decoder" \
            --weights "$WEIGHTS" --batch-size 32 --quiet --verify 32; then
        status=1
    fi
    "$PYTHON" featurize.py verify "$OUT/verify_$decoder.h5" --data sample/utkface -n 96 --weights "$WEIGHTS" \
        --json "$OUT/verify_$decoder.json" > "$OUT/verify_$decoder.txt" || status=1
done
if [ "$status" != 0 ]; then
    echo "FAILED: the GPU features differ from the CPU reference beyond the tolerance (see above and $OUT/verify_*.txt)"
fi

# 4. The GPU tests (a GPU run must not pass by skipping them) and a GPU train-head sweep.
if [ -z "${SKIP_TESTS:-}" ]; then
    echo "== GPU tests (pytest -m gpu)"
    if "$PYTHON" -c "import pytest" 2>/dev/null; then
        FROZEN_AGE_REQUIRE_GPU=1 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests || status=1
    else
        echo "pytest is not installed for $PYTHON: GPU tests not run"; status=1
    fi
    echo "== train-head on the GPU (synthetic features of the real shapes)"
    "$PYTHON" -m benchmarks.train_head --device cuda --no-seed | tee "$OUT/train_head_gpu.txt" || status=1
fi
exit "$status"
