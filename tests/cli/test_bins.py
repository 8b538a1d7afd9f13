"""train-head --bins: heads on other age groups from the stored ages, scored by evaluate against the same groups."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cli.evaluate import main as evaluate_main
from pipeline.cli.exit_codes import FAILED, OK, USAGE
from pipeline.cli.train_head import main as train_head_main
from pipeline.constants import group_names
from pipeline.features.read import read_meta
from pipeline.heads.checkpoint import load_checkpoint
from pipeline.heads.data import load_training_data
from pipeline.heads.regroup import RegroupError, regroup_training_set
from pipeline.ingest.dataset import age_to_group
from tests.support.cli import invoke
from tests.support.synthetic import make_feature_file, reseal

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTHS = {"mobilenet_v2": (32, 16)}
QUICK = ["--epochs", "3", "--hidden", "16,8", "--device", "cpu", "--threads", "1", "--quiet"]
BINS = (18, 30, 45, 60, 116)


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory) -> Path:
    """Default bins (0-25, 26-50, 51-75, 76-116), every row with an age."""
    return make_feature_file(tmp_path_factory.mktemp("bins") / "features.h5", n=400, widths=WIDTHS)


@pytest.fixture(scope="module")
def group_only(feature_file, tmp_path_factory) -> Path:
    """The same file with some rows labelled by their group only (age -1), as a 'group' label column gives."""
    path = tmp_path_factory.mktemp("group_only") / "groups.h5"
    shutil.copy(feature_file, path)
    with h5py.File(path, "r+") as h5:
        ages = h5["meta/age"][()]
        ages[::7] = -1
        h5["meta/age"][...] = ages
    return reseal(path)


def test_regrouped_training_set_follows_the_ages_and_keeps_the_split(feature_file):
    loaded = load_training_data(feature_file, ["mobilenet_v2"])
    regrouped = regroup_training_set(loaded, BINS)
    data = regrouped.data
    assert data.n_classes == 5 and data.group_edges == BINS and regrouped.group_edges == list(BINS)
    for ages, groups in ((data.train_age, data.train_group), (data.val_age, data.val_group)):
        np.testing.assert_array_equal(groups.numpy(), age_to_group(ages.numpy().astype(int), BINS))
    # Features, ages, split and the rows fingerprint are the loaded ones; the loaded set is unchanged.
    assert regrouped.counts == loaded.counts and regrouped.rows_fingerprint == loaded.rows_fingerprint
    assert data.train is loaded.data.train and data.val_age is loaded.data.val_age
    assert loaded.data.n_classes == 4 and int(loaded.data.train_group.max()) == 3
    assert regroup_training_set(loaded, loaded.group_edges) is loaded


def test_train_head_bins_gives_heads_of_the_new_groups_that_evaluate_scores_against_regrouped_ages(
        feature_file, tmp_path):
    out = tmp_path / "head"
    trained = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", out,
                     "--bins", "18,30,45,60,116", *QUICK)
    assert trained.exit_code == OK, trained.output
    checkpoint = load_checkpoint(out)
    assert checkpoint.meta["group_edges"] == list(BINS)
    assert checkpoint.meta["class_names"] == ["0-18", "19-30", "31-45", "46-60", "61-116"]
    assert checkpoint.head.mlp[-1].out_features == 5

    scored = invoke(evaluate_main, "-c", out, "-f", feature_file, "-o", tmp_path / "eval")
    assert scored.exit_code == OK, scored.output
    assert "regrouped" in scored.output
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoints"]["head"]
    assert metrics["class_names"] == group_names(BINS) and metrics["group_edges"] == list(BINS)

    # Every scored row's true group is its stored age in the new bins, and the accuracy is counted on those.
    meta = read_meta(feature_file)
    age_of = dict(zip(meta["path"], meta["age"]))
    with (tmp_path / "eval" / "head" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == int((meta["split"] == "test").sum()) == metrics["n"]
    names = group_names(BINS)
    for row in rows:
        assert row["true_group"] == names[int(age_to_group(int(age_of[row["file"]]), BINS))]
    correct = sum(row["true_group"] == row["predicted_group"] for row in rows)
    assert metrics["accuracy"] == pytest.approx(correct / len(rows))
    # The stored groups (4 bins) would not even fit these 5-way predictions: the regrouping is what is scored.
    assert {row["true_group"] for row in rows} - set(group_names((25, 50, 75, 116)))


def test_same_bins_as_the_file_change_nothing(feature_file, tmp_path):
    plain = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "a", *QUICK)
    same = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "b",
                  "--bins", "25,50,75,116", *QUICK)
    assert plain.exit_code == same.exit_code == OK, same.output
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a.meta["group_edges"] == b.meta["group_edges"] == [25, 50, 75, 116]
    assert a.meta["history"] == b.meta["history"]


def test_bins_on_a_file_with_group_only_rows_is_refused_in_one_line(group_only, tmp_path):
    result = invoke(train_head_main, group_only, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                    "--bins", "18,30,45,60,116", *QUICK)
    assert result.exit_code == FAILED, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(group_only) in lines[0] and "age -1" in lines[0] and "--bins" in lines[0]
    assert not (tmp_path / "h" / "head.safetensors").exists()
    with pytest.raises(RegroupError, match="labelled with a group only"):
        regroup_training_set(load_training_data(group_only, ["mobilenet_v2"]), BINS)


def test_evaluate_refuses_a_regrouped_head_on_a_file_without_ages(feature_file, group_only, tmp_path):
    out = tmp_path / "head"
    assert invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", out,
                  "--bins", "30,60,116", *QUICK).exit_code == OK
    result = invoke(evaluate_main, "-c", out, "-f", group_only, "-o", tmp_path / "eval")
    assert result.exit_code == FAILED and "group only" in result.output and "group_edges" not in result.output
    assert len(result.output.strip().splitlines()) == 1 and str(group_only) in result.output
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("bins, problem", [("18,x", "comma-separated integers"), ("30,18", "increasing"),
                                           ("18,200", "must not exceed")])
def test_bad_bins_are_a_usage_error(feature_file, tmp_path, bins, problem):
    result = invoke(train_head_main, feature_file, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                    "--bins", bins, *QUICK)
    assert result.exit_code == USAGE and problem in result.output and "--bins" in result.output
