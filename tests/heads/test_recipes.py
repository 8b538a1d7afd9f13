"""train-head --recipe: the one table, explicit options winning over it, what `best` needs from the file;
and the chunked standardization statistics that wide recipes (standardize on) rely on."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.train_head import main as train_head_main
from pipeline.features.settings import fingerprint
from pipeline.heads.config import HeadConfig
from pipeline.heads.data import HeadData, chunked_mean_std
from pipeline.heads.recipes import RECIPES, describe, recipe_options
from tests.support.synthetic import make_feature_file

SMALL = {"mobilenet_v2": (24, 12)}
STAGE_GRID_WIDTH = 13 * 4
QUICK = ["--device", "cpu", "--threads", "1", "--hidden", "16"]


@pytest.fixture(scope="module")
def plain_file(tmp_path_factory):
    return make_feature_file(tmp_path_factory.mktemp("plain") / "features.h5", n=200, widths=SMALL)


@pytest.fixture(scope="module")
def stage_grid_file(tmp_path_factory):
    """A synthetic feature file that also holds the stage_grid descriptor, as featurize --descriptors stage_grid
    writes it: /descriptors/stage_grid/<backbone> and settings["descriptors"]."""
    path = make_feature_file(tmp_path_factory.mktemp("rich") / "features.h5", n=200, widths=SMALL)
    rng = np.random.default_rng(5)
    with h5py.File(path, "r+") as h5:
        groups = h5["meta/group"][:]
        signal = rng.normal(size=(4, STAGE_GRID_WIDTH))[groups]
        plain = rng.normal(size=(len(groups), STAGE_GRID_WIDTH)) + signal
        h5["descriptors/stage_grid/mobilenet_v2"] = np.stack([plain, plain + 0.1], axis=1).astype(np.float16)
        settings = json.loads(h5.attrs["settings"])
        settings["descriptors"] = ["stage_grid"]
        h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
        h5.attrs["fingerprint"] = fingerprint(settings)
    return path


def train(feature_file, out, *options):
    result = CliRunner().invoke(train_head_main, [str(feature_file), "--backbones", "mobilenet_v2", "-o", str(out),
                                                  *QUICK, *map(str, options)])
    return result, (json.loads((out / "head.json").read_text()) if (out / "head.json").is_file() else None)


# --------------------------------------------------------------------------- the table


def test_the_table_names_real_train_head_options_and_best_builds_on_strong():
    flags = {opt: p for p in train_head_main.params for opt in p.opts}
    for name, options in RECIPES.items():
        for flag in options:
            assert flag in flags, f"recipe {name}: {flag} is not a train-head option"
            assert not flags[flag].multiple, f"recipe {name}: {flag} takes several values"
    assert RECIPES["paper"] == {}
    assert recipe_options("strong") == {"--epochs": "40", "--weight-decay": "1e-4", "--schedule": "cosine",
                                        "--label-smoothing": "0.1", "--standardize": "on", "--dropout": "0.5"}
    best = recipe_options("best")
    assert best == {**recipe_options("strong"), "--feature-kind": "both+stage_grid", "--target": "soft",
                    "--label-smoothing": "0", "--pca": "1024", "--epochs": "15", "--batch-size": "128", "--lr": "2e-3"}
    with pytest.raises(ValueError, match="unknown recipe 'fast'; choose from paper, strong, best"):
        recipe_options("fast")


def test_help_lists_every_recipe_with_its_values():
    result = CliRunner().invoke(train_head_main, ["--help"])
    assert result.exit_code == 0
    # Compared without whitespace: click wraps the help text (also after a hyphen, as in --weight-<newline>decay).
    text = "".join(result.output.split())
    for name in RECIPES:
        assert "".join(f"{name} = {describe(name)}".split()) in text
    assert "strong=--epochs40--weight-decay1e-4--schedulecosine--label-smoothing0.1--standardizeon--dropout0.5" \
        in text


# --------------------------------------------------------------------------- the command


def test_default_recipe_is_the_papers_and_changes_nothing(plain_file, tmp_path):
    result, meta = train(plain_file, tmp_path / "paper", "--epochs", "2")
    assert result.exit_code == 0, result.output
    config = meta["config"]
    assert config["recipe"] == "paper"
    defaults = HeadConfig().as_dict()
    for key in ("lr", "batch_size", "dropout", "weight_decay", "schedule", "label_smoothing", "class_weights",
                "standardize", "flip", "target"):
        assert config[key] == defaults[key], key
    assert meta["feature_kind"] == "last"
    assert meta["calibration"] == {"method": "off", "temperature": 1.0, "fitted_on": None, "objective": None}
    assert "recipe paper" not in result.output   # nothing new printed for existing users


def test_recipe_fills_defaults_and_explicit_options_win(plain_file, tmp_path):
    # --epochs 2 and --label-smoothing 0 are given explicitly: they win over the recipe's 40 and 0.1,
    # even though 0 is also train-head's own default.
    result, meta = train(plain_file, tmp_path / "strong", "--recipe", "strong", "--epochs", "2",
                         "--label-smoothing", "0")
    assert result.exit_code == 0, result.output
    config = meta["config"]
    assert config["recipe"] == "strong"
    assert config["epochs"] == 2 and len(meta["history"]) == 2
    assert config["label_smoothing"] == 0.0
    assert (config["weight_decay"], config["schedule"], config["standardize"], config["dropout"]) == \
        (1e-4, "cosine", True, 0.5)
    assert "the command line overrides --epochs, --label-smoothing" in result.output
    # The recipe's standardization is really used: the saved head carries the training statistics.
    from pipeline.heads.checkpoint import load_checkpoint

    head = load_checkpoint(tmp_path / "strong").head
    assert not torch.allclose(head.feature_std, torch.ones_like(head.feature_std))


def test_best_recipe_refuses_a_file_without_stage_grid_in_one_line(plain_file, tmp_path):
    result, meta = train(plain_file, tmp_path / "best", "--recipe", "best", "--epochs", "2")
    assert result.exit_code == 1 and meta is None
    assert result.exception is None or isinstance(result.exception, SystemExit)   # no traceback
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert str(plain_file) in lines[0] and "no stage_grid descriptor" in lines[0]
    assert "featurize DATA_DIR -o FEATURES.h5 --backbones mobilenet_v2 --descriptors stage_grid" in lines[0]
    assert "--recipe best" in lines[0]


def test_best_recipe_trains_soft_targets_on_stage_grid_and_takes_temperature_scaling_on_request(stage_grid_file,
                                                                                                  tmp_path):
    result, meta = train(stage_grid_file, tmp_path / "best", "--recipe", "best", "--epochs", "3")
    assert result.exit_code == 0, result.output
    config = meta["config"]
    assert config["recipe"] == "best"
    assert meta["feature_kind"] == "both+stage_grid" and meta["feature_dim"] == 24 + 12 + STAGE_GRID_WIDTH
    assert meta["target"] == "soft" and config["label_smoothing"] == 0.0 and config["loss"] == "soft_cross_entropy"
    assert (config["weight_decay"], config["schedule"], config["standardize"], config["dropout"]) == \
        (1e-4, "cosine", True, 0.5)
    assert meta["calibration"]["method"] == "off"    # the study found it raises ECE on soft heads
    assert (config["pca"], config["batch_size"], config["lr"]) == (1024, 128, 2e-3)
    assert meta["reduction"] is None    # every block of this small file is narrower than 1024: fed whole
    # An option given on the command line joins the recipe's values.
    result, meta = train(stage_grid_file, tmp_path / "best_t", "--recipe", "best", "--epochs", "1",
                         "--calibrate", "temperature")
    assert result.exit_code == 0, result.output
    calibration = meta["calibration"]
    assert calibration["method"] == "temperature" and calibration["temperature"] > 0
    assert "val_ece_after" in calibration and "temperature scaling (best head): T = " in result.output
    assert meta["config"]["recipe"] == "best" and meta["target"] == "soft"


# --------------------------------------------------------------------------- memory: chunked statistics


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_chunked_statistics_equal_the_one_shot_float64_ones(chunk):
    g = torch.Generator().manual_seed(0)
    # Offsets far from 0 and mixed scales: where a careless one-pass sum of squares would lose digits.
    rows = (torch.randn(301, 37, generator=g) * torch.logspace(-3, 2, 37) + torch.linspace(-500, 500, 37)).float()
    mean, std = chunked_mean_std(rows, chunk=chunk)
    assert mean.dtype == std.dtype == torch.float64
    reference = rows.double()
    torch.testing.assert_close(mean, reference.mean(0), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(std, reference.std(0), rtol=1e-9, atol=1e-12)


def test_head_data_standardization_uses_both_views_of_every_training_row():
    rng = np.random.default_rng(3)
    features = (rng.normal(size=(50, 2, 9)) * 4 + 7).astype(np.float32)
    splits = np.array(["train"] * 40 + ["val"] * 10, dtype=object)
    data = HeadData.from_arrays(features, np.zeros(50, int), np.full(50, 30), splits, (25, 50, 75, 116))
    mean, std = data.standardization()
    flat = torch.from_numpy(features[:40]).reshape(-1, 9).double()
    torch.testing.assert_close(mean, flat.mean(0).float())
    torch.testing.assert_close(std, flat.std(0).float())
