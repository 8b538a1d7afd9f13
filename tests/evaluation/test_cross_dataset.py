"""Cross-dataset evaluation: a head trained on one data set scored on another's feature file,
side by side with its in-domain score, and refused when the two feature files do not match."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli.evaluate import main as evaluate_main
from pipeline.cli.featurize import main as featurize_cli
from pipeline.cli.train_head import main as train_head_cli
from pipeline.evaluation.evaluate import cross_dataset_overlap
from pipeline.features.read import read_features, read_meta
from pipeline.heads.checkpoint import load_checkpoint
from tests.support.synthetic import reseal
from tests.support.folders import face_like, write_utk_folder


def invoke(command, *args, ok=(0,)):
    result = CliRunner().invoke(command, [str(a) for a in args])  # output holds stdout and stderr
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in ok, result.output
    return result


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory, calibrated_mobilenet):
    """Data set A: 40 UTKFace-named crops; data set B: 12 other pictures labelled by a CSV. A head on A."""
    root = tmp_path_factory.mktemp("cross")
    common = ["--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--quiet",
              "--device", "cpu", "--decoder", "torch"]
    write_utk_folder(root / "a", [a for base in (8, 35, 60, 88) for a in range(base, base + 10)])
    invoke(featurize_cli, root / "a", "-o", root / "a.h5", *common)

    (root / "b" / "img").mkdir(parents=True)
    rows = [["file_name", "real_age"]]
    for i, age in enumerate([3, 15, 22, 27, 33, 49, 52, 64, 70, 77, 85, 101]):
        Image.fromarray(face_like(500 + i)).save(root / "b" / "img" / f"{i:06d}.jpg", quality=90)
        rows.append([f"img/{i:06d}.jpg", str(age)])
    with (root / "b" / "gt.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    invoke(featurize_cli, root / "b", "-o", root / "b.h5", *common, "--labels", root / "b" / "gt.csv",
           "--label-preset", "appa-real")

    invoke(train_head_cli, root / "a.h5", "--backbones", "mobilenet_v2", "-o", root / "head", "--epochs", "3",
           "--device", "cpu", "--threads", "1", "--quiet", ok=(0, 3))
    return root


def test_cross_dataset_rows_sit_beside_in_domain_rows(two_datasets, tmp_path):
    root = two_datasets
    out = tmp_path / "eval"
    result = invoke(evaluate_main, root / "head", "--features", root / "a.h5", "--features", root / "b.h5",
                    "--split", "test", "--cross-split", "all", "-o", out)
    everything = json.loads((out / "metrics.json").read_text())
    rows = everything["checkpoints"]
    assert set(rows) == {"head@a.h5", "head@b.h5"}
    a, b = rows["head@a.h5"], rows["head@b.h5"]
    assert (a["domain"], a["split"], a["dataset"]) == ("in-domain", "test", "UTKFace names")
    assert (b["domain"], b["split"]) == ("cross-domain", "all")
    assert b["dataset"] == "labels file gt.csv, preset appa-real"
    assert a["n"] == int(np.sum(read_meta(root / "a.h5")["split"] == "test")) and b["n"] == 12
    assert [f["dataset"] for f in everything["feature_files"]] == ["UTKFace names", "labels file gt.csv, preset appa-real"]

    # The cross-domain numbers are the head's on B's cached features, computed here independently.
    head = load_checkpoint(root / "head")
    x = torch.from_numpy(read_features(root / "b.h5", "mobilenet_v2")[:, 0])
    with torch.no_grad():
        pred = head.head(x).argmax(1).numpy()
    truth = read_meta(root / "b.h5")["group"]
    assert b["accuracy"] == pytest.approx(float(np.mean(pred == truth)))
    predictions = list(csv.DictReader((out / "head@b.h5" / "predictions.csv").open()))
    assert [r["file"] for r in predictions] == [f"img/{i:06d}.jpg" for i in range(12)]

    # comparison.md: one line per (head, file), marked with its file and domain, next to each other.
    lines = (out / "comparison.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| checkpoint"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    table = [dict(zip(columns, (c.strip() for c in line.strip("|").split("|"))))
             for line in lines if line.startswith("| head@")]
    assert [(r["checkpoint"], r["data"], r["domain"], r["split"]) for r in table] == [
        ("head@a.h5", "a.h5", "in-domain", "test"), ("head@b.h5", "b.h5", "cross-domain", "all")]
    assert any("labels file gt.csv" in line for line in lines)
    # B shares no picture with A: no leak warning for the cross-domain row.
    assert "cross-dataset:" not in result.output


def test_cross_dataset_finds_images_shared_with_the_training_data(two_datasets, tmp_path, calibrated_mobilenet):
    """A copy of A's pictures labelled by a CSV is another 'data set', but the overlap is counted."""
    root = two_datasets
    meta = read_meta(root / "a.h5")
    with (tmp_path / "labels.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "age"]] + [[p, int(a)] for p, a in zip(meta["path"], meta["age"])])
    invoke(featurize_cli, root / "a", "-o", tmp_path / "copy.h5", "--backbones", "mobilenet_v2",
           "--weights", calibrated_mobilenet, "--quiet", "--device", "cpu", "--decoder", "torch",
           "--labels", tmp_path / "labels.csv", "--limit", "8")
    result = invoke(evaluate_main, root / "head", "--features", tmp_path / "copy.h5", "--split", "all",
                    "-o", tmp_path / "o")
    summary = json.loads((tmp_path / "o" / "metrics.json").read_text())["checkpoints"]["head"]
    assert summary["domain"] == "cross-domain" and summary["n"] == 8
    train_val = int(np.sum(np.isin(meta["split"][:8], ["train", "val"])))
    assert train_val > 0
    assert any(f"cross-dataset: {train_val} of the 8 scored images are byte-identical" in w
               for w in summary["warnings"])


def _edited_copy(source: Path, target: Path, **changes) -> Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as h5:
        settings = json.loads(h5.attrs["settings"])
        for key, value in changes.items():
            if value is None:
                settings.pop(key, None)
            else:
                settings[key] = value
        h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
    return reseal(target)   # a file featurized with those settings, not a hand-edited one


@pytest.mark.parametrize("changes, named", [
    ({"weights": {"mobilenet_v2": "IMAGENET1K_V1"}}, "weights of mobilenet_v2"),
    ({"preprocessing": {"size": 256}}, "preprocessing"),
    ({"faces": {"mode": "detect", "detector": "mtcnn"}}, "face handling (--faces)"),
    ({"backbones": ["resnet50"], "weights": {"resnet50": "none"}}, "missing mobilenet_v2"),
])
def test_mismatched_feature_files_are_refused_naming_what_differs(two_datasets, tmp_path, changes, named):
    root = two_datasets
    other = _edited_copy(root / "b.h5", tmp_path / "other.h5", **changes)
    result = invoke(evaluate_main, root / "head", "--features", root / "a.h5", "--features", other,
                    "--split", "all", "-o", tmp_path / "out", ok=(1,))
    assert f"does not fit feature file {other}" in result.output and named in result.output
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_other_bins_without_ages_are_refused(two_datasets, tmp_path):
    """A file on other bins is scored against its ages regrouped into the head's (tests/cli/test_bins.py);
    one with rows labelled by a group only (age -1) cannot be regrouped, and is refused before any output."""
    root = two_datasets
    other = _edited_copy(root / "b.h5", tmp_path / "other.h5", group_edges=[30, 60, 116])
    with h5py.File(other, "r+") as h5:
        h5["meta/age"][0] = -1
    reseal(other)
    result = invoke(evaluate_main, root / "head", "--features", root / "a.h5", "--features", other,
                    "--split", "all", "-o", tmp_path / "out", ok=(1,))
    assert str(other) in result.output and "labelled with a group only (stored age -1)" in result.output
    assert not (tmp_path / "out").exists()


def test_training_file_is_found_from_another_folder(two_datasets, tmp_path, monkeypatch):
    """New heads record their training file absolute; an older head's relative path is tried against the
    checkpoint folder's parent too, so the overlap check works from any folder."""
    root = two_datasets
    monkeypatch.chdir(root)
    invoke(train_head_cli, "a.h5", "--backbones", "mobilenet_v2", "-o", tmp_path / "new_head", "--epochs", "1",
           "--device", "cpu", "--threads", "1", "--quiet", ok=(0, 3))
    recorded = load_checkpoint(tmp_path / "new_head").meta["feature_file"]
    assert Path(recorded).is_absolute() and Path(recorded) == root / "a.h5"

    monkeypatch.chdir(tmp_path)   # a.h5 is not here; it sits beside the (old-style) head folder
    meta = read_meta(root / "a.h5")
    train_val = int(np.sum(np.isin(meta["split"][:8], ["train", "val"])))
    old_style = {"feature_file": "a.h5"}
    warnings = cross_dataset_overlap(old_style, meta["sha256"][:8].tolist(), root / "head")
    assert warnings == [f"cross-dataset: {train_val} of the 8 scored images are byte-identical to images in the "
                        f"train/val split of the head's training file {root / 'a.h5'}"]
    assert "cannot be read" in cross_dataset_overlap(old_style, [], tmp_path / "elsewhere")[0]
