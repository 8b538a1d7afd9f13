"""evaluate writes nothing on bad input, never writes over its inputs, and escapes CSV cells."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.evaluate import main as evaluate_cli
from pipeline.cli.train_head import main as train_head_cli
from pipeline.evaluation.evaluate import FeatureInputs, evaluate_checkpoint
from pipeline.heads.checkpoint import load_checkpoint
from tests.support.synthetic import make_feature_file, reseal

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    features = make_feature_file(root / "f.h5", n=200, widths={"mobilenet_v2": (8, 4)})
    with h5py.File(features, "r+") as h5:   # a picture whose name a spreadsheet would run as a formula
        paths = h5["meta/path"].asstr()[()].astype(object)
        paths[:] = ["=" + p if i % 2 else "@" + p for i, p in enumerate(paths)]
        del h5["meta/path"]
        h5.create_dataset("meta/path", data=paths, dtype=h5py.string_dtype("utf-8"))
    reseal(features)
    result = CliRunner().invoke(train_head_cli, [str(features), "--backbones", "mobilenet_v2", "-o", str(root / "head"),
                                                 "--epochs", "2", "--device", "cpu", "--threads", "1", "--quiet"])
    assert result.exit_code in (0, 3), result.output
    return root


def test_prediction_csv_cells_are_escaped(trained, tmp_path):
    result = CliRunner().invoke(evaluate_cli, [str(trained / "head"), "--features", str(trained / "f.h5"),
                                               "-o", str(tmp_path / "out")])
    assert result.exit_code in (0, 3), result.output
    with (tmp_path / "out" / "head" / "predictions.csv").open(newline="") as handle:
        files = [row["file"] for row in csv.DictReader(handle)]
    assert files and all(f[:2] in ("'=", "'@") for f in files)


def test_an_edited_settings_attribute_stops_evaluate_before_it_writes(trained, tmp_path):
    edited = tmp_path / "edited.h5"
    edited.write_bytes((trained / "f.h5").read_bytes())
    with h5py.File(edited, "r+") as h5:
        settings = json.loads(h5.attrs["settings"])
        settings["group_edges"] = [10, 20, 116]
        h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
    result = CliRunner().invoke(evaluate_cli, [str(trained / "head"), "--features", str(edited),
                                               "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "changed after the file was written" in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_evaluate_never_writes_over_a_feature_file_or_head(trained, tmp_path):
    for target in (trained / "head", trained / "f.h5"):
        before = sorted(p.stat().st_mtime_ns for p in ([target] if target.is_file() else target.iterdir()))
        result = CliRunner().invoke(evaluate_cli, [str(trained / "head"), "--features", str(trained / "f.h5"),
                                                   "-o", str(target)])
        assert result.exit_code in (1, 2) and "Traceback" not in result.output, result.output
        assert sorted(p.stat().st_mtime_ns for p in ([target] if target.is_file() else target.iterdir())) == before


def test_a_head_giving_non_finite_probabilities_is_refused_before_any_output(trained):
    checkpoint = load_checkpoint(trained / "head")
    with torch.no_grad():
        checkpoint.head.feature_std.zero_()   # a head built in memory, past load's checks
    inputs = FeatureInputs(trained / "f.h5")
    with pytest.raises(ValueError, match="not finite"):
        evaluate_checkpoint(checkpoint, "head", trained / "head", inputs, "test", None, False)
    assert np.isfinite(inputs.meta["age"]).all()
