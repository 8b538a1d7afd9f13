"""Label sources (UTKFace names, CSV/TSV files, class folders), their skip reasons, subject-aware splits,
and the UTKFace-names path staying exactly what it was before label sources existed."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli.featurize import main as featurize_cli
from pipeline.features.extract import FeaturizeConfig, make_plan
from pipeline.features.read import read_features, read_meta, read_settings
from pipeline.ingest import labels as labels_module
from pipeline.ingest.dataset import Record, assign_splits, scan, split_counts
from pipeline.ingest.labels import ClassFolders, CsvLabels, make_csv_format, make_source
from tests.support.folders import face_like, write_utk_folder
from tests.support.paths import REAL_IMAGES, REPO

GOLDEN = json.loads((REPO / "tests" / "golden" / "utkface_ingest.json").read_text())
SAMPLE = REPO / "sample" / "utkface"
EDGES = (25, 50, 75, 116)


def featurize(*args, ok=(0,)):
    result = CliRunner().invoke(featurize_cli, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert result.exit_code in ok, result.output
    return result


def write_csv(path: Path, rows, delimiter=",", bom=False) -> Path:
    with path.open("w", newline="", encoding="utf-8-sig" if bom else "utf-8") as handle:
        csv.writer(handle, delimiter=delimiter).writerows(rows)
    return path


def write_images(folder: Path, names, start_seed=0) -> list[str]:
    for i, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(face_like(start_seed + i)).save(folder / name, format="JPEG", quality=90)
    return list(names)


def csv_scan(folder, labels_path, **fmt):
    source = CsvLabels(labels_path, make_csv_format(labels_path=labels_path, **fmt))
    return scan(folder, EDGES, source=source)


def rows_digest(meta) -> str:
    """As tests/golden/utkface_ingest.json was made (at git a635330, before label sources)."""
    rows = [[str(meta["path"][i]), int(meta["age"][i]), int(meta["gender"][i]), int(meta["race"][i]),
             int(meta["group"][i]), str(meta["split"][i]), str(meta["sha256"][i])] for i in range(len(meta["path"]))]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


# --------------------------------------------------------------------------- the default path is unchanged


def _plan_matches_golden(data_dir: Path, key: str, seed: int, limit):
    golden = GOLDEN[key]
    config = FeaturizeConfig(data_dir=data_dir, out=Path("unused.h5"), backbones=("mobilenet_v2",),
                             weights={"mobilenet_v2": "none"}, seed=seed, limit=limit, device="cpu")
    plan = make_plan(config)
    # The same rows in the same order, with the same labels, hashes and splits...
    assert plan.rows == golden["rows"] and rows_digest(plan.meta) == golden["rows_sha256"]
    assert set(plan.meta) == {"path", "age", "gender", "race", "group", "split", "sha256"}  # no optional columns
    assert [list(s) for s in plan.skipped] == golden["skipped"] and split_counts(plan.meta["split"]) == golden["split_counts"]
    # ...and every setting that existed then has the same value. Other features (compute record, faces,
    # descriptors) may add keys; the default label source adds none.
    assert {k: plan.settings[k] for k in golden["settings"]} == golden["settings"]
    assert "labels" not in plan.settings


@pytest.mark.parametrize("seed, limit", [(0, None), (5, None), (0, 40)])
def test_default_utkface_source_gives_the_same_rows_splits_and_settings_as_before(seed, limit):
    _plan_matches_golden(SAMPLE, f"sample-seed{seed}-limit{limit}", seed, limit)


@pytest.mark.slow
@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason=f"UTKFace not found at {REAL_IMAGES}")
def test_full_utkface_ingest_is_unchanged():
    _plan_matches_golden(REAL_IMAGES, "full-seed0-limitNone", 0, None)


def test_a_csv_with_the_same_labels_gives_bit_identical_features(tmp_path, fast):
    """The label source decides rows and labels only: the same files give the same feature bits."""
    folder = tmp_path / "utk"
    write_utk_folder(folder, [4, 19, 30, 44, 58, 70, 81, 99])
    featurize(folder, "-o", tmp_path / "names.h5", *fast, "--device", "cpu", "--decoder", "torch", "--batch-size", "3")
    names_meta = read_meta(tmp_path / "names.h5")
    labels = write_csv(tmp_path / "labels.csv", [["path", "age", "gender", "race"]] + [
        [p, int(a), int(g), int(r)] for p, a, g, r in
        zip(names_meta["path"], names_meta["age"], names_meta["gender"], names_meta["race"])][::-1])
    featurize(folder, "-o", tmp_path / "csv.h5", *fast, "--device", "cpu", "--decoder", "torch", "--batch-size", "3",
              "--labels", labels)
    csv_meta = read_meta(tmp_path / "csv.h5")
    for column in ("path", "age", "gender", "race", "group", "split", "sha256"):
        assert np.array_equal(csv_meta[column], names_meta[column]), column
    for kind in ("last", "stages"):
        assert np.array_equal(read_features(tmp_path / "csv.h5", "mobilenet_v2", kind),
                              read_features(tmp_path / "names.h5", "mobilenet_v2", kind))
    names, other = read_settings(tmp_path / "names.h5"), read_settings(tmp_path / "csv.h5")
    assert "labels" not in names and other["labels"]["source"] == "csv" and other["labels"]["file"] == "labels.csv"
    differ = {k for k in set(names) | set(other) if names.get(k) != other.get(k)}
    assert differ == {"labels", "fingerprint"}


# --------------------------------------------------------------------------- CSV / TSV labels


def test_csv_labels_with_every_optional_column(tmp_path):
    write_images(tmp_path, ["a.jpg", "sub/b.jpg", "c.png", "d.jpg", "e.jpg", "unlisted.jpg"])
    labels = write_csv(tmp_path / "labels.csv", [
        ["path", "age", "gender", "race", "subject", "x", "y", "w", "h",
         "left_eye_x", "left_eye_y", "right_eye_x", "right_eye_y"],
        ["a.jpg", "31", "f", "2", "anna", "10", "12", "100", "110", "40", "50", "80", "51"],
        ["sub/b.jpg", "7", "male", "", "ben", "", "", "", "", "", "", "", ""],
        ["c.png", "80.0", "", "4", "", "1.5", "2.5", "3", "4", "", "", "", ""],
        ["d.jpg", "50", "-1", "-1", "", "", "", "", "", "", "", "", ""],  # -1 = unknown, as feature files store it
        ["e.jpg", "50", "x", "", "", "", "", "", "", "", "", "", ""],
    ])
    records, skipped = csv_scan(tmp_path, labels)
    by_path = {r.path: r for r in records}
    assert set(by_path) == {"a.jpg", "sub/b.jpg", "c.png", "d.jpg"}
    assert [(s.path, s.reason) for s in skipped] == [
        ("e.jpg", "gender 'x' is not 0/1, m/f or male/female (labels.csv line 6)")]
    assert (by_path["d.jpg"].gender, by_path["d.jpg"].race) == (-1, -1)
    a, b, c = by_path["a.jpg"], by_path["sub/b.jpg"], by_path["c.png"]
    assert (a.age, a.gender, a.race, a.group, a.subject) == (31, 1, 2, 1, "anna")
    assert a.box == (10, 12, 100, 110) and a.eyes == (40, 50, 80, 51)
    assert (b.age, b.gender, b.race, b.group, b.subject, b.box, b.eyes) == (7, 0, -1, 0, "ben", None, None)
    assert (c.age, c.gender, c.group, c.box) == (80, -1, 3, (1.5, 2.5, 3, 4))
    assert a.sha256 == hashlib.sha256((tmp_path / "a.jpg").read_bytes()).hexdigest()


def test_group_labels_as_index_or_range(tmp_path):
    write_images(tmp_path, [f"{i}.jpg" for i in range(6)])
    labels = write_csv(tmp_path / "groups.csv", [
        ["path", "group", "age"],
        ["0.jpg", "26-50", ""], ["1.jpg", "3", ""], ["2.jpg", "20-30", ""], ["3.jpg", "7", ""],
        ["4.jpg", "0-25", "12"], ["5.jpg", "0-25", "40"],
    ])
    records, skipped = csv_scan(tmp_path, labels)
    assert [(r.path, r.group, r.age) for r in records] == [("0.jpg", 1, -1), ("1.jpg", 3, -1), ("4.jpg", 0, 12)]
    reasons = {s.path: s.reason for s in skipped}
    assert "age range 20-30 is not one of the groups 0-25, 26-50, 51-75, 76-116" in reasons["2.jpg"]
    assert "group 7 outside 0-3" in reasons["3.jpg"]
    assert "age 40 is in group 1, but the group column says 0" in reasons["5.jpg"]
    assert "groups.csv line 7" in reasons["5.jpg"]  # the reason says where the row came from


def test_bad_rows_are_skipped_with_their_reason(tmp_path):
    write_images(tmp_path, ["ok.jpg", "old.jpg", "dup.jpg", "twice.jpg"])
    labels = write_csv(tmp_path / "labels.csv", [
        ["path", "age"],
        ["ok.jpg", "20"], ["missing.jpg", "30"], ["old.jpg", "130"], ["ok_too.jpg", "abc"],
        ["dup.jpg", "40"], ["dup.jpg", "41"], ["twice.jpg", "60"], ["twice.jpg", "60"], ["../escape.jpg", "5"],
        ["half.jpg"],
    ])
    records, skipped = csv_scan(tmp_path, labels)
    assert [r.path for r in records] == ["ok.jpg", "twice.jpg"]  # an identical duplicate row is kept once
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["missing.jpg"].startswith("missing file (labels.csv line 3)")
    assert reasons["old.jpg"].startswith("age 130 outside 0-116")
    assert reasons["ok_too.jpg"] == "age 'abc' is not a number (labels.csv line 5)"
    assert reasons["dup.jpg"] == "listed 2 times with conflicting labels (labels.csv line 6, labels.csv line 7)"
    assert "leaves the data folder" in reasons["../escape.jpg"]
    assert reasons["(labels.csv line 11)"] == "line has 1 fields, the columns need 2"


def test_missing_columns_are_an_error_listing_the_columns_found(tmp_path):
    labels = write_csv(tmp_path / "labels.csv", [["file", "years"], ["a.jpg", "3"]])
    with pytest.raises(ValueError, match=r"lacks a 'path' column .*columns found: 'file', 'years'"):
        csv_scan(tmp_path, labels)
    with pytest.raises(ValueError, match=r"lacks an 'age' or 'group' column.*columns found: 'file', 'years'"):
        csv_scan(tmp_path, labels, columns="path=file")
    records, _ = csv_scan(tmp_path, labels, columns="path=file,age=years")  # renamed: a.jpg is missing, skipped
    assert records == []
    with pytest.raises(ValueError, match="lacks column 'file_name' \\(given for path\\); columns found: 'file', 'years'"):
        csv_scan(tmp_path, labels, preset="appa-real")
    tsv_as_csv = write_csv(tmp_path / "labels.txt", [["path", "age"], ["a.jpg", "3"]], delimiter="\t")
    with pytest.raises(ValueError, match="try --label-delimiter tab"):
        csv_scan(tmp_path, tsv_as_csv)


def test_bom_tsv_headerless_and_presets(tmp_path):
    write_images(tmp_path, ["x/1.jpg", "x/2.jpg", "000001.jpg"])
    bom = write_csv(tmp_path / "bom.csv", [["path", "age"], ["x/1.jpg", "33"]], bom=True)
    assert bom.read_bytes()[:3] == b"\xef\xbb\xbf"
    assert [(r.path, r.age) for r in csv_scan(tmp_path, bom)[0]] == [("x/1.jpg", 33)]

    tsv = write_csv(tmp_path / "labels.tsv", [["path", "age"], ["x/2.jpg", "64"]], delimiter="\t")  # by extension
    assert [(r.path, r.age) for r in csv_scan(tmp_path, tsv)[0]] == [("x/2.jpg", 64)]

    headerless = write_csv(tmp_path / "list.txt", [["x/1.jpg", "ignored", "15"], ["x/2.jpg", "", "90"]],
                           delimiter="\t")
    records, _ = csv_scan(tmp_path, headerless, delimiter="tab", header=False, columns="path,-,age")
    assert [(r.path, r.age, r.group) for r in records] == [("x/1.jpg", 15, 0), ("x/2.jpg", 90, 3)]
    records, _ = csv_scan(tmp_path, headerless, preset="path-age-tsv", columns="age=2")
    assert [r.age for r in records] == [15, 90]

    appa = write_csv(tmp_path / "gt_avg_test.csv", [
        ["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"],
        ["000001.jpg", "38", "25.18", "4.27", "27"]])
    assert [(r.path, r.age) for r in csv_scan(tmp_path, appa, preset="appa-real")[0]] == [("000001.jpg", 27)]
    write_images(tmp_path, ["000001.jpg_face.jpg"])
    assert [(r.path, r.age) for r in csv_scan(tmp_path, appa, preset="appa-real-face")[0]] == [
        ("000001.jpg_face.jpg", 27)]

    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,age\nJosé.jpg,30\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"labels file .*latin1.csv is not UTF-8 text: byte 0xe9 .*line 2"):
        csv_scan(tmp_path, latin1)


def test_option_combinations_are_checked():
    with pytest.raises(ValueError, match="not both"):
        make_source(Path("a.csv"), folders=True)
    with pytest.raises(ValueError, match="need --labels"):
        make_source(None, preset="appa-real")
    with pytest.raises(ValueError, match="without a header needs --label-columns"):
        make_csv_format(header=False)
    with pytest.raises(ValueError, match="unknown field 'years'"):
        make_csv_format(columns="years=age")
    with pytest.raises(ValueError, match="unknown label preset"):
        make_csv_format(preset="imdb")


# --------------------------------------------------------------------------- class folders


def test_class_folders(tmp_path):
    write_images(tmp_path, ["34/a.jpg", "34/deeper/b.jpg", "26-50/c.jpg", "0-30/d.jpg", "young/e.jpg", "f.jpg",
                            "120/g.jpg"])
    records, skipped = scan(tmp_path, EDGES, source=ClassFolders())
    assert [(r.path, r.age, r.group) for r in records] == [
        ("26-50/c.jpg", -1, 1), ("34/a.jpg", 34, 1), ("34/deeper/b.jpg", 34, 1)]
    reasons = {s.path: s.reason for s in skipped}
    assert "age range 0-30 is not one of the groups" in reasons["0-30/d.jpg"]
    assert "bad label folder 'young'" in reasons["young/e.jpg"]
    assert reasons["f.jpg"].startswith("not inside a label folder")
    assert reasons["120/g.jpg"].startswith("age 120 outside 0-116")


# --------------------------------------------------------------------------- subjects


def _subject_records(n_subjects=300, seed=0):
    rng = np.random.default_rng(seed)
    records = []
    for s in range(n_subjects):
        group = int(rng.choice(4, p=[0.3, 0.4, 0.2, 0.1]))
        for k in range(int(rng.integers(1, 8))):
            records.append(Record(f"s{s}_{k}.jpg", 30, 0, 0, group, f"{s:032x}{k:032x}", subject=f"person{s}"))
    return records


def test_subject_aware_splits_keep_each_person_in_one_split():
    records = _subject_records()
    # Two subjects share one byte-identical picture: the duplicate rule joins them into one unit.
    records.append(Record("copy.jpg", 30, 0, 0, records[0].group, records[0].sha256, subject="person299"))
    splits = assign_splits(records, seed=1)
    assert assign_splits(records, seed=1) == splits
    per_subject = defaultdict(set)
    for rec, split in zip(records, splits):
        per_subject[rec.subject].add(split)
    assert all(len(s) == 1 for s in per_subject.values())
    assert per_subject["person0"] == per_subject["person299"]
    shares = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert abs(shares["train"] - 0.70) < 0.05 and abs(shares["val"] - 0.15) < 0.05, shares

    # Without the subject column the same pictures straddle splits: the rule is what keeps them together.
    plain = [Record(r.path, r.age, r.gender, r.race, r.group, r.sha256) for r in records]
    by_subject = defaultdict(set)
    for rec, split in zip(records, assign_splits(plain, seed=1)):
        by_subject[rec.subject].add(split)
    assert any(len(s) > 1 for s in by_subject.values())


def test_subject_column_reaches_the_split_settings_and_meta(tmp_path, fast):
    names = [f"p{s}_{k}.jpg" for s in range(6) for k in range(3)]
    write_images(tmp_path / "data", names)
    labels = write_csv(tmp_path / "labels.csv", [["path", "age", "subject", "x", "y", "w", "h"]] + [
        [n, 10 + 12 * int(n[1]), f"subject {n[1]}"] + (["5", "6", "100", "120"] if n.endswith("0.jpg") else [""] * 4)
        for n in names])
    result = featurize(tmp_path / "data", "-o", tmp_path / "f.h5", *fast, "--device", "cpu", "--decoder", "torch",
                       "--labels", labels, "--seed", "2")
    meta, settings = read_meta(tmp_path / "f.h5"), read_settings(tmp_path / "f.h5")
    assert settings["split_source"] == "seeded-stratified-duplicate-and-subject-aware"
    assert settings["labels"]["format"]["columns"] == {}
    splits = defaultdict(set)
    for subject, split in zip(meta["subject"], meta["split"]):
        splits[subject].add(split)
    assert len(splits) == 6 and all(len(s) == 1 for s in splits.values())
    assert meta["box"].shape == (18, 4) and meta["box"].dtype == np.float32
    has_box = np.array([p.endswith("0.jpg") for p in meta["path"]])
    assert np.all(meta["box"][has_box] == [5, 6, 100, 120]) and np.isnan(meta["box"][~has_box]).all()
    assert "eyes" not in meta  # no eye columns in this file
    counts = {s: int(np.sum(meta["split"] == s)) for s in ("train", "val", "test")}
    for name, n in counts.items():
        assert (n == 0) == (f"split '{name}' is empty" in result.output)


def test_optional_columns_survive_shards_and_merge(tmp_path, fast):
    names = [f"{i}.jpg" for i in range(6)]
    write_images(tmp_path / "data", names)
    labels = write_csv(tmp_path / "labels.csv", [["path", "age", "subject", "left_eye_x", "left_eye_y",
                                                  "right_eye_x", "right_eye_y"]] +
                       [[n, 20 * i, f"s{i}", i, 2, 3, 4] for i, n in enumerate(names)])
    common = [*fast, "--device", "cpu", "--decoder", "torch", "--labels", labels]
    featurize(tmp_path / "data", "-o", tmp_path / "one.h5", *common)
    for shard in ("0/2", "1/2"):
        featurize(tmp_path / "data", "-o", tmp_path / "s.h5", *common, "--shard", shard)
    featurize("merge", tmp_path / "s.shard-0-of-2.h5", tmp_path / "s.shard-1-of-2.h5", "-o", tmp_path / "merged.h5")
    one, merged = read_meta(tmp_path / "one.h5"), read_meta(tmp_path / "merged.h5")
    assert set(one) == set(merged) == {"path", "age", "gender", "race", "group", "split", "sha256", "subject", "eyes"}
    for column in one:
        assert np.array_equal(one[column], merged[column]), column
    assert one["eyes"][:, 0].tolist() == list(range(6))
    # join keeps them too (it checks the required columns and copies the first file's rows).
    featurize(tmp_path / "data", "-o", tmp_path / "other.h5", "--backbones", "efficientnet_b0", "--weights", "none",
              "--quiet", "--device", "cpu", "--decoder", "torch", "--labels", labels)
    featurize("join", tmp_path / "one.h5", tmp_path / "other.h5", "-o", tmp_path / "joined.h5")
    joined = read_meta(tmp_path / "joined.h5")
    assert set(joined) == set(one) and all(np.array_equal(joined[c], one[c]) for c in one)


def test_split_column_is_used_and_clashes_with_a_split_file(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    labels = write_csv(tmp_path / "labels.csv", [["path", "age", "split"], ["a.jpg", "3", "train"],
                                                 ["b.jpg", "30", "test"], ["c.jpg", "60", ""]])
    config = FeaturizeConfig(data_dir=tmp_path, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                             weights={"mobilenet_v2": "none"}, device="cpu", labels=make_source(labels))
    plan = make_plan(config)
    assert plan.meta["split"].tolist() == ["train", "test", ""]
    assert plan.settings["split_source"] == "labels-file split column"
    assert plan.warnings == ["split 'val' is empty (unlisted 1, test 1, train 1): too few images (or subjects) for "
                             "a 70/15/15 split, or the split source lists none"]
    split_file = write_csv(tmp_path / "split.csv", [["file", "split"], ["a.jpg", "val"]])
    config.split_file = split_file
    with pytest.raises(ValueError, match="split column and --split-file"):
        make_plan(config)


# --------------------------------------------------------------------------- files that cannot be read


def test_odd_files_are_skipped_and_featurize_finishes(tmp_path, fast):
    folder = tmp_path / "utk"
    write_utk_folder(folder, [5, 40, 70])
    os.mkfifo(folder / "33_0_0_20170109000000007.jpg.chip.jpg")          # would block a reader forever
    (folder / "34_0_0_20170109000000008.jpg.chip.jpg").mkdir()           # a folder with an image name
    bad_name = os.fsencode(str(folder)) + b"/35_1_0_20170109000000009\xff.jpg.chip.jpg"
    Image.fromarray(face_like(9)).save(bad_name.decode("utf-8", "surrogateescape"), format="JPEG")
    result = featurize(folder, "-o", tmp_path / "f.h5", *fast, "--device", "cpu", "--decoder", "torch", ok=(0, 3))
    meta = read_meta(tmp_path / "f.h5")
    assert sorted(meta["age"].tolist()) == [5, 40, 70]
    with h5py.File(tmp_path / "f.h5") as h5:
        skipped = dict(zip(h5["skipped/path"].asstr()[()], h5["skipped/reason"].asstr()[()]))
    assert skipped == {
        "33_0_0_20170109000000007.jpg.chip.jpg": "not a regular file",
        "34_0_0_20170109000000008.jpg.chip.jpg": "not a regular file",
        "35_1_0_20170109000000009\\xff.jpg.chip.jpg": "file name is not valid UTF-8 (rename the file to keep it)",
    }
    assert "not valid UTF-8" in result.output
    # A rerun finds the finished file: nothing to do, no error.
    again = featurize(folder, "-o", tmp_path / "f.h5", *fast, "--device", "cpu", "--decoder", "torch", ok=(0, 3))
    assert "nothing to do" in again.output


def test_unreadable_file_is_skipped(tmp_path, monkeypatch):
    """Permission denied on open. Tests run as root, where chmod 000 does not stop reads, so the open
    itself is made to fail for that one file; without root the real chmod is tested as well."""
    folder = tmp_path / "utk"
    paths = write_utk_folder(folder, [5, 40, 70])
    locked = paths[1]
    real = labels_module.file_sha256

    def refusing(path):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(labels_module, "file_sha256", refusing)
    monkeypatch.setattr("pipeline.ingest.dataset.file_sha256", refusing)
    records, skipped = scan(folder)
    assert [r.path for r in records] == [paths[0].name, paths[2].name]
    assert [(s.path, s.reason) for s in skipped] == [(locked.name, "unreadable: Permission denied")]

    if os.geteuid() != 0:
        monkeypatch.undo()
        locked.chmod(0)
        try:
            records, skipped = scan(folder)
        finally:
            locked.chmod(0o644)
        assert [(s.path, s.reason) for s in skipped] == [(locked.name, "unreadable: Permission denied")]


# --------------------------------------------------------------------------- the featurize command


def test_featurize_label_options_errors(tmp_path, fast):
    folder = tmp_path / "data"
    write_images(folder, ["a.jpg"])
    bad = write_csv(tmp_path / "bad.csv", [["file", "years"], ["a.jpg", "3"]])
    result = featurize(folder, "-o", tmp_path / "f.h5", *fast, "--labels", bad, ok=(1,))
    assert "columns found: 'file', 'years'" in result.output and "Traceback" not in result.output
    result = featurize(folder, "-o", tmp_path / "f.h5", *fast, "--label-preset", "appa-real", ok=(2,))
    assert "need --labels" in result.output
    result = featurize(folder, "-o", tmp_path / "f.h5", *fast, "--labels", tmp_path / "nope.csv", ok=(2,))
    assert "labels file" in result.output and "does not exist" in result.output
    result = featurize(folder, "-o", tmp_path / "f.h5", *fast, "--folders", ok=(1,))
    assert "no usable labelled images" in result.output and "not inside a label folder" in result.output


def test_class_folders_through_featurize(tmp_path, fast):
    write_images(tmp_path / "data", ["12/a.jpg", "40/b.jpg", "51-75/c.jpg", "90/d.jpg"])
    featurize(tmp_path / "data", "-o", tmp_path / "f.h5", *fast, "--device", "cpu", "--decoder", "torch", "--folders")
    meta, settings = read_meta(tmp_path / "f.h5"), read_settings(tmp_path / "f.h5")
    assert meta["path"].tolist() == ["12/a.jpg", "40/b.jpg", "51-75/c.jpg", "90/d.jpg"]
    assert meta["age"].tolist() == [12, 40, -1, 90] and meta["group"].tolist() == [0, 1, 2, 3]
    assert settings["labels"] == {"source": "folders"}


def test_labels_file_is_part_of_the_settings_and_a_straddling_subject_is_warned(tmp_path):
    write_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    labels = write_csv(tmp_path / "labels.csv", [["path", "age", "subject", "split"], ["a.jpg", "3", "kim", "train"],
                                                 ["b.jpg", "30", "kim", "test"], ["c.jpg", "60", "lee", "val"],
                                                 ["d.jpg", "61", "lee", "val"]])

    def plan_for(path):
        return make_plan(FeaturizeConfig(data_dir=tmp_path, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                                         weights={"mobilenet_v2": "none"}, device="cpu", labels=make_source(path)))

    first = plan_for(labels)
    assert first.warnings == ["1 subjects have images in more than one split (e.g. 'kim'); the given split leaks "
                              "people between splits"]
    assert first.settings["labels"]["sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()[:16]
    # Another age in the labels file: same files, same splits, but other settings (no silent reuse).
    labels.write_text(labels.read_text().replace("d.jpg,61", "d.jpg,62"))
    second = plan_for(labels)
    assert second.meta["age"].tolist() == [3, 30, 60, 62]
    assert second.settings["labels"] != first.settings["labels"]
    assert {k for k in first.settings if first.settings[k] != second.settings[k]} == {"labels"}


def test_age_head_is_refused_on_rows_labelled_with_a_group_only(tmp_path):
    """Range labels store age -1; an age regression on them would learn -1 as an age."""
    from pipeline.cli.train_head import main as train_head_cli
    from tests.support.synthetic import make_feature_file, reseal

    path = make_feature_file(tmp_path / "f.h5", n=80, widths={"mobilenet_v2": (16, 8)})
    with h5py.File(path, "r+") as h5:
        ages = h5["meta/age"][()]
        ages[::3] = -1
        h5["meta/age"][...] = ages
    reseal(path)   # as if featurized from range labels
    common = [str(path), "--backbones", "mobilenet_v2", "--epochs", "1", "--device", "cpu", "--threads", "1", "--quiet"]
    for target in ("age", "soft"):  # both learn from the age in years
        result = CliRunner().invoke(train_head_cli, common + ["-o", str(tmp_path / target), "--target", target])
        assert result.exit_code == 1, result.output
        assert f"--target {target} needs an age for every train and val row" in result.output
        assert not (tmp_path / target / "head.json").exists()
    result = CliRunner().invoke(train_head_cli, common + ["-o", str(tmp_path / "group")])
    assert result.exit_code in (0, 3), result.output  # group heads only need the group


def test_column_positions_work_in_a_file_with_a_header(tmp_path):
    """'path=0,age=1' are 0-based positions also when the file has a header (its names are then not needed)."""
    write_utk_folder(tmp_path, [30])
    name = next(tmp_path.glob("*.jpg")).name
    labels = write_csv(tmp_path / "labels.csv", [["picture", "years"], [name, "41"]])
    records, skipped = csv_scan(tmp_path, labels, columns="path=0,age=1")
    assert skipped == [] and [(r.path, r.age) for r in records] == [(name, 41)]
    records, _ = csv_scan(tmp_path, labels, columns="path=picture,age=1")   # names and positions mixed
    assert [r.age for r in records] == [41]
    with pytest.raises(ValueError, match=r"lacks column 5 \(position given for age\); columns found: 'picture'"):
        csv_scan(tmp_path, labels, columns="path=0,age=5")
