"""predict on photos: the default model, -c by name, JSON/JSONL/CSV records, framing checks, outputs kept apart
from inputs, and a --help that does not import torch."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.predict import main as predict_main
from tests.inference.builders import save_head, write_photos
from tests.support.paths import REPO

HEAVY = ("torch", "torchvision", "onnxruntime", "nvidia.dali")


def invoke(*args):
    return CliRunner().invoke(predict_main, [str(a) for a in args])


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos") / "in")


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"detect": save_head(root / "detect", "detect"), "aligned": save_head(root / "aligned", "aligned", seed=4)}


COMMON = ["--device", "cpu", "--engine", "torch", "--decoder", "torch"]


@pytest.mark.parametrize("args", [["--help"], ["x.jpg", "-o", "out.txt"], ["x.jpg", "--bogus"]])
def test_help_and_usage_errors_do_not_import_torch(args):
    code = (f"import sys; from pipeline.cli.predict import main\n"
            f"try:\n    main({args!r}, standalone_mode=True)\nexcept SystemExit as e:\n    code = e.code\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], code)")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("HEAVY []"), (last, done.stderr[-2000:])
    assert last.endswith(" 0" if args == ["--help"] else " 2")
    if "out.txt" in args:
        assert "write .csv, .json or .jsonl" in done.stderr and "Traceback" not in done.stderr


def test_json_has_one_record_per_picture_with_boxes_landmarks_and_an_empty_list_for_a_cat(photos, heads, tmp_path):
    out = tmp_path / "out.json"
    result = invoke(photos["portrait"], photos["cat"], "-c", heads["detect"], *COMMON, "-o", out)
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == [str(photos["portrait"]), str(photos["cat"])]
    portrait, cat = records
    assert cat["faces"] == [] and "error" not in cat
    assert len(portrait["faces"]) == 1
    face = portrait["faces"][0]
    assert sorted(face) == ["age", "box", "group", "landmarks", "probabilities", "score"]
    assert 150 < face["box"][0] < face["box"][2] < 300 and len(face["landmarks"]) == 5
    assert face["group"] == max(face["probabilities"], key=face["probabilities"].get)
    assert "cat.jpg: no face found" in result.output
    # The same faces as the API gives.
    from pipeline.inference.estimator import AgeEstimator

    assert AgeEstimator(heads["detect"], device="cpu", engine="torch").predict(photos["portrait"]) == portrait["faces"]
    # The annotated copy lands next to -o, not in the input folder.
    assert (tmp_path / "out_annotated" / "astronaut_faces.png").is_file()
    assert not list(photos["portrait"].parent.glob("*_faces.png"))


def test_jsonl_and_csv_hold_a_row_for_a_picture_without_a_face_and_escape_formula_names(photos, heads, tmp_path,
                                                                                       monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "=cat.jpg").write_bytes(photos["cat"].read_bytes())        # a name a spreadsheet would run
    (folder / "astronaut.jpg").write_bytes(photos["portrait"].read_bytes())
    monkeypatch.chdir(folder)
    pictures = ["=cat.jpg", "astronaut.jpg"]
    jsonl = tmp_path / "p.jsonl"
    drawn = ["--annotated-dir", tmp_path / "drawn"]
    assert invoke(*pictures, "-c", heads["detect"], *COMMON, "-o", jsonl, "--quiet", *drawn).exit_code == 0
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert [(r["file"], len(r["faces"])) for r in lines] == [("=cat.jpg", 0), ("astronaut.jpg", 1)]
    table = tmp_path / "p.csv"
    assert invoke(*pictures, "-c", heads["detect"], *COMMON, "-o", table, "--quiet", *drawn).exit_code == 0
    with table.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    cat, face = rows
    assert cat["file"] == "'=cat.jpg" and cat["note"] == "no face found"
    assert cat["group"] == "" and cat["x0"] == ""
    assert face["face"] == "0" and float(face["score"]) > 0.9 and float(face["left_eye_x"]) < float(face["right_eye_x"])
    assert face["group"] == lines[1]["faces"][0]["group"]
    np.testing.assert_allclose(float(face["x0"]), lines[1]["faces"][0]["box"][0])


def test_outputs_that_would_clobber_or_mix_with_inputs_are_refused_in_one_line(photos, heads, tmp_path):
    import h5py

    feature_file = tmp_path / "features.csv"
    with h5py.File(feature_file, "w") as h5:
        h5["x"] = np.zeros(2)
    cases = {
        "one of this command's inputs": [photos["portrait"], "-o", photos["portrait"].with_suffix(".json")],
        "is a head checkpoint": [photos["portrait"], "-o", heads["detect"] / "head.json"],
        "is a feature file": [photos["portrait"], "-o", feature_file],
        "write .csv, .json or .jsonl": [photos["portrait"], "-o", tmp_path / "out.h5"],
    }
    (photos["portrait"].with_suffix(".json")).write_bytes(b"")   # an input that happens to end in .json
    try:
        cases["one of this command's inputs"] = [photos["portrait"].with_suffix(".json"), "-o",
                                        photos["portrait"].with_suffix(".json")]
        for expected, args in cases.items():
            result = invoke(*args, "-c", heads["detect"], *COMMON)
            assert result.exit_code == 2, (expected, result.output)
            assert expected in result.output and "Traceback" not in result.output
    finally:
        photos["portrait"].with_suffix(".json").unlink()
    assert (heads["detect"] / "head.json").read_text().startswith("{")
    # Annotated copies inside an input folder would be labelled on the next run: refused.
    result = invoke(photos["portrait"].parent, "-c", heads["detect"], *COMMON,
                    "-o", photos["portrait"].parent / "p.json")
    assert result.exit_code == 1 and "inside the input folder" in result.output
    assert not (photos["portrait"].parent / "p.json").exists()


def test_copies_in_the_annotated_folder_are_not_labelled_again(photos, heads, tmp_path):
    out = tmp_path / "p.json"
    assert invoke(photos["portrait"], "-c", heads["detect"], *COMMON, "-o", out, "--quiet").exit_code == 0
    drawn = tmp_path / "p_annotated"
    again = invoke(photos["portrait"], drawn, "-c", heads["detect"], *COMMON, "-o", out, "--quiet",
                   "--annotated-dir", tmp_path / "elsewhere")
    assert again.exit_code == 0, again.output
    assert [r["file"] for r in json.loads(out.read_text())] == [str(photos["portrait"])]
    assert "left out 1 of predict's own annotated copies" in again.output
    # Without the mark, the same picture is labelled as any other (the check is not by name or folder).
    from PIL import Image

    plain = tmp_path / "plain" / "astronaut_faces.png"
    plain.parent.mkdir()
    Image.open(drawn / "astronaut_faces.png").save(plain)
    assert invoke(plain, "-c", heads["detect"], *COMMON, "-o", out, "--quiet").exit_code == 0
    assert [r["file"] for r in json.loads(out.read_text())] == [str(plain)]


def test_framing_is_the_heads_own_and_a_mismatch_is_reported_in_one_line(photos, heads, tmp_path):
    # The aligned head, given no --faces, takes the picture whole: one "face", the whole cat.
    out = tmp_path / "a.json"
    result = invoke(photos["cat"], "-c", heads["aligned"], *COMMON, "-o", out, "--quiet")
    assert result.exit_code == 0, result.output
    (record,) = json.loads(out.read_text())
    assert len(record["faces"]) == 1 and record["faces"][0]["box"] == [0.0, 0.0, 451.0, 300.0]
    # Asked to detect with an aligned head: a one-line warning, and the cat has no face.
    result = invoke(photos["cat"], "-c", heads["aligned"], *COMMON, "--faces", "detect", "-o", out, "--quiet")
    assert result.exit_code == 0 and json.loads(out.read_text())[0]["faces"] == []
    warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "trained on whole aligned face crops" in warning[0]
    # An ensemble of a detect head and an aligned head: refused.
    result = invoke(photos["cat"], "-c", heads["detect"], "-c", heads["aligned"], *COMMON)
    assert result.exit_code == 1 and "framed in different ways" in result.output


def test_c_accepts_a_shipped_models_name(photos, heads, monkeypatch, tmp_path):
    import pipeline.models as models

    monkeypatch.setitem(models.MODELS, "test-model", heads["detect"])
    by_name, by_folder = tmp_path / "name.json", tmp_path / "folder.json"
    assert invoke(photos["portrait"], "-c", "test-model", *COMMON, "-o", by_name, "--quiet").exit_code == 0
    assert invoke(photos["portrait"], "-c", heads["detect"], *COMMON, "-o", by_folder, "--quiet").exit_code == 0
    assert json.loads(by_name.read_text()) == json.loads(by_folder.read_text())
    unknown = invoke(photos["portrait"], "-c", "no-such-model", *COMMON)
    assert unknown.exit_code == 1 and "no-such-model does not exist" in unknown.output
