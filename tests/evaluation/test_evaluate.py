"""evaluate and predict, through their click commands, on synthetic features and test-made images."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

from pipeline.backbones.registry import create_backbone
from pipeline.cli.evaluate import main as evaluate_main
from pipeline.cli.predict import main as predict_main
from pipeline.constants import group_names
from pipeline.evaluation.evaluate import FeatureInputs, evaluate_checkpoint
from pipeline.features.read import read_features, read_meta, read_settings
from pipeline.features.writer import write_feature_file
from pipeline.heads.checkpoint import load_checkpoint, save_checkpoint
from pipeline.heads.data import effective_splits, load_head_inputs, rows_fingerprint
from pipeline.heads.model import AgeHead
from pipeline.images.views import load_rgb, preprocess_rgb
from tests.support.folders import face_like, write_utk_folder
from tests.support.imagefactory import write_garbage, write_truncated_jpeg
from tests.support.synthetic import make_feature_file, reseal

SMALL = {"mobilenet_v2": (32, 16), "resnet50": (24, 12)}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- helpers


def head_meta(settings: dict, backbones, kind: str, dim: int, target: str, hidden=()) -> dict:
    """The meta a trained checkpoint carries (see heads.py), with a short made-up history."""
    return {
        "backbones": list(backbones),
        "weights": {b: settings["weights"][b] for b in backbones},
        "feature_kind": kind,
        "group_edges": list(settings["group_edges"]),
        "class_names": group_names(settings["group_edges"]),
        "target": target,
        "feature_fingerprint": settings.get("fingerprint"),
        "preprocessing": settings["preprocessing"],
        "feature_dim": dim,
        "hidden": list(hidden),
        "config": {"epochs": 3},
        "history": [{"epoch": e, "train_loss": 1.2 / e, "train_acc": 0.5 + 0.1 * e,
                     "val_loss": 1.3 / e + 0.05 * e, "val_acc": 0.45 + 0.1 * e} for e in (1, 2, 3)],
        "best_epoch": 2,
    }


def fit_checkpoint(folder: Path, feature_file: Path, backbones=("mobilenet_v2",), kind="last",
                   target="group") -> Path:
    """A linear head fitted in closed form on the train rows (nearest centroid, or ridge for age), saved."""
    settings = read_settings(feature_file)
    meta_rows = read_meta(feature_file)
    x = np.concatenate([read_features(feature_file, b, kind) for b in backbones], axis=2)
    train = meta_rows["split"] == "train"
    plain = x[train, 0].astype(np.float64)
    mean, std = plain.mean(0), plain.std(0) + 1e-6
    z = (plain - mean) / std
    head = AgeHead(x.shape[2], (), 0.0, settings["group_edges"], target)
    layer = head.mlp[0]
    with torch.no_grad():
        head.feature_mean.copy_(torch.from_numpy(mean))
        head.feature_std.copy_(torch.from_numpy(std))
        if target == "group":
            groups = meta_rows["group"][train]
            centroids = np.stack([z[groups == k].mean(0) for k in range(len(settings["group_edges"]))])
            # Scaled down so the probabilities are not all ~1 and calibration has something to show.
            layer.weight.copy_(torch.from_numpy(0.05 * centroids))
            layer.bias.copy_(torch.from_numpy(-0.025 * (centroids ** 2).sum(1)))
        else:
            ages = meta_rows["age"][train].astype(np.float64)
            head.age_shift.fill_(ages.mean())
            head.age_scale.fill_(ages.std())
            target_std = (ages - ages.mean()) / ages.std()
            w = np.linalg.solve(z.T @ z + 10.0 * np.eye(z.shape[1]), z.T @ target_std)
            layer.weight.copy_(torch.from_numpy(w[None, :]))
            layer.bias.zero_()
    meta = head_meta(settings, backbones, kind, x.shape[2], target)
    # As train_head records it: which rows, labels and splits the head saw.
    meta["rows_fingerprint"] = rows_fingerprint(meta_rows["path"], meta_rows["age"], meta_rows["split"])
    return save_checkpoint(folder, head, meta)


def direct_probs(checkpoint_dir: Path, feature_file: Path, split="test", tta=False):
    """Probabilities, labels and ages computed without metrics.py: heads.load_head_inputs + softmax."""
    ckpt = load_checkpoint(checkpoint_dir)
    rows = np.flatnonzero(effective_splits(feature_file) == split)
    x = load_head_inputs(feature_file, ckpt.meta)[rows]
    with torch.no_grad():
        p = torch.softmax(ckpt.head(x.flatten(0, 1)), 1).reshape(len(rows), 2, -1).numpy()
        age = ckpt.predict_age(x.flatten(0, 1))
    age = None if age is None else age.reshape(len(rows), 2).numpy()
    meta = read_meta(feature_file)
    probs = p.mean(1) if tta else p[:, 0]
    ages = None if age is None else (age.mean(1) if tta else age[:, 0])
    return probs, meta["group"][rows], ages, meta["age"][rows], p


def run(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("features")
    return make_feature_file(folder / "two.h5", n=400, backbones=("mobilenet_v2", "resnet50"), signal=0.4,
                             widths=SMALL)


@pytest.fixture(scope="module")
def checkpoints(features, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("heads")
    return {
        "group": fit_checkpoint(folder / "mnv2_last", features),
        "age": fit_checkpoint(folder / "both_age", features, ("mobilenet_v2", "resnet50"), "both", "age"),
    }


@pytest.fixture(scope="module")
def evaluated(features, checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    result = run(evaluate_main, [checkpoints["group"], checkpoints["age"], "--features", features, "-o", out])
    assert result.exit_code == 0, result.output
    return out, result


# --------------------------------------------------------------------------- evaluate


def test_numbers_match_an_independent_computation(evaluated, features, checkpoints):
    out, _ = evaluated
    everything = json.loads((out / "metrics.json").read_text())
    assert set(everything["checkpoints"]) == {"mnv2_last", "both_age"}
    for name, key in (("mnv2_last", "group"), ("both_age", "age")):
        got = everything["checkpoints"][name]
        probs, y, ages_pred, ages, _ = direct_probs(checkpoints[key], features)
        pred = probs.argmax(1)
        assert got["n"] == len(y) == int(np.sum(read_meta(features)["split"] == "test"))
        assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert got["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert got["off_by_one"] == pytest.approx(np.mean(np.abs(pred - y) <= 1))
        conf = probs.max(1)
        which = np.minimum(np.ceil(conf * 15).astype(int) - 1, 14)
        ece = sum(abs((pred == y)[which == b].mean() - conf[which == b].mean()) * np.mean(which == b)
                  for b in range(15) if np.any(which == b))
        assert got["ece"] == pytest.approx(ece, abs=1e-6)
        assert np.sum(got["confusion"]) == len(y)
        assert got["split"] == "test" and got["tta"] is False
        if key == "age":
            assert got["mae"] == pytest.approx(np.mean(np.abs(ages_pred - ages)), rel=1e-5)
            assert got["target"] == "age"
        else:
            assert got["mae"] is None
    # The heads learned something: far above the 25 % of chance on this synthetic signal.
    assert everything["checkpoints"]["mnv2_last"]["accuracy"] > 0.5


def test_outputs_exist_and_json_round_trips(evaluated):
    out, result = evaluated
    everything = json.loads((out / "metrics.json").read_text())
    assert json.loads(json.dumps(everything, allow_nan=False)) == everything
    for name in ("mnv2_last", "both_age"):
        folder = out / name
        per = json.loads((folder / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(c))
        assert per == everything["checkpoints"][name]
        for png in ("confusion.png", "curves.png", "reliability.png"):
            path = folder / png
            assert path.read_bytes()[:8] == PNG_MAGIC
            with Image.open(path) as image:
                width, height = image.size
            assert 400 <= width <= 3000 and 300 <= height <= 3000, (png, image.size)
            assert path.stat().st_size > 10_000  # a drawn figure, not an empty canvas
        rows = read_csv(folder / "predictions.csv")
        assert len(rows) == per["n"]
        assert np.mean([r["true_group"] == r["predicted_group"] for r in rows]) == pytest.approx(per["accuracy"])
    assert "predicted_age" in read_csv(out / "both_age" / "predictions.csv")[0]
    # The terminal table names every checkpoint and its accuracy.
    acc = everything["checkpoints"]["mnv2_last"]["accuracy"]
    assert "mnv2_last" in result.output and f"{100 * acc:.2f}" in result.output


def test_comparison_table_has_paper_numbers_beside_ours(evaluated):
    out, _ = evaluated
    everything = json.loads((out / "metrics.json").read_text())
    lines = (out / "comparison.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| checkpoint"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {}
    for line in lines:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in everything["checkpoints"]:
            rows[cells[0]] = dict(zip(columns, cells))
    single, combined = rows["mnv2_last"], rows["both_age"]
    assert single["paper accuracy %"] == "70.58"          # Table 1, MobileNetV2
    assert single["accuracy %"] == f"{100 * everything['checkpoints']['mnv2_last']['accuracy']:.2f}"
    assert single["MAE (years)"] == "—" and single["backbones"] == "mobilenet_v2"
    assert combined["paper accuracy %"] == "—"             # no paper number for a two-backbone head
    assert combined["MAE (years)"] == f"{everything['checkpoints']['both_age']['mae']:.2f}"
    assert combined["features"] == "both" and combined["n"] == str(everything["checkpoints"]["both_age"]["n"])


def test_tta_averages_the_two_views_and_can_change_a_prediction(features, checkpoints, tmp_path):
    # Give one test row a mirrored view that is another row's confident plain view, so that the
    # average of the two views' probabilities flips its prediction.
    probs, _, _, _, views = direct_probs(checkpoints["group"], features)
    meta = read_meta(features)
    test_rows = np.flatnonzero(meta["split"] == "test")
    plain = views[:, 0]
    pick = None
    for a in range(len(test_rows)):
        for b in range(len(test_rows)):
            if (plain[a] + plain[b]).argmax() != plain[a].argmax():
                pick = (a, b)
                break
        if pick:
            break
    assert pick is not None
    a, b = pick
    arrays = {name: read_features(features, name, "last") for name in ("mobilenet_v2", "resnet50")}
    stages = {name: read_features(features, name, "stages") for name in ("mobilenet_v2", "resnet50")}
    arrays["mobilenet_v2"][test_rows[a], 1] = arrays["mobilenet_v2"][test_rows[b], 0]
    settings = read_settings(features)
    settings.pop("fingerprint")
    crafted = tmp_path / "crafted.h5"
    write_feature_file(crafted, settings, meta, {k: v.astype(np.float16) for k, v in arrays.items()},
                       {k: v.astype(np.float16) for k, v in stages.items()})

    out = tmp_path / "tta"
    result = run(evaluate_main, [checkpoints["group"], "--features", crafted, "--tta", "-o", out])
    assert result.exit_code == 0, result.output
    rows = read_csv(out / "mnv2_last" / "predictions.csv")
    names = group_names(settings["group_edges"])
    assert rows[a]["file"] == meta["path"][test_rows[a]]
    got = np.array([float(rows[a][f"p_{n}"]) for n in names])
    np.testing.assert_allclose(got, (plain[a] + plain[b]) / 2, atol=2e-6)
    # Without TTA the same file gives the plain view's answer, which differs.
    without = evaluate_checkpoint(load_checkpoint(checkpoints["group"]), "x", checkpoints["group"],
                                  FeatureInputs(crafted), "test", tta=False)
    np.testing.assert_allclose(without.probs[a], plain[a], atol=2e-6)
    assert without.probs[a].argmax() == plain[a].argmax()
    assert rows[a]["predicted_group"] == names[(plain[a] + plain[b]).argmax()] != names[plain[a].argmax()]
    # Every other row: TTA probabilities are the mean of that row's two (untouched) views.
    c = (a + 1) % len(test_rows)
    np.testing.assert_allclose([float(rows[c][f"p_{n}"]) for n in names], views[c].mean(0), atol=2e-6)


def test_split_file_and_val_split(features, checkpoints, tmp_path):
    meta = read_meta(features)
    chosen = [p for p, s in zip(meta["path"], meta["split"]) if s == "train"][:30]
    split_csv = tmp_path / "split.csv"
    split_csv.write_text("file,split\n" + "".join(f"{p},val\n" for p in chosen))
    result = run(evaluate_main, [checkpoints["group"], "--features", features, "--split", "val",
                                 "--split-file", split_csv, "-o", tmp_path / "out"])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "out" / "metrics.json").read_text())["checkpoints"]["mnv2_last"]
    assert got["n"] == 30 and got["split"] == "val"
    assert [r["file"] for r in read_csv(tmp_path / "out" / "mnv2_last" / "predictions.csv")] == chosen
    # These rows are in the split the head trained on: evaluate says so.
    assert "splits differ from those the head was trained with" in result.stderr
    assert "30 of the 30 scored rows were in the head's train split and 0 in its val split" in result.stderr
    assert "30 of the 30" in (tmp_path / "out" / "comparison.md").read_text()
    assert got["warnings"] and "30 of the 30" in got["warnings"][1]

    # Without a split file, the feature file's own val rows.
    val = evaluate_checkpoint(load_checkpoint(checkpoints["group"]), "x", checkpoints["group"],
                              FeatureInputs(features), "val")
    assert val.metrics["n"] == int(np.sum(meta["split"] == "val"))
    assert val.paths == [p for p, s in zip(meta["path"], meta["split"]) if s == "val"]
    assert val.warnings == []


@pytest.mark.slow
def test_ensemble_scores_the_mean_of_its_members_probabilities(features, checkpoints, tmp_path):
    out = tmp_path / "ens"
    result = run(evaluate_main, [checkpoints["group"], checkpoints["age"], "--features", features, "--tta",
                                 "--ensemble", "-o", out])
    assert result.exit_code == 0, result.output
    everything = json.loads((out / "metrics.json").read_text())
    got = everything["checkpoints"]["ensemble"]
    (p_group, y, _, _, _), (p_age, _, age_pred, ages, _) = (direct_probs(checkpoints[k], features, tta=True)
                                                          for k in ("group", "age"))
    mean = (p_group + p_age) / 2
    pred = mean.argmax(1)
    assert np.any(p_group.argmax(1) != p_age.argmax(1))  # the members disagree: averaging matters
    assert got["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert got["members"] == [str(checkpoints["group"]), str(checkpoints["age"])]
    assert got["mae"] is None  # only one member predicts an age
    assert got["backbones"] == ["mobilenet_v2", "resnet50"] and got["feature_kind"] == "last+both"
    rows = read_csv(out / "ensemble" / "predictions.csv")
    names = group_names(read_settings(features)["group_edges"])
    np.testing.assert_allclose([[float(r[f"p_{n}"]) for n in names] for r in rows], mean, atol=2e-6)
    assert (out / "ensemble" / "confusion.png").exists() and not (out / "ensemble" / "curves.png").exists()
    assert "ensemble" in result.output and "| ensemble |" in (out / "comparison.md").read_text()

    # Two age heads: the ensemble's age is the mean of theirs.
    other_age = fit_checkpoint(tmp_path / "mnv2_age", features, ("mobilenet_v2",), "last", "age")
    result = run(evaluate_main, [checkpoints["age"], other_age, "--features", features, "--ensemble",
                                 "-o", tmp_path / "ages"])
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "ages" / "metrics.json").read_text())["checkpoints"]["ensemble"]
    ages_a, ages_b = (direct_probs(c, features)[2] for c in (checkpoints["age"], other_age))
    assert np.abs(ages_a - ages_b).max() > 1.0  # two different age heads
    assert got["mae"] == pytest.approx(np.mean(np.abs((ages_a + ages_b) / 2 - ages)), rel=1e-5)

    result = run(evaluate_main, [checkpoints["group"], "--features", features, "--ensemble", "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "--ensemble needs at least two checkpoints" in result.output


def test_mismatched_checkpoint_and_features_are_refused(checkpoints, tmp_path):
    other_weights = make_feature_file(tmp_path / "imagenet.h5", n=60, widths=SMALL, weights="IMAGENET1K_V1")
    result = run(evaluate_main, [checkpoints["group"], "--features", other_weights, "-o", tmp_path / "o1"])
    assert result.exit_code == 1
    assert "does not fit feature file" in result.output and "weights of mobilenet_v2" in result.output
    assert "'none'" in result.output and "'IMAGENET1K_V1'" in result.output

    only_mnv2 = make_feature_file(tmp_path / "mnv2.h5", n=60, widths=SMALL)
    result = run(evaluate_main, [checkpoints["age"], "--features", only_mnv2, "-o", tmp_path / "o2"])
    assert result.exit_code == 1 and "missing resnet50" in result.output

    # Other bins are scored against the file's ages regrouped into the head's groups (tests/cli/test_bins.py);
    # a file with rows labelled by their group only (age -1) cannot be regrouped, and is refused.
    other_bins = make_feature_file(tmp_path / "bins.h5", n=60, widths=SMALL, backbones=("mobilenet_v2", "resnet50"),
                                   edges=(30, 60, 116))
    with h5py.File(other_bins, "r+") as h5:
        h5["meta/age"][0] = -1
    reseal(other_bins)
    result = run(evaluate_main, [checkpoints["group"], "--features", other_bins, "-o", tmp_path / "o3"])
    assert result.exit_code == 1 and "labelled with a group only" in result.output
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o3").exists()  # nothing written


def test_bad_inputs_give_readable_errors(features, checkpoints, tmp_path):
    result = run(evaluate_main, [tmp_path / "nope", "--features", features, "-o", tmp_path / "o"])
    assert result.exit_code == 1 and f"checkpoint {tmp_path / 'nope'} does not exist" in result.output

    not_h5 = tmp_path / "notes.h5"
    not_h5.write_text("hello")
    result = run(evaluate_main, [checkpoints["group"], "--features", not_h5, "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "is not a readable HDF5 file" in result.output

    result = run(evaluate_main, [checkpoints["group"], "--features", tmp_path / "missing.h5", "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "does not exist" in result.output

    # train and all are valid splits (all: cross-dataset evaluation); anything else is a usage error.
    result = run(evaluate_main, [checkpoints["group"], "--features", features, "--split", "holdout", "-o", tmp_path])
    assert result.exit_code == 2 and "Invalid value for '--split'" in result.output

    bad_split = tmp_path / "bad.csv"
    bad_split.write_text("file,split\na.jpg,holdout\n")
    result = run(evaluate_main, [checkpoints["group"], "--features", features, "--split-file", bad_split,
                                 "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "'holdout' is not one of" in result.output

    not_a_head = tmp_path / "empty_dir"
    not_a_head.mkdir()
    result = run(evaluate_main, [not_a_head, "--features", features, "-o", tmp_path / "o"])
    assert result.exit_code == 1 and "is not a head checkpoint" in result.output


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def image_head(tmp_path_factory):
    """Images made by the test, a random-init MobileNetV2 (weights 'none') and two heads on its features."""
    root = tmp_path_factory.mktemp("predict")
    images = write_utk_folder(root / "faces" / "sub", [5, 30, 60, 90])
    backbone = create_backbone("mobilenet_v2", None)
    x = preprocess_rgb([load_rgb(p) for p in images])
    with torch.no_grad():  # kind 'both': pooled then stages; plain and mirrored views
        feats, mirrored = (torch.cat(list(backbone(v).values()), 1) for v in (x, x.flip(-1)))
    settings = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "none"}, "group_edges": [25, 50, 75, 116],
                "preprocessing": {}, "fingerprint": "test"}
    heads = {}
    for target in ("group", "age"):
        torch.manual_seed(1)
        head = AgeHead(feats.shape[1], (16,), 0.0, settings["group_edges"], target)
        with torch.no_grad():  # standardize with these images' statistics so the scores vary
            head.feature_mean.copy_(feats.mean(0))
            head.feature_std.copy_(feats.std(0) + 1e-3)
            head.mlp[-1].weight.mul_(30.0)  # confident enough that the images get different answers
            if target == "age":
                head.age_shift.fill_(50.0)
                head.age_scale.fill_(20.0)
        heads[target] = save_checkpoint(root / f"head_{target}", head,
                                        head_meta(settings, ["mobilenet_v2"], "both", feats.shape[1], target, (16,)))
    return root, images, feats, heads, mirrored


def expected(head_dir: Path, feats: torch.Tensor):
    ckpt = load_checkpoint(head_dir)
    with torch.no_grad():
        probs = torch.softmax(ckpt.head(feats), 1).numpy()
    age = ckpt.predict_age(feats)
    return probs, None if age is None else age.numpy()


@pytest.mark.slow
def test_predict_matches_the_head_on_backbone_features(image_head, tmp_path):
    root, images, feats, heads, _ = image_head
    names = group_names([25, 50, 75, 116])
    for target, head_dir in heads.items():
        out = tmp_path / f"{target}.csv"
        result = run(predict_main, [root / "faces", "--checkpoint", head_dir, "--decoder", "torch",
                                    "--device", "cpu", "--batch-size", 3, "-o", out])
        assert result.exit_code == 0, result.output
        rows = {Path(r["file"]).name: r for r in read_csv(out)}
        assert len(rows) == len(images)  # the folder was searched recursively
        probs, ages = expected(head_dir, feats)
        got = np.array([[float(rows[p.name][f"p_{n}"]) for n in names] for p in images])
        np.testing.assert_allclose(got, probs, atol=1e-5)
        assert [rows[p.name]["group"] for p in images] == [names[k] for k in probs.argmax(1)]
        if target == "age":
            np.testing.assert_allclose([float(rows[p.name]["age"]) for p in images], ages, atol=0.01)
        else:
            assert "age" not in next(iter(rows.values()))
            assert np.ptp(probs, axis=0).max() > 0.05  # the images get different answers: a real check
        for p in images:
            assert p.name in result.output  # the printed table


def test_predict_tta_averages_the_mirrored_view(image_head, tmp_path):
    root, images, feats, heads, mirrored = image_head
    probs = (expected(heads["group"], feats[:2])[0] + expected(heads["group"], mirrored[:2])[0]) / 2
    assert not np.allclose(probs, expected(heads["group"], feats[:2])[0], atol=1e-3)  # the mirror matters
    out = tmp_path / "tta.csv"
    result = run(predict_main, [*images[:2], "--checkpoint", heads["group"] / "head.json", "--tta",
                                "--decoder", "torch", "--device", "cpu", "-o", out, "--quiet"])
    assert result.exit_code == 0, result.output
    got = np.array([[float(r[f"p_{n}"]) for n in group_names([25, 50, 75, 116])] for r in read_csv(out)])
    np.testing.assert_allclose(got, probs, atol=1e-5)


def test_predict_ensemble_averages_the_heads_and_runs_each_backbone_once(image_head, tmp_path):
    root, images, feats, heads, _ = image_head
    group_probs, _ = expected(heads["group"], feats)
    age_probs, ages = expected(heads["age"], feats)
    mean = (group_probs + age_probs) / 2
    assert not np.allclose(mean, group_probs, atol=1e-3)  # the second head changes the answer
    out = tmp_path / "ensemble.csv"
    result = run(predict_main, [root / "faces", "--checkpoint", heads["group"], "--checkpoint", heads["age"],
                                "--decoder", "torch", "--device", "cpu", "-o", out, "--quiet"])
    assert result.exit_code == 0, result.output
    rows = {Path(r["file"]).name: r for r in read_csv(out)}
    names = group_names([25, 50, 75, 116])
    np.testing.assert_allclose([[float(rows[p.name][f"p_{n}"]) for n in names] for p in images], mean, atol=1e-5)
    assert "age" not in next(iter(rows.values()))  # only one of the two heads predicts an age

    from pipeline.inference.predictor import Predictor
    predictor = Predictor([heads["group"], heads["age"]], device="cpu")
    assert list(predictor.backbones) == [("mobilenet_v2", "none")]  # one backbone serves both heads
    # Two age heads, the second predicting 10 years more: the ensemble predicts their mean.
    older = load_checkpoint(heads["age"])
    with torch.no_grad():
        older.head.age_shift.add_(10.0)
    older_dir = save_checkpoint(tmp_path / "older", older.head, older.meta)
    x = preprocess_rgb([load_rgb(p) for p in images])
    views = torch.stack([x, x.flip(-1)], 1)
    _, ensemble_ages = Predictor([heads["age"], older_dir], device="cpu")(views)
    np.testing.assert_allclose(ensemble_ages, ages + 5.0, atol=0.01)

    other_groups = load_checkpoint(heads["group"])
    other_groups.meta["class_names"] = ["young", "middle", "old", "oldest"]
    result = run(predict_main, [images[0], "--checkpoint", heads["group"], "--checkpoint",
                                save_checkpoint(tmp_path / "renamed", other_groups.head, other_groups.meta)])
    assert result.exit_code == 1 and "an ensemble needs the same groups" in result.output


def test_predict_reports_unreadable_images_and_predicts_the_rest(image_head, tmp_path):
    _, images, _, heads, _ = image_head
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in images[:2]:
        (folder / p.name).write_bytes(p.read_bytes())
    write_garbage(folder / "garbage.jpg")
    write_truncated_jpeg(folder / "cut.jpg", face_like(7))
    out = tmp_path / "mixed.csv"
    result = run(predict_main, [folder, "--checkpoint", heads["group"], "--decoder", "torch", "--device", "cpu",
                                "-o", out])
    assert result.exit_code == 3, result.output  # finished, some images skipped (pipeline/cli/exit_codes.py)
    assert sorted(Path(r["file"]).name for r in read_csv(out)) == sorted(p.name for p in images[:2])
    assert "could not predict 2 of 4 images" in result.stderr
    assert f"{folder / 'garbage.jpg'}: cannot decode" in result.stderr
    assert f"{folder / 'cut.jpg'}: cannot decode: truncated JPEG" in result.stderr

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    write_garbage(only_bad / "x.png")
    result = run(predict_main, [only_bad, "--checkpoint", heads["group"], "--decoder", "torch", "--device", "cpu"])
    assert result.exit_code == 1 and "no image could be read" in result.output and "x.png" in result.output


def test_predict_bad_inputs(image_head, tmp_path):
    root, images, _, heads, _ = image_head
    result = run(predict_main, [tmp_path / "missing.jpg", "--checkpoint", heads["group"]])
    assert result.exit_code == 1 and f"{tmp_path / 'missing.jpg'}: no such file or folder" in result.output
    result = run(predict_main, [images[0], "--checkpoint", tmp_path / "nohead"])
    assert result.exit_code == 1 and "does not exist" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run(predict_main, [empty, "--checkpoint", heads["group"]])
    assert result.exit_code == 1 and "holds no .jpg, .jpeg or .png files" in result.output
    # A head trained on features from a local weights file needs that file to rebuild the backbone.
    # (saved as such: editing head.json alone is refused, see tests/test_bad_input.py)
    trained = load_checkpoint(heads["group"])
    meta = {k: v for k, v in trained.meta.items() if k != "format"}
    meta["weights"] = {"mobilenet_v2": "file:mnv2.pth:sha256=0123456789abcdef"}
    local = save_checkpoint(tmp_path / "local_head", trained.head, meta)
    result = run(predict_main, [images[0], "--checkpoint", local, "--device", "cpu"])
    assert result.exit_code == 1 and "--weights mobilenet_v2=/path/to/file" in result.output
