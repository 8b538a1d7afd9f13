"""featurize --verify / featurize verify: recompute rows on the CPU reference path, report, fail beyond tolerance.

On the CPU twins: the file is made with DALI on the CPU when DALI imports (else
torch with another batch size) and checked against torch-cpu float32; a file
whose stored features were tampered with must fail, loudly and with exit 1.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.featurize import main as featurize_main
from pipeline.features.verify import (
    DECODE_TOLERANCE,
    ONE_LEVEL,
    VerifyError,
    pick_rows,
    tolerance_for,
    verify_file,
)
from pipeline.images.dali_decoder import dali_available


def _featurize(folder, out, fast, *extra) -> None:
    result = CliRunner().invoke(featurize_main, [str(folder), "-o", str(out), "--device", "cpu", *fast, *extra])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def twin_file(tmp_path_factory, calibrated_mobilenet):
    """12 faces featurized on the CPU twin of the GPU path: DALI's graph on the CPU if DALI imports."""
    from tests.support.folders import write_utk_folder

    root = tmp_path_factory.mktemp("verify")
    folder = root / "utk"
    write_utk_folder(folder, [3, 12, 20, 25, 26, 33, 47, 51, 60, 75, 80, 101])
    out = root / "twin.h5"
    decoder = ["--decoder", "dali"] if dali_available() else ["--decoder", "torch", "--batch-size", "5"]
    result = CliRunner().invoke(featurize_main, [str(folder), "-o", str(out), "--device", "cpu", "--engine", "torch",
                                                 "--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet),
                                                 "--quiet", *decoder])
    assert result.exit_code == 0, result.output
    return {"folder": folder, "out": out, "weights": str(calibrated_mobilenet),
            "decoder": "dali-cpu" if dali_available() else "torch-cpu"}


def test_verify_command_passes_on_the_cpu_twin_and_reports_each_number(twin_file, tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(featurize_main, [
        "verify", str(twin_file["out"]), "--data", str(twin_file["folder"]), "-n", "12", "--seed", "3",
        "--weights", f"mobilenet_v2={twin_file['weights']}", "--batch-size", "4", "--json", str(report_path)])
    assert result.exit_code == 0, result.output
    assert "verify: passed" in result.output
    report = json.loads(report_path.read_text())
    assert report["ok"] and len(report["rows"]) == 12
    assert {(o["backbone"], o["output"]) for o in report["outputs"]} == {("mobilenet_v2", "features"),
                                                                       ("mobilenet_v2", "stages")}
    for check in report["outputs"]:
        assert check["min_cosine"] > 0.9999 and check["scale"] > 0.1  # real, non-vanishing features compared
        # float16 storage: each value is within half a float16 step (2^-11 relative) of the float32 reference
        assert check["max_abs"] <= 2.0 ** -10 * check["scale"]
    (decoded,) = report["decoded"]
    assert decoded["decoder"] == twin_file["decoder"] and decoded["max_abs"] is not None
    assert decoded["max_abs"] <= DECODE_TOLERANCE[twin_file["decoder"]] <= ONE_LEVEL


@pytest.mark.slow
def test_verify_torch_against_itself_with_another_batch_size_is_exact(twin_file, tmp_path):
    out = tmp_path / "torch.h5"
    _featurize(twin_file["folder"], out, ["--backbones", "mobilenet_v2", "--weights", twin_file["weights"],
                                          "--quiet"], "--decoder", "torch", "--engine", "torch", "--dtype",
               "float32", "--batch-size", "5")
    report = verify_file(out, twin_file["folder"], n=7, seed=1, weights={"mobilenet_v2": twin_file["weights"]},
                         batch_size=3, reference_batch_size=4)
    assert report.ok, "\n".join(report.lines())
    assert [d.decoder for d in report.decoded] == ["torch-cpu"] and report.decoded[0].max_abs == 0.0
    for check in report.outputs:  # float32 file, float32 reference: float rounding only
        assert check.min_cosine > 0.999999 and check.max_abs <= 1e-4 * check.scale


def test_verify_fails_loudly_on_tampered_features(twin_file, tmp_path):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(twin_file["out"].read_bytes())
    with h5py.File(bad, "r+") as h5:  # one row's plain view shifted by one feature: plausible numbers, wrong ones
        h5["features/mobilenet_v2"][5, 0] = np.roll(h5["features/mobilenet_v2"][5, 0], 1)
    result = CliRunner().invoke(featurize_main, [
        "verify", str(bad), "--data", str(twin_file["folder"]), "-n", "12",
        "--weights", f"mobilenet_v2={twin_file['weights']}"])
    assert result.exit_code == 1, result.output
    assert "mobilenet_v2 features" in result.output and "FAIL" in result.output
    assert "verify failed" in result.output and "Traceback" not in result.output
    stages_line = next(line for line in result.output.splitlines() if "mobilenet_v2 stages" in line)
    assert stages_line.endswith(" ok")  # only the tampered output is blamed


def test_verify_missing_images_and_weights_are_one_line_errors(twin_file, tmp_path):
    empty = tmp_path / "moved"
    empty.mkdir()
    moved = CliRunner().invoke(featurize_main, ["verify", str(twin_file["out"]), "--data", str(empty),
                                                "--weights", f"mobilenet_v2={twin_file['weights']}"])
    assert moved.exit_code == 1 and "image not found" in moved.output and "--data" in moved.output
    no_weights = CliRunner().invoke(featurize_main, ["verify", str(twin_file["out"]), "--data",
                                                     str(twin_file["folder"])])
    assert no_weights.exit_code == 1 and "--weights mobilenet_v2=" in no_weights.output
    with pytest.raises(VerifyError, match="not a feature file|does not exist"):
        verify_file(tmp_path / "nothing.h5", twin_file["folder"])


@pytest.mark.slow
def test_run_with_verify_flag_prints_the_report(twin_file, tmp_path, fast):
    out = tmp_path / "run.h5"
    result = CliRunner().invoke(featurize_main, [str(twin_file["folder"]), "-o", str(out), "--device", "cpu",
                                                 "--decoder", "torch", "--verify", "4", *fast])
    assert result.exit_code == 0, result.output
    assert "computed with: cpu float32, decoder torch-cpu" in result.output
    assert "verify: 4 rows" in result.output and "verify: passed" in result.output


def test_tolerance_follows_how_the_file_was_computed():
    cpu32 = tolerance_for({"precision": "float32", "decoder": "torch-cpu"}, "float32")
    stored16 = tolerance_for({"precision": "float32", "decoder": "torch-cpu"}, "float16")
    gpu16 = tolerance_for({"precision": "float16-autocast", "decoder": "dali-gpu"}, "float16")
    bf16 = tolerance_for({"precision": "bfloat16-autocast", "decoder": "torch-cpu"}, "float16")
    assert cpu32.min_cosine > stored16.min_cosine > gpu16.min_cosine > bf16.min_cosine
    assert cpu32.max_relative <= stored16.max_relative < gpu16.max_relative < bf16.max_relative
    assert pick_rows(100, 5, 0) == pick_rows(100, 5, 0) != pick_rows(100, 5, 1)
    assert pick_rows(3, 10, 0) == [0, 1, 2]
