"""Bad input never crashes, hangs, corrupts or silently lies (issue 11, one test per item).

Each test feeds one bad or odd input and checks that the command either does
the right thing or stops with one line naming the file and the problem, and
that the exit code follows the one rule in pipeline/cli/exit_codes.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from pipeline.cli.evaluate import main as evaluate_main
from pipeline.cli.exit_codes import FAILED, OK, SKIPPED, USAGE
from pipeline.cli.featurize import main as featurize_main
from pipeline.cli.train_head import main as train_head_main
from pipeline.features import writer
from pipeline.features.read import read_meta
from pipeline.heads.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.heads.config import HeadConfig
from tests.support.cli import QUICK, invoke, quick_head
from tests.support.folders import write_utk_folder
from tests.support.imagefactory import asymmetric_rgb, write_garbage, write_jpeg
from tests.support.paths import REPO
from tests.support.synthetic import make_feature_file

SMALL = {"mobilenet_v2": (32, 16), "resnet50": (40, 24), "efficientnet_b0": (32, 16)}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_feature_file(tmp_path_factory.mktemp("bad") / "features.h5", n=240,
                             backbones=("mobilenet_v2", "efficientnet_b0"), widths=SMALL)


@pytest.fixture(scope="module")
def head(synthetic, tmp_path_factory) -> Path:
    return quick_head(synthetic, tmp_path_factory.mktemp("head") / "mnv2")


def copy_with(path: Path, dest: Path, edit) -> Path:
    """A copy of a feature file, changed by edit(h5)."""
    shutil.copy(path, dest)
    with h5py.File(dest, "r+") as h5:
        edit(h5)
    return dest


# --------------------------------------------------------------------------- 2: NaN heads


@pytest.mark.parametrize("field, value", [("lr", math.nan), ("lr", math.inf), ("dropout", math.nan),
                                          ("weight_decay", math.nan), ("label_smoothing", math.nan)])
def test_2_non_finite_hyperparameters_are_refused(field, value):
    with pytest.raises(ValueError, match=field.replace("_", " ") + "|" + field):
        HeadConfig(**{field: value})


def test_2_nan_lr_on_the_command_line_is_a_usage_error(synthetic, tmp_path):
    result = invoke(train_head_main, synthetic, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                    "--lr", "nan", *QUICK)
    assert result.exit_code == USAGE and "lr" in result.output and "finite" in result.output
    assert not (tmp_path / "h" / "head.safetensors").exists()


def test_2_nan_feature_rows_are_named_and_left_out(synthetic, tmp_path):
    meta = read_meta(synthetic)
    train_rows = np.flatnonzero(meta["split"] == "train")[:2]
    test_row = int(np.flatnonzero(meta["split"] == "test")[0])

    def poison(h5):
        data = h5["features/mobilenet_v2"]
        block = data[()]
        block[train_rows[0], 0, 3] = np.nan
        block[train_rows[1], 1, 0] = np.inf
        block[test_row, 0, 1] = np.nan
        data[...] = block

    bad = copy_with(synthetic, tmp_path / "poisoned.h5", poison)
    out = tmp_path / "h"
    result = invoke(train_head_main, bad, "--backbones", "mobilenet_v2", "-o", out, *QUICK)
    assert result.exit_code == SKIPPED, result.output
    for row in train_rows:
        assert meta["path"][row] in result.output
    assert "not finite" in result.output
    ckpt = load_checkpoint(out)
    assert all(torch.isfinite(p).all() for p in ckpt.head.state_dict().values())

    scored = invoke(evaluate_main, out, "--features", bad, "-o", tmp_path / "ev")
    assert scored.exit_code == SKIPPED, scored.output
    assert meta["path"][test_row] in scored.output
    scores = json.loads((tmp_path / "ev" / "metrics.json").read_text())["checkpoints"]["h"]
    assert math.isfinite(scores["accuracy"]) and scores["n"] == int((meta["split"] == "test").sum()) - 1
    assert scores["skipped"] == [[meta["path"][test_row], "features not finite (NaN or Inf) in the feature file"]]


def test_2_diverging_training_stops_with_a_message(synthetic, tmp_path):
    result = invoke(train_head_main, synthetic, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                    "--lr", "1e30", "--weight-decay", "0", *QUICK)
    assert result.exit_code == FAILED, result.output
    assert "diverged" in result.output and "lr=1e+30" in result.output
    assert not (tmp_path / "h" / "head.safetensors").exists()

    sweep = invoke(train_head_main, synthetic, "--backbones", "mobilenet_v2", "-o", tmp_path / "s",
                   "--lr", "1e-3,1e30", *QUICK)
    assert sweep.exit_code == SKIPPED, sweep.output
    assert "diverged" in sweep.output
    assert load_checkpoint(tmp_path / "s").meta["config"]["lr"] == 1e-3


def test_2_a_non_finite_head_is_never_saved_nor_loaded(synthetic, head, tmp_path):
    ckpt = load_checkpoint(head)
    with torch.no_grad():
        ckpt.head.mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        save_checkpoint(tmp_path / "nan", ckpt.head, {k: v for k, v in ckpt.meta.items() if k != "format"})
    assert not (tmp_path / "nan" / "head.safetensors").exists()

    # A file changed on disk after saving is refused at load.
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "edited"
    shutil.copytree(head, copy)
    state = load_file(str(copy / "head.safetensors"))
    state["mlp.0.bias"][0] = float("inf")
    save_file(state, str(copy / "head.safetensors"), metadata={"format": "utkface-age-head/1"})
    with pytest.raises(CheckpointError, match="not finite"):
        load_checkpoint(copy)


# --------------------------------------------------------------------------- 3: head.json edited


def test_3_a_head_json_naming_another_backbone_of_the_same_width_is_refused(synthetic, head, tmp_path):
    edited = tmp_path / "edited"
    shutil.copytree(head, edited)
    meta = json.loads((edited / "head.json").read_text())
    meta["backbones"] = ["efficientnet_b0"]
    meta["weights"] = {"efficientnet_b0": meta["weights"]["mobilenet_v2"]}
    (edited / "head.json").write_text(json.dumps(meta))

    with pytest.raises(CheckpointError, match="mobilenet_v2"):
        load_checkpoint(edited)
    result = invoke(evaluate_main, edited, "--features", synthetic, "-o", tmp_path / "ev")
    assert result.exit_code == FAILED and "mobilenet_v2" in result.output and "head.json" in result.output
    # The untouched head still scores (the check does not get in the way).
    assert invoke(evaluate_main, head, "--features", synthetic, "-o", tmp_path / "ok").exit_code == OK


def test_3_heads_still_apply_to_a_joined_file(tmp_path):
    a = make_feature_file(tmp_path / "a.h5", n=120, backbones=("mobilenet_v2",), widths=SMALL)
    b = make_feature_file(tmp_path / "b.h5", n=120, backbones=("efficientnet_b0",), widths=SMALL)
    joined = tmp_path / "joined.h5"
    assert invoke(featurize_main, "join", a, b, "-o", joined).exit_code == OK
    result = invoke(train_head_main, a, "--backbones", "mobilenet_v2", "-o", tmp_path / "h", *QUICK)
    assert result.exit_code == OK, result.output
    assert invoke(evaluate_main, tmp_path / "h", "--features", joined, "-o", tmp_path / "ev").exit_code == OK


# --------------------------------------------------------------------------- 8: disk full


@pytest.mark.slow
def test_8_too_little_space_is_refused_before_assembling(utk_folder, tmp_path, fast, monkeypatch):
    out = tmp_path / "f.h5"
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    result = invoke(featurize_main, utk_folder, "-o", out, *fast, "--device", "cpu", "--decoder", "torch")
    assert result.exit_code == FAILED, result.output
    assert "Traceback" not in result.output
    assert "not enough space" in result.output and "MiB" in result.output and str(tmp_path) in result.output
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    # The finished batches are kept: with space again, the rerun resumes and computes nothing.
    monkeypatch.undo()
    again = invoke(featurize_main, utk_folder, "-o", out, *fast, "--device", "cpu", "--decoder", "torch")
    assert again.exit_code == OK and "resuming: 12 of 12" in again.output


def test_8_disk_full_while_writing_a_part_leaves_no_temporary_file(utk_folder, tmp_path, fast, monkeypatch):
    out = tmp_path / "f.h5"

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    result = invoke(featurize_main, utk_folder, "-o", out, *fast, "--device", "cpu", "--decoder", "torch")
    assert result.exit_code == FAILED, result.output
    assert "Traceback" not in result.output and "no space left" in result.output.lower()
    assert re.search(r"a batch needs about \d+\.\d MiB, \d+\.\d MiB free now", result.output), result.output
    assert not list((tmp_path / "f.h5.parts").glob("*.tmp"))


def test_8_disk_full_while_assembling_leaves_no_temporary_file(utk_folder, tmp_path, fast, monkeypatch):
    out = tmp_path / "f.h5"
    real = writer._create_datasets

    def full(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer, "_create_datasets", full)
    result = invoke(featurize_main, utk_folder, "-o", out, *fast, "--device", "cpu", "--decoder", "torch")
    assert result.exit_code == FAILED, result.output
    assert "Traceback" not in result.output and "no space left" in result.output.lower()
    assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    assert (tmp_path / "f.h5.parts").is_dir()  # finished work kept for the rerun


# --------------------------------------------------------------------------- 9: read-only outputs


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nobody may write in. chmod does not stop root, so as root writes there fail by hand."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if str(path).startswith(str(folder)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    yield folder
    folder.chmod(0o755)


def test_9_read_only_output_folders_give_one_message(synthetic, head, utk_folder, fast, read_only):
    cases = [
        (featurize_main, [utk_folder, "-o", read_only / "f.h5", *fast, "--device", "cpu"]),
        (train_head_main, [synthetic, "--backbones", "mobilenet_v2", "-o", read_only / "h", *QUICK]),
        (evaluate_main, [head, "--features", synthetic, "-o", read_only / "ev"]),
    ]
    for command, args in cases:
        result = invoke(command, *args)
        assert result.exit_code == FAILED, (command.name, result.output)
        assert "Traceback" not in result.output and "cannot write" in result.output, result.output
        assert str(read_only) in result.output


# --------------------------------------------------------------------------- 10: two runs, one output


def test_10_a_second_run_on_the_same_output_names_the_first_ones_pid(utk_folder, tmp_path, fast):
    out = tmp_path / "f.h5"
    lock_path = Path(str(out) + ".lock")
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        result = invoke(featurize_main, utk_folder, "-o", out, *fast, "--device", "cpu")
        assert result.exit_code == FAILED, result.output
        assert "another featurize run (pid 4242)" in result.output and "Traceback" not in result.output
    assert not out.exists()
    # Released: the next run goes ahead.
    assert invoke(featurize_main, utk_folder, "-o", out, *fast, "--device", "cpu").exit_code == OK


# --------------------------------------------------------------------------- 11: SLURM


def test_11_an_out_of_range_slurm_task_id_is_a_clear_error(utk_folder, tmp_path, fast, monkeypatch):
    from pipeline.features.extract import shard_from_env

    with pytest.raises(ValueError, match="SLURM_ARRAY_TASK_ID"):
        shard_from_env({"SLURM_ARRAY_TASK_ID": "6", "SLURM_ARRAY_TASK_COUNT": "4"})
    with pytest.raises(ValueError, match="RANK"):
        shard_from_env({"RANK": "x", "WORLD_SIZE": "2"})
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "6")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "4")
    result = invoke(featurize_main, utk_folder, "-o", tmp_path / "f.h5", *fast)
    assert result.exit_code == USAGE and "SLURM_ARRAY_TASK_ID=6" in result.output
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------- 12: messages, not tracebacks


def test_12_split_file_row_without_a_split_value(synthetic, tmp_path):
    split_file = tmp_path / "split.csv"
    split_file.write_text("file,split\na.jpg,train\nb.jpg\n")
    result = invoke(train_head_main, synthetic, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                    "--split-file", split_file, *QUICK)
    assert result.exit_code == FAILED and "Traceback" not in result.output
    assert str(split_file) in result.output and "line 3" in result.output


def test_12_a_feature_file_without_meta_split(synthetic, tmp_path):
    bad = copy_with(synthetic, tmp_path / "nosplit.h5", lambda h5: h5.__delitem__("meta/split"))
    result = invoke(train_head_main, bad, "--backbones", "mobilenet_v2", "-o", tmp_path / "h", *QUICK)
    assert result.exit_code == FAILED and "Traceback" not in result.output
    assert str(bad) in result.output and "meta/split" in result.output


def test_12_features_shorter_than_their_metadata(synthetic, head, tmp_path):
    def shorten(h5):
        rows = h5["features/mobilenet_v2"][:100]
        del h5["features/mobilenet_v2"]
        h5.create_dataset("features/mobilenet_v2", data=rows)

    bad = copy_with(synthetic, tmp_path / "short.h5", shorten)
    result = invoke(train_head_main, bad, "--backbones", "mobilenet_v2", "-o", tmp_path / "h", *QUICK)
    assert result.exit_code == FAILED and "Traceback" not in result.output
    assert str(bad) in result.output and "100 rows" in result.output
    scored = invoke(evaluate_main, head, "--features", bad, "-o", tmp_path / "ev")
    assert scored.exit_code == FAILED and "100 rows" in scored.output


def test_12_a_settings_attribute_that_is_not_json_names_the_file(synthetic, tmp_path):
    bad = copy_with(synthetic, tmp_path / "notjson.h5", lambda h5: h5.attrs.__setitem__("settings", "{oops"))
    result = invoke(train_head_main, bad, "--backbones", "mobilenet_v2", "-o", tmp_path / "h", *QUICK)
    assert result.exit_code == FAILED and "Traceback" not in result.output
    assert str(bad) in result.output and "settings" in result.output
    info = invoke(featurize_main, "info", bad)
    assert info.exit_code == FAILED and str(bad) in info.output
    merged = invoke(featurize_main, "merge", bad, "-o", tmp_path / "merged.h5")
    assert merged.exit_code == FAILED and str(bad) in merged.output and "Traceback" not in merged.output


@pytest.mark.parametrize("key", ["backbones", "feature_kind"])
def test_12_a_head_json_missing_a_key(head, synthetic, tmp_path, key):
    edited = tmp_path / "edited"
    shutil.copytree(head, edited)
    meta = json.loads((edited / "head.json").read_text())
    del meta[key]
    (edited / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=key):
        load_checkpoint(edited)
    result = invoke(evaluate_main, edited, "--features", synthetic, "-o", tmp_path / "ev")
    assert result.exit_code == FAILED and key in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------- 13: age target, one group


def test_13_age_target_on_a_file_with_a_single_group(tmp_path):
    # --bins 116: every age is one group, so there is nothing to separate.
    single = make_feature_file(tmp_path / "single.h5", n=160, backbones=("mobilenet_v2",), widths=SMALL, edges=(116,))
    out = tmp_path / "h"
    result = invoke(train_head_main, single, "--backbones", "mobilenet_v2", "-o", out, "--target", "age", *QUICK)
    assert "IndexError" not in result.output and "Traceback" not in result.output
    assert result.exit_code == OK, result.output
    ckpt = load_checkpoint(out)
    assert math.isfinite(ckpt.meta["temperature"])
    scored = invoke(evaluate_main, out, "--features", single, "-o", tmp_path / "ev", "--split", "val")
    assert scored.exit_code == OK, scored.output


# --------------------------------------------------------------------------- 15: long names in explain


def test_15_image_key_of_a_long_name_fits_a_file_name():
    from pipeline.explain.job import image_key

    long_path = Path("x" * 240 + ".jpg")
    key = image_key(long_path)
    assert len(f"{key}_mobilenet_v2-folder_gradcam.png".encode()) <= 255
    assert key != image_key(Path("x" * 239 + "y.jpg"))  # shortened names stay distinct
    assert image_key(Path("1_0_0_20170109.jpg.chip.jpg")) == "1_0_0_20170109"  # short names unchanged


# --------------------------------------------------------------------------- 17, 18: featurize summary


def test_17_summary_split_counts_count_only_written_rows(tmp_path, fast):
    folder = tmp_path / "mixed"
    write_utk_folder(folder, [3, 12, 20, 25, 26, 33, 47, 51, 60, 75, 80, 101, 5, 15, 30, 40, 55, 65, 85, 95])
    for i in range(4):
        write_garbage(folder / f"{30 + i}_0_0_20170109{900 + i:09d}.jpg.chip.jpg")
    out = tmp_path / "f.h5"
    result = invoke(featurize_main, folder, "-o", out, *fast, "--device", "cpu", "--decoder", "torch")
    assert result.exit_code == SKIPPED, result.output
    stored = read_meta(out)["split"]
    expected = ", ".join(f"{s} {int((stored == s).sum())}" for s in sorted(set(stored)))
    assert f"splits: {expected}" in result.output
    line = result.output.split("splits: ")[1].splitlines()[0]
    assert sum(int(n) for n in re.findall(r"\d+", line)) == 20


def test_18_a_run_in_which_every_file_fails_exits_non_zero_with_the_reasons(tmp_path, fast):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_garbage(folder / "30_0_0_20170109000000001.jpg.chip.jpg")
    write_garbage(folder / "31_0_0_20170109000000002.jpg.chip.jpg")
    result = invoke(featurize_main, folder, "-o", tmp_path / "f.h5", *fast, "--device", "cpu", "--decoder", "torch",
                    "--engine", "torch")
    assert result.exit_code == FAILED, result.output
    assert "30_0_0_20170109000000001.jpg.chip.jpg" in result.output
    assert "31_0_0_20170109000000002.jpg.chip.jpg" in result.output and "no image" in result.output


# --------------------------------------------------------------------------- 21: recipe errors


@pytest.mark.parametrize("option, value, field", [("--epochs", "0", "epochs"), ("--batch-size", "0", "batch size"),
                                                  ("--lr", "-1", "lr"), ("--weight-decay", "-1", "weight decay")])
def test_21_recipe_errors_name_the_field(synthetic, tmp_path, option, value, field):
    args = [synthetic, "--backbones", "mobilenet_v2", "-o", tmp_path / "h", *QUICK, option, value]
    result = invoke(train_head_main, *args)
    assert result.exit_code == USAGE, result.output
    assert field in result.output and "HeadConfig(" not in result.output


# --------------------------------------------------------------------------- 22: exit codes


def test_22_featurize_exit_codes(utk_folder, tmp_path, fast):
    assert invoke(featurize_main, utk_folder, "-o", tmp_path / "ok.h5", *fast, "--device", "cpu").exit_code == OK
    write_garbage(utk_folder / "50_0_0_20170109000000999.jpg.chip.jpg")
    some = invoke(featurize_main, utk_folder, "-o", tmp_path / "some.h5", *fast, "--device", "cpu")
    assert some.exit_code == SKIPPED and "50_0_0_20170109000000999.jpg.chip.jpg" in some.output
    assert invoke(featurize_main, tmp_path / "nowhere", "-o", tmp_path / "x.h5", *fast).exit_code in (FAILED, USAGE)


def test_22_train_head_and_evaluate_exit_codes(synthetic, head, tmp_path):
    assert invoke(evaluate_main, head, "--features", synthetic, "-o", tmp_path / "ev").exit_code == OK
    assert invoke(evaluate_main, head, "--features", tmp_path / "none.h5", "-o", tmp_path / "e2").exit_code == FAILED
    assert invoke(train_head_main, synthetic, "--backbones", "resnet50", "-o", tmp_path / "h",
                  *QUICK).exit_code == FAILED
    assert invoke(train_head_main, synthetic, "--backbones", "mobilenet_v2", "-o", tmp_path / "h",
                  "--bogus").exit_code == USAGE


@pytest.fixture(scope="module")
def real_head(tmp_path_factory, calibrated_mobilenet):
    """A head over featurize's MobileNetV2 (calibrated random weights) on 16 made-up faces, for predict/explain."""
    root = tmp_path_factory.mktemp("real")
    faces = root / "faces"
    write_utk_folder(faces, [3, 8, 12, 20, 25, 30, 33, 40, 47, 51, 60, 70, 75, 80, 90, 101])
    features = root / "f.h5"
    weights = ["--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--quiet"]
    made = invoke(featurize_main, faces, "-o", features, *weights, "--device", "cpu", "--decoder", "torch")
    assert made.exit_code == OK, made.output
    trained = invoke(train_head_main, features, "--backbones", "mobilenet_v2", "-o", root / "head", *QUICK)
    assert trained.exit_code == OK, trained.output
    return {"root": root, "faces": faces, "features": features, "head": root / "head",
            "weights": f"mobilenet_v2={calibrated_mobilenet}"}


def test_22_predict_exit_codes(real_head, tmp_path):
    from pipeline.cli.predict import main as predict_main

    common = ["--checkpoint", real_head["head"], "--weights", real_head["weights"], "--device", "cpu",
              "--decoder", "torch", "--quiet"]
    good = sorted(real_head["faces"].iterdir())[:2]
    assert invoke(predict_main, *good, *common).exit_code == OK
    write_garbage(tmp_path / "garbage.jpg")
    some = invoke(predict_main, *good, tmp_path / "garbage.jpg", *common)
    assert some.exit_code == SKIPPED and "garbage.jpg" in some.output
    assert invoke(predict_main, tmp_path / "garbage.jpg", *common).exit_code == FAILED


def test_9_predict_into_a_read_only_folder(real_head, read_only):
    from pipeline.cli.predict import main as predict_main

    good = sorted(real_head["faces"].iterdir())[:1]
    result = invoke(predict_main, *good, "--checkpoint", real_head["head"], "--weights", real_head["weights"],
                    "--device", "cpu", "--decoder", "torch", "--quiet", "-o", read_only / "p.csv")
    assert result.exit_code == FAILED and "Traceback" not in result.output
    assert "cannot write" in result.output and str(read_only) in result.output


@pytest.mark.slow
def test_22_explain_exit_codes_and_15_long_names(real_head, tmp_path):
    from pipeline.cli.explain import main as explain_main

    common = ["-c", real_head["head"], "--weights", real_head["weights"], "--device", "cpu"]
    folder = tmp_path / "in"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", asymmetric_rgb())
    write_jpeg(folder / ("b" * 250 + ".jpg"), asymmetric_rgb())  # a name near the file-system limit
    ok = invoke(explain_main, folder, *common, "-o", tmp_path / "ok")
    assert ok.exit_code == OK, ok.output
    assert "explained 2 image(s)" in ok.output
    write_garbage(folder / "garbage.jpg")
    some = invoke(explain_main, folder, *common, "-o", tmp_path / "some")
    assert some.exit_code == SKIPPED and "garbage.jpg" in some.output

    report = invoke(explain_main, "--report", "--features", real_head["features"], "--data", real_head["faces"],
                    *common, "-o", tmp_path / "rep", "--split", "train", "--limit", "2", "--steps", "2")
    assert report.exit_code == OK, report.output
    meta = read_meta(real_head["features"])
    victim = real_head["faces"] / meta["path"][list(meta["split"]).index("train")]
    original = victim.read_bytes()
    victim.write_bytes(b"not an image")
    try:
        damaged = invoke(explain_main, "--report", "--features", real_head["features"], "--data",
                         real_head["faces"], *common, "-o", tmp_path / "rep2", "--split", "train", "--steps", "2")
    finally:
        victim.write_bytes(original)
    assert damaged.exit_code == SKIPPED, damaged.output
    assert victim.name in damaged.output


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB file system (tmpfs), so that a disk that fills up is really full, not monkeypatched."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.slow
def test_8_really_full_disk_while_assembling_exits_1_without_a_crash(tiny_disk, calibrated_mobilenet):
    """The batches fit, the final file does not, and the free-space check ran too early (another process
    filled the disk): one line, exit 1 (not libhdf5's segfault at exit, rc 139), no .tmp left."""
    script = ("import sys; import pipeline.features.writer as writer; writer.check_space = lambda *a, **k: None; "
              "from pipeline.cli.featurize import main; sys.argv[0] = 'featurize'; main()")
    out = tiny_disk / "f.h5"
    done = subprocess.run(
        [sys.executable, "-c", script, str(REPO / "sample" / "utkface"), "-o", str(out), "--limit", "72",
         "--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--device", "cpu",
         "--decoder", "torch", "--engine", "torch", "--batch-size", "16", "--quiet"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == FAILED, (done.returncode, done.stderr[-2000:])
    assert "no space left on the device while writing" in done.stderr and "MiB free now" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists() and not list(tiny_disk.glob("*.tmp")) and not list(tiny_disk.glob("*/*.tmp"))
    assert (tiny_disk / "f.h5.parts").is_dir()   # the finished batches are kept for the rerun


def test_14_16_predict_and_explain_skip_fifos_and_pictures_above_max_pixels(real_head, tmp_path):
    """A FIFO among the inputs is skipped unread (never blocks), and --max-pixels reaches both commands."""
    from pipeline.cli.explain import main as explain_main
    from pipeline.cli.predict import main as predict_main

    folder = tmp_path / "in"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", asymmetric_rgb())          # 120 x 90 pixels
    os.mkfifo(folder / "pipe.jpg")                           # nobody writes to it
    head = ["--weights", real_head["weights"], "--device", "cpu"]

    result = invoke(predict_main, folder, "--checkpoint", real_head["head"], *head, "--decoder", "torch", "--quiet")
    assert result.exit_code == SKIPPED, result.output
    assert "pipe.jpg" in result.output and "FIFO" in result.output
    limited = invoke(predict_main, folder / "a.jpg", "--checkpoint", real_head["head"], *head, "--decoder", "torch",
                     "--max-pixels", "1000")
    assert limited.exit_code == FAILED and "megapixels" in limited.output   # the only picture is above the limit

    explained = invoke(explain_main, folder / "a.jpg", "-c", real_head["head"], *head, "-o", tmp_path / "cam",
                       "--max-pixels", "1000")
    assert explained.exit_code != OK and "a.jpg" in explained.output and "megapixels" in explained.output
    assert invoke(explain_main, folder / "a.jpg", "-c", real_head["head"], *head, "-o", tmp_path / "cam2",
                  "--max-pixels", "none").exit_code == OK


def test_6_predict_and_explain_outputs_keep_a_row_for_a_name_that_is_not_utf8(real_head, tmp_path):
    """The CSVs hold every row, the odd name written with escapes, instead of stopping at it."""
    from pipeline.cli.explain import main as explain_main
    from pipeline.cli.predict import main as predict_main

    folder = tmp_path / "in"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", asymmetric_rgb())
    odd = os.fsdecode(bytes(folder) + b"/caf\xe9.jpg")             # Latin-1 bytes: not valid UTF-8
    write_jpeg(Path(odd), asymmetric_rgb(100, 80))
    head = ["--weights", real_head["weights"], "--device", "cpu"]

    result = invoke(predict_main, folder, "--checkpoint", real_head["head"], *head, "--decoder", "torch",
                    "-o", tmp_path / "p.csv")
    assert result.exit_code == OK, result.output
    rows = (tmp_path / "p.csv").read_text(encoding="utf-8").splitlines()
    assert len(rows) == 3 and any("caf\\xe9.jpg" in row for row in rows)

    explained = invoke(explain_main, folder, "-c", real_head["head"], *head, "-o", tmp_path / "cam")
    assert explained.exit_code == OK, explained.output
    index = (tmp_path / "cam" / "explanations.csv").read_text(encoding="utf-8").splitlines()
    assert len(index) == 3 and any("caf\\xe9.jpg" in row for row in index)
