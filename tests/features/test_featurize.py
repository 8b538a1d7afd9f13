"""The featurize job end to end: HDF5 layout, bad inputs, resume after a kill, shards + merge."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.backbones.registry import create_backbone
from pipeline.cli.featurize import main as featurize_cli
from pipeline.features.extract import shard_from_env
from pipeline.features.read import (
    read_features,
    read_meta,
    read_row_group,
    read_settings,
)
from pipeline.images.decoders import make_decoder
from tests.support.folders import write_utk_folder
from tests.support.imagefactory import (
    asymmetric_rgb,
    write_empty,
    write_exif_rotated_jpeg,
    write_garbage,
    write_jpeg,
    write_png,
    write_truncated_jpeg,
)
from tests.support.paths import REAL_IMAGES, REPO, real_data_reason


def featurize(*args, expect: int = 0) -> str:
    """Run featurize; expect: the exit code (0 all written, 3 some files skipped, 1 none written)."""
    result = CliRunner().invoke(featurize_cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result.output


@pytest.mark.slow
def test_hdf5_layout(utk_folder, tmp_path, calibrated_mobilenet):
    out = tmp_path / "f.h5"
    output = featurize(utk_folder, "-o", out, "--backbones", "mobilenet_v2,efficientnet_b0",
                       "--weights", f"mobilenet_v2={calibrated_mobilenet},efficientnet_b0=none",
                       "--batch-size", "5", "--quiet", "--decoder", "torch")
    assert "wrote" in output and "12 images" in output

    with h5py.File(out, "r") as h5:
        for name, width, stages in (("mobilenet_v2", 1280, 488), ("efficientnet_b0", 1280, 512)):
            assert h5[f"features/{name}"].shape == (12, 2, width)
            assert h5[f"stages/{name}"].shape == (12, 2, stages)
            assert h5[f"features/{name}"].dtype == np.float16
            assert h5[f"features/{name}"].chunks is not None
        assert set(h5["meta"]) == {"path", "age", "gender", "race", "group", "split", "sha256"}
        settings = json.loads(h5.attrs["settings"])
        assert settings["backbones"] == ["mobilenet_v2", "efficientnet_b0"]
        assert settings["weights"]["efficientnet_b0"] == "none"
        assert settings["weights"]["mobilenet_v2"].startswith("file:mobilenet_v2_calibrated.pth:sha256=")
        assert settings["preprocessing"]["size"] == 224 and settings["group_edges"] == [25, 50, 75, 116]
        assert "torch" in json.loads(h5.attrs["versions"]) and h5.attrs["created"]
        assert len(h5["skipped/path"]) == 0

    meta = read_meta(out)
    assert sorted(meta["age"].tolist()) == [3, 12, 20, 25, 26, 33, 47, 51, 60, 75, 80, 101]
    assert meta["group"].tolist() == [int(a > 25) + int(a > 50) + int(a > 75) for a in meta["age"]]
    assert set(meta["split"]) <= {"train", "val", "test"}

    # The stored rows are the backbone's features of that very file, plain and mirrored.
    model = create_backbone("mobilenet_v2", str(calibrated_mobilenet))
    views = make_decoder("torch", "cpu").decode([utk_folder / p for p in meta["path"][:3]]).views
    with torch.inference_mode():
        outputs = model(views.flatten(0, 1))
    pooled, stages = outputs["features"], outputs["stages"]
    stored = read_features(out, "mobilenet_v2")[:3]
    expected = pooled.reshape(3, 2, -1).numpy()
    np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    assert not np.allclose(stored[:, 0], stored[:, 1])  # the mirror is a different view
    np.testing.assert_allclose(read_features(out, "mobilenet_v2", "stages")[:3], stages.reshape(3, 2, -1).numpy(),
                               rtol=2e-3, atol=2e-3 * stages.abs().max().item())


def test_h5ls_reads_the_file(utk_folder, tmp_path, fast):
    if shutil.which("h5ls") is None:
        pytest.skip("h5ls (hdf5-tools) is not installed")
    out = tmp_path / "f.h5"
    featurize(utk_folder, "-o", out, *fast, "--limit", "3")
    listing = subprocess.run(["h5ls", "-r", str(out)], capture_output=True, text=True, check=True).stdout
    assert "/features/mobilenet_v2" in listing and "{3, 2, 1280}" in listing


def test_float32_option(utk_folder, tmp_path, fast):
    out = tmp_path / "f32.h5"
    featurize(utk_folder, "-o", out, *fast, "--dtype", "float32", "--limit", "2")
    with h5py.File(out, "r") as h5:
        assert h5["features/mobilenet_v2"].dtype == np.float32


@pytest.mark.parametrize("decoder", ["torch", "dali"])
def test_bad_inputs_are_skipped_with_reasons(tmp_path, decoder, fast):
    if decoder == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    folder = tmp_path / "mixed"
    good = write_utk_folder(folder, [10, 30, 60, 90])
    write_jpeg(folder / "40_0_1_20170109000000101.jpg.chip.jpg", asymmetric_rgb(), mode="L")      # grayscale
    write_jpeg(folder / "41_0_1_20170109000000102.jpg.chip.jpg", asymmetric_rgb(), mode="CMYK")   # CMYK
    write_png(folder / "42_0_1_20170109000000103.png", asymmetric_rgb(), mode="RGBA")              # PNG
    write_exif_rotated_jpeg(folder / "43_0_1_20170109000000104.jpg.chip.jpg", asymmetric_rgb(), 6)
    write_truncated_jpeg(folder / "44_0_1_20170109000000105.jpg.chip.jpg", asymmetric_rgb())
    write_garbage(folder / "45_0_1_20170109000000106.jpg.chip.jpg")
    write_empty(folder / "46_0_1_20170109000000107.jpg.chip.jpg")
    write_jpeg(folder / "portrait_of_grandma.jpg", asymmetric_rgb())                               # bad name
    out = tmp_path / "f.h5"
    output = featurize(folder, "-o", out, *fast, "--decoder", decoder, "--batch-size", "4", expect=3)

    meta = read_meta(out)
    assert sorted(meta["age"].tolist()) == [10, 30, 40, 41, 42, 43, 60, 90]
    with h5py.File(out, "r") as h5:
        skipped = dict(zip(h5["skipped/path"].asstr()[()], h5["skipped/reason"].asstr()[()]))
    assert set(skipped) == {"44_0_1_20170109000000105.jpg.chip.jpg", "45_0_1_20170109000000106.jpg.chip.jpg",
                            "46_0_1_20170109000000107.jpg.chip.jpg", "portrait_of_grandma.jpg"}
    assert "truncated" in skipped["44_0_1_20170109000000105.jpg.chip.jpg"]
    assert "empty" in skipped["46_0_1_20170109000000107.jpg.chip.jpg"]
    assert skipped["portrait_of_grandma.jpg"].startswith("bad name")
    assert "skipped 4" in output and "portrait_of_grandma.jpg" in output

    # The good images in a batch with bad ones get the same features as alone.
    alone = tmp_path / "alone.h5"
    featurize(good[0].parent, "-o", alone, *fast, "--decoder", decoder, "--limit", "1")
    first = list(meta["path"]).index(good[0].name)
    np.testing.assert_allclose(read_features(out, "mobilenet_v2")[first], read_features(alone, "mobilenet_v2")[0],
                               rtol=2e-3, atol=1e-3)


def test_finished_job_is_not_redone_and_other_settings_are_refused(utk_folder, tmp_path, fast):
    out = tmp_path / "f.h5"
    featurize(utk_folder, "-o", out, *fast, "--limit", "4")
    before = out.stat().st_mtime_ns
    assert "nothing to do" in featurize(utk_folder, "-o", out, *fast, "--limit", "4")
    assert out.stat().st_mtime_ns == before

    result = CliRunner().invoke(featurize_cli, [str(utk_folder), "-o", str(out), *fast, "--limit", "4",
                                                "--bins", "30,60"])
    assert result.exit_code != 0
    assert "already exists with other settings" in result.output and "group_edges" in result.output


def _cli(*args) -> list[str]:
    return [sys.executable, str(REPO / "featurize.py"), *[str(a) for a in args]]


def _wait_for_parts(parts: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(list(parts.glob("rows-*.npz"))) >= 2:
            return
        if proc.poll() is not None:
            pytest.fail(f"featurize ended before it could be interrupted:\n{proc.stdout.read()}")
        time.sleep(0.02)
    pytest.fail("no batch was finished in time")


@pytest.mark.slow
@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_run_resumes_to_the_same_file(tmp_path, how, fast):
    folder = tmp_path / "utk"
    # 40 batches: the signal must land while the job runs, even when this test process is slow to wake.
    # PyTorch engine: ONNX Runtime can finish all 40 before the signal lands (its resume: test_engines.py).
    write_utk_folder(folder, [(7 * i) % 117 for i in range(80)])
    args = [folder, *fast, "--batch-size", "2", "--decoder", "torch", "--engine", "torch"]
    out = tmp_path / "resumed.h5"

    # A job started in the background by a non-interactive shell inherits SIGINT ignored; the user's
    # Ctrl-C is what this test stands for, so the child gets the default handling back.
    proc = subprocess.Popen(_cli(*args, "-o", out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for_parts(Path(str(out) + ".parts"), proc)
    proc.send_signal(how)
    output = proc.communicate(timeout=60)[0]
    if how == signal.SIGINT:
        assert proc.returncode == 130 and "rerun the same command to resume" in output
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp"))

    resumed = subprocess.run(_cli(*args, "-o", out), capture_output=True, text=True, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout
    assert not Path(str(out) + ".parts").exists()

    straight = tmp_path / "straight.h5"
    featurize(*args, "-o", straight)
    np.testing.assert_array_equal(read_features(out, "mobilenet_v2"), read_features(straight, "mobilenet_v2"))
    np.testing.assert_array_equal(read_features(out, "mobilenet_v2", "stages"),
                                  read_features(straight, "mobilenet_v2", "stages"))
    for column, values in read_meta(out).items():
        np.testing.assert_array_equal(values, read_meta(straight)[column])
    assert read_settings(out) == read_settings(straight)


def test_resume_with_other_settings_is_refused(utk_folder, tmp_path, fast):
    out = tmp_path / "f.h5"
    parts = Path(str(out) + ".parts")
    parts.mkdir()
    (parts / "settings.json").write_text(json.dumps({"backbones": ["resnet50"]}))
    result = CliRunner().invoke(featurize_cli, [str(utk_folder), "-o", str(out), *fast])
    assert result.exit_code != 0 and "unfinished job with other settings" in result.output


def test_two_shards_merge_to_a_single_run(utk_folder, tmp_path, monkeypatch, fast):
    single = tmp_path / "single.h5"
    featurize(utk_folder, "-o", single, *fast, "--batch-size", "4")

    out = tmp_path / "sharded.h5"
    featurize(utk_folder, "-o", out, *fast, "--batch-size", "4", "--shard", "0/2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    featurize(utk_folder, "-o", out, *fast, "--batch-size", "4")  # shard 1/2 from the SLURM variables
    shards = sorted(tmp_path.glob("sharded.shard-*-of-2.h5"))
    assert [p.name for p in shards] == ["sharded.shard-0-of-2.h5", "sharded.shard-1-of-2.h5"]
    assert len(read_meta(shards[0])["path"]) == 6

    merged = tmp_path / "merged.h5"
    result = CliRunner().invoke(featurize_cli, ["merge", *map(str, shards), "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert read_settings(merged) == read_settings(single)
    for column, values in read_meta(single).items():
        np.testing.assert_array_equal(read_meta(merged)[column], values)
    for kind in ("last", "stages"):
        a, b = read_features(merged, "mobilenet_v2", kind), read_features(single, "mobilenet_v2", kind)
        np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3 * np.abs(b).max())

    incomplete = CliRunner().invoke(featurize_cli, ["merge", str(shards[0]), "-o", str(tmp_path / "x.h5")])
    assert incomplete.exit_code != 0 and "missing [1]" in incomplete.output


def test_join_puts_per_backbone_files_together(tmp_path):
    from tests.support.synthetic import make_feature_file

    widths = {"mobilenet_v2": (12, 6), "resnet50": (16, 8), "efficientnet_b0": (10, 4)}
    mnv2 = make_feature_file(tmp_path / "mnv2.h5", n=40, backbones=("mobilenet_v2",), widths=widths)
    r50 = make_feature_file(tmp_path / "r50.h5", n=40, backbones=("resnet50",), widths=widths, weights="IMAGENET1K_V1")
    joined = tmp_path / "both.h5"
    result = CliRunner().invoke(featurize_cli, ["join", str(mnv2), str(r50), "-o", str(joined)])
    assert result.exit_code == 0, result.output

    settings = read_settings(joined)
    assert settings["backbones"] == ["mobilenet_v2", "resnet50"]
    with h5py.File(joined, "r") as h5:  # the plain attributes for h5ls/HDFView agree with the settings
        assert h5.attrs["backbones"] == "mobilenet_v2,resnet50"
        assert [o["path"] for o in json.loads(h5.attrs["joined_from"])] == [str(mnv2), str(r50)]
    assert settings["weights"] == {"mobilenet_v2": "none", "resnet50": "IMAGENET1K_V1"}
    for source, name in ((mnv2, "mobilenet_v2"), (r50, "resnet50")):
        for kind in ("last", "stages"):
            np.testing.assert_array_equal(read_features(joined, name, kind), read_features(source, name, kind))
    for column, values in read_meta(mnv2).items():
        np.testing.assert_array_equal(read_meta(joined)[column], values)

    def join(*files):
        return CliRunner().invoke(featurize_cli, ["join", *map(str, files), "-o", str(tmp_path / "x.h5")])

    other_rows = make_feature_file(tmp_path / "rows.h5", n=30, backbones=("efficientnet_b0",), widths=widths)
    assert "do not hold the same images" in join(mnv2, other_rows).output
    other_seed = make_feature_file(tmp_path / "seed.h5", n=40, backbones=("efficientnet_b0",), widths=widths, seed=1)
    assert "seed: file has 1" in join(mnv2, other_seed).output
    assert "mobilenet_v2, which an earlier file already has" in join(mnv2, joined).output
    assert not (tmp_path / "x.h5").exists()


def test_shard_from_environment():
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4"}) == (3, 4)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4",
                           "SLURM_ARRAY_TASK_MIN": "1"}) == (3, 4)
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "8"}) == (1, 8)
    assert shard_from_env({}) is None


def test_readable_errors(tmp_path, fast):
    runner = CliRunner()
    missing = runner.invoke(featurize_cli, [str(tmp_path / "nowhere"), "-o", str(tmp_path / "f.h5"), *fast])
    assert missing.exit_code != 0 and "does not exist" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    none_found = runner.invoke(featurize_cli, [str(empty), "-o", str(tmp_path / "f.h5"), *fast])
    assert none_found.exit_code != 0 and "no UTKFace images found" in none_found.output
    bad_shard = runner.invoke(featurize_cli, [str(empty), "--shard", "2/2", *fast])
    assert bad_shard.exit_code != 0 and "0 <= i < n" in bad_shard.output
    bad_weights = runner.invoke(featurize_cli, [str(empty), "--backbones", "mobilenet_v2",
                                                "--weights", "resnet50=/models/r50.pth"])
    assert bad_weights.exit_code != 0 and "'resnet50' is not one of the backbones here" in bad_weights.output


def test_weight_pairs_parse_the_same_in_every_command():
    from pipeline.cli.options import parse_weight_pairs

    assert parse_weight_pairs("resnet50=/m/r50.pth, mobilenet_v2=IMAGENET1K_V1") == \
        {"resnet50": "/m/r50.pth", "mobilenet_v2": "IMAGENET1K_V1"}
    assert parse_weight_pairs(("resnet50=a.pth", "mobilenet_v2=b.pth")) == {"resnet50": "a.pth", "mobilenet_v2": "b.pth"}
    assert parse_weight_pairs(None) == {}
    with pytest.raises(click.BadParameter, match="expected NAME=FILE_OR_ENUM"):
        parse_weight_pairs("resnet50")


def test_default_data_is_the_shipped_sample(tmp_path, fast, monkeypatch):
    sample = REPO / "sample" / "utkface"
    files = list(sample.glob("*.jpg"))
    assert 0 < len(files) <= 100 and (REPO / "sample" / "NOTICE.md").exists()
    groups = [int(a > 25) + int(a > 50) + int(a > 75) for a in (int(f.name.split("_")[0]) for f in files)]
    assert min(np.bincount(groups)) >= 20  # spread over the four groups

    monkeypatch.chdir(tmp_path)
    output = featurize(*fast, "--limit", "3")  # no DATA_DIR: the sample, into ./features.h5
    assert "3 images" in output
    assert read_settings(tmp_path / "features.h5")["records"]
    assert all((sample / p).is_file() for p in read_meta(tmp_path / "features.h5")["path"])


def test_a_shard_whose_images_all_fail_still_gives_a_file(tmp_path, fast):
    folder = tmp_path / "bad"
    folder.mkdir()
    write_garbage(folder / "30_0_0_20170109000000001.jpg.chip.jpg")
    write_empty(folder / "31_0_0_20170109000000002.jpg.chip.jpg")
    out = tmp_path / "f.h5"
    output = featurize(folder, "-o", out, *fast, expect=1)  # exit 1: no image made it (exit_codes.py)
    assert "0 images" in output and "skipped 2" in output
    with h5py.File(out, "r") as h5:  # the file is still written, so a shard array can be merged
        assert h5["features/mobilenet_v2"].shape == (0, 2, 1280)


@pytest.mark.slow
@pytest.mark.skipif(real_data_reason() is not None, reason=str(real_data_reason()))
def test_real_weights_features_classify_age_groups(tmp_path):
    """200 real faces, 50 per age group, with the real weights: a linear probe beats chance clearly."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pipeline.ingest.dataset import age_to_group
    from pipeline.ingest.labels import parse_name

    folder = tmp_path / "real"
    folder.mkdir()
    by_group = {}
    for path in sorted(REAL_IMAGES.iterdir()):
        by_group.setdefault(int(age_to_group(parse_name(path.name)[0])), []).append(path)
    for paths in by_group.values():  # 50 per group, spread over each group's ages
        for path in paths[:: len(paths) // 50][:50]:
            (folder / path.name).symlink_to(path)
    out = tmp_path / "real.h5"
    featurize(folder, "-o", out, "--quiet", "--batch-size", "32")
    groups = read_meta(out)["group"]
    assert np.bincount(groups).tolist() == [50, 50, 50, 50]
    for name in ("mobilenet_v2", "resnet50", "efficientnet_b0"):
        features = read_features(out, name)[:, 0]
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000))
        accuracy = cross_val_score(probe, features, groups, cv=5).mean()
        assert accuracy > 0.25 + 0.15, (name, accuracy)  # chance is 0.25 with balanced groups


def test_a_shard_planned_with_no_rows_is_not_a_failure(tmp_path, fast):
    """More shards than images: an empty shard writes an empty file and exits 0, without an empty splits line."""
    folder = tmp_path / "two"
    write_utk_folder(folder, [20, 40])
    out = tmp_path / "f.h5"
    output = featurize(folder, "-o", out, "--shard", "2/4", *fast)   # bounds 0,0,1,1,2: shard 2 has no rows
    assert "0 images" in output and "splits:" not in output
    assert read_meta(out.with_name("f.shard-2-of-4.h5"))["age"].size == 0
    featurize(folder, "-o", out, "--shard", "2/4", *fast)             # "already done" is not a failure either


def test_verify_option_skips_files_of_cut_out_faces(tmp_path, fast):
    """featurize --faces box --verify N: the good file stays, verify is skipped with a warning (exit 0)."""
    folder = tmp_path / "pics"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", asymmetric_rgb(160, 120))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,x,y,w,h\na.jpg,30,20,30,70,90\n")
    out = tmp_path / "box.h5"
    result = CliRunner().invoke(featurize_cli, [str(a) for a in (folder, "-o", out, "--faces", "box", "--labels",
                                                                   labels, "--verify", 2, "--device", "cpu", *fast)])
    assert result.exit_code == 0, result.output
    assert "--verify skipped" in result.output and "--faces box" in result.output
    assert read_meta(out)["age"].tolist() == [30]
    # The verify command itself still refuses such a file, with its reason.
    refused = CliRunner().invoke(featurize_cli, ["verify", str(out), "--data", str(folder)])
    assert refused.exit_code == 1 and "faces cut out" in refused.output


def test_max_pixels_option_reaches_the_decoder(tmp_path, fast):
    """--max-pixels N skips larger pictures (by their header) with the reason; 0 / none lifts the limit."""
    from PIL import Image

    from tests.support.folders import face_like

    folder = tmp_path / "sizes"
    write_utk_folder(folder, [20])                                   # 200 x 200 = 40,000 pixels
    big = folder / "45_1_0_20170109000000009.jpg.chip.jpg"
    Image.fromarray(face_like(9, size=300)).save(big, quality=92)   # 300 x 300 = 90,000 pixels
    output = featurize(folder, "-o", tmp_path / "limited.h5", "--max-pixels", "50000", *fast, expect=3)
    assert "skipped 1" in output and "megapixels" in output and big.name in output
    assert read_meta(tmp_path / "limited.h5")["age"].tolist() == [20]
    for no_limit in ("0", "none"):
        featurize(folder, "-o", tmp_path / f"all-{no_limit}.h5", "--max-pixels", no_limit, *fast)
        assert sorted(read_meta(tmp_path / f"all-{no_limit}.h5")["age"].tolist()) == [20, 45]
    assert "--max-pixels" in featurize(folder, "-o", tmp_path / "x.h5", "--max-pixels", "lots", *fast, expect=2)


def test_merge_keeps_face_records_when_the_first_shards_have_no_rows(tmp_path, fast):
    """--faces box over 2 pictures in 4 shards: shards 0 and 2 are empty and have no /faces group; the merged
    file still holds every kept row's face record. A shard with rows that lacks a face dataset is refused."""
    folder = tmp_path / "pics"
    folder.mkdir()
    write_jpeg(folder / "a.jpg", asymmetric_rgb(160, 120))
    write_jpeg(folder / "b.jpg", asymmetric_rgb(120, 160))
    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,x,y,w,h\na.jpg,30,20,30,70,90\nb.jpg,60,40,10,80,80\n")
    out = tmp_path / "f.h5"
    for index in range(4):
        featurize(folder, "-o", out, "--shard", f"{index}/4", "--faces", "box", "--labels", labels,
                  "--device", "cpu", *fast)
    shards = [tmp_path / f"f.shard-{i}-of-4.h5" for i in range(4)]
    assert [read_row_group(s) != {} for s in shards] == [False, True, False, True]
    featurize("merge", *shards, "-o", tmp_path / "merged.h5")
    faces = read_row_group(tmp_path / "merged.h5")
    assert read_meta(tmp_path / "merged.h5")["age"].tolist() == [30, 60]
    np.testing.assert_allclose(faces["box"], [[20, 30, 90, 120], [40, 10, 120, 90]])
    with h5py.File(shards[3], "r+") as h5:
        del h5["faces/box"]
    refused = featurize("merge", *shards, "-o", tmp_path / "bad.h5", expect=1)
    assert "has no /faces/box" in refused and not (tmp_path / "bad.h5").exists()
