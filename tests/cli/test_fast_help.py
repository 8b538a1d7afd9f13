"""--help and usage errors answer without importing the heavy libraries (torch, torchvision, DALI, ONNX Runtime).

Each case runs the command in a fresh interpreter and lists the heavy modules loaded when it exits.
How long --help takes is measured by `python -m benchmarks.cli_help`, not here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.support.paths import REPO

HEAVY = ("torch", "torchvision", "nvidia.dali", "onnxruntime")

COMMANDS = {
    "featurize": "pipeline.cli.featurize",
    "train-head": "pipeline.cli.train_head",
    "evaluate": "pipeline.cli.evaluate",
    "predict": "pipeline.cli.predict",
    "explain": "pipeline.cli.explain",
}

PROBE = """
import json, sys
sys.argv = [{name!r}, *{args!r}]
from {module} import main
try:
    main()
    code = 0
except SystemExit as exit:
    code = exit.code if isinstance(exit.code, int) else 1
print(json.dumps({{"code": code, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def run_command(name: str, *args: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules loaded, output) of `name args` in a fresh interpreter."""
    script = PROBE.format(name=name, args=list(args), module=COMMANDS[name], heavy=HEAVY)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return report["code"], report["heavy"], done.stdout + done.stderr


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_imports_no_heavy_library(name):
    code, heavy, output = run_command(name, "--help")
    assert code == 0 and "Usage:" in output, output
    assert heavy == [], f"{name} --help imported {', '.join(heavy)}"


@pytest.mark.parametrize("name, args", [
    ("featurize", ["--no-such-option"]),
    ("featurize", ["merge"]),                       # missing shard files
    ("train-head", []),                             # missing FEATURES_FILE
    ("train-head", ["f.h5", "--backbones", "mobilenet_v2", "-o", "out", "--recipe", "fastest"]),
    ("evaluate", ["-o", "out"]),                    # missing -f/--feature-file
    ("explain", ["picture.jpg"]),                   # missing -c/--checkpoint
    ("predict", ["--no-such-option"]),
])
def test_usage_errors_import_no_heavy_library(name, args):
    code, heavy, output = run_command(name, *args)
    assert code == 2, output
    assert heavy == [], f"{name} {' '.join(args)} imported {', '.join(heavy)}"


def test_featurize_help_shows_the_main_options_and_the_commands():
    code, _, output = run_command("featurize", "--help")
    assert code == 0
    for option in ("-o, --out FILE", "--backbones", "--bins", "--faces", "--labels", "--engine", "--shard"):
        assert option in output, option
    for command in ("merge", "join", "info", "verify"):
        assert f"  {command} " in output, command
    assert "featurize [DATA_DIR] [OPTIONS]" in output


def test_the_names_offered_before_import_are_the_librarys():
    """The option choices known without importing torch match the library's own lists."""
    from pipeline.backbones.registry import DEFAULT_BACKBONES, DEFAULT_WEIGHTS
    from pipeline.cli import options
    from pipeline.explain.cam import METHODS as CAM_METHODS
    from pipeline.heads.calibration import METHODS as CALIBRATION_METHODS

    assert options.BACKBONE_NAMES == DEFAULT_BACKBONES
    assert options.DEFAULT_WEIGHTS == DEFAULT_WEIGHTS
    assert options.CAM_METHODS == tuple(CAM_METHODS)
    assert options.CALIBRATION_METHODS == tuple(CALIBRATION_METHODS)
