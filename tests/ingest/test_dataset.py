"""Name parsing, the skip list, age groups and duplicate-aware splits."""

from __future__ import annotations

import csv
import os
from collections import Counter

import numpy as np
import pytest

from pipeline.constants import RACE_UNKNOWN
from pipeline.ingest.dataset import (
    Record,
    age_to_group,
    apply_split_file,
    assign_splits,
    parse_edges,
    read_split_file,
    scan,
)
from pipeline.ingest.labels import parse_name
from tests.support.folders import write_utk_folder
from tests.support.paths import REAL_IMAGES, SHARED


@pytest.mark.parametrize("name, expected", [
    ("23_1_2_20170116174525125.jpg.chip.jpg", (23, 1, 2)),
    ("0_0_4_20161219193000000.jpg.chip.jpg", (0, 0, 4)),
    ("116_1_0_20170112213500903.jpg.chip.jpg", (116, 1, 0)),
    ("39_1_20170116174525125.jpg.chip.jpg", (39, 1, RACE_UNKNOWN)),      # real file without race
    ("24_0_1_20170116220224657 .jpg.chip.jpg", (24, 0, 1)),              # real file with a space
    ("55_0_0_20170116232725357jpg.chip.jpg", (55, 0, 0)),                # real file missing a dot
])
def test_parse_name_accepts_real_utkface_names(name, expected):
    assert parse_name(name) == expected


@pytest.mark.parametrize("name, reason", [
    ("face.jpg", "not age_gender_race_datetime"),
    ("117_0_0_20170116174525125.jpg.chip.jpg", "age 117 outside 0-116"),
    ("30_2_0_20170116174525125.jpg.chip.jpg", "gender 2"),
    ("30_1_7_20170116174525125.jpg.chip.jpg", "race 7"),
    ("30_1_0.jpg", "not age_gender_race_datetime"),
])
def test_parse_name_rejects_with_reason(name, reason):
    with pytest.raises(ValueError, match=reason):
        parse_name(name)


def test_group_edges_are_inclusive():
    ages = np.array([0, 25, 26, 50, 51, 75, 76, 116])
    assert age_to_group(ages).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    edges = parse_edges("17,64")
    assert edges == (17, 64, 116)
    assert age_to_group(np.array([17, 18, 64, 65, 116]), edges).tolist() == [0, 1, 1, 2, 2]


@pytest.mark.parametrize("text", ["50,25", "a,b", "-1,50", "25,50,200"])
def test_bad_edges_are_refused(text):
    with pytest.raises(ValueError, match="--bins"):
        parse_edges(text)


def test_scan_is_recursive_and_lists_skips(tmp_path):
    # The in-the-wild release comes as part1/part2/part3 folders.
    write_utk_folder(tmp_path / "part1", [5, 40])
    write_utk_folder(tmp_path / "part2" / "nested", [70, 90], start_seed=10)
    (tmp_path / "part2" / "holiday.jpg").write_bytes(b"whatever")
    (tmp_path / "part3").mkdir()
    (tmp_path / "part3" / "200_0_0_20170109000000001.jpg.chip.jpg").write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("not an image, not listed")

    records, skipped = scan(tmp_path)
    assert sorted(r.age for r in records) == [5, 40, 70, 90]
    assert {r.path.split("/")[0] for r in records} == {"part1", "part2"}
    assert any(r.path.startswith("part2/nested/") for r in records)
    assert [r.group for r in sorted(records, key=lambda r: r.age)] == [0, 1, 2, 3]
    reasons = {s.path: s.reason for s in skipped}
    assert reasons == {
        "part2/holiday.jpg": "bad name: name is not age_gender_race_datetime",
        "part3/200_0_0_20170109000000001.jpg.chip.jpg": "bad name: age 200 outside 0-116",
    }
    assert all(len(r.sha256) == 64 for r in records)


def _records(groups_and_shas):
    return [Record(f"{i}.jpg", 30, 0, 0, g, sha) for i, (g, sha) in enumerate(groups_and_shas)]


def test_split_is_stratified_and_seeded():
    rng = np.random.default_rng(1)
    groups = rng.choice(4, size=4000, p=[0.32, 0.48, 0.16, 0.04])
    records = _records([(g, f"{i:064x}") for i, g in enumerate(groups)])
    splits = np.asarray(assign_splits(records, seed=3))
    assert assign_splits(records, seed=3) == splits.tolist()
    assert assign_splits(records, seed=4) != splits.tolist()
    for g in range(4):
        in_group = splits[groups == g]
        shares = {s: np.mean(in_group == s) for s in ("train", "val", "test")}
        assert abs(shares["train"] - 0.70) < 0.01, (g, shares)
        assert abs(shares["val"] - 0.15) < 0.01, (g, shares)
        assert abs(shares["test"] - 0.15) < 0.01, (g, shares)


def test_identical_files_share_a_split():
    rng = np.random.default_rng(0)
    rows = [(int(rng.integers(4)), f"{i:064x}") for i in range(600)]
    # 100 duplicate groups of 2-4 copies, some labelled with different groups, as in UTKFace.
    for d in range(100):
        sha = f"dup{d:061d}"
        for copy in range(2 + d % 3):
            rows.append(((d + copy) % 4, sha))
    records = _records(rows)
    for seed in range(5):
        splits = assign_splits(records, seed)
        by_sha = {}
        for rec, split in zip(records, splits):
            by_sha.setdefault(rec.sha256, set()).add(split)
        assert all(len(s) == 1 for s in by_sha.values())


@pytest.mark.skipif(not (SHARED / "data" / "utkface_exact_duplicates.tsv").exists(), reason="UTKFace not in ../shared")
def test_real_utkface_duplicates_never_cross_splits():
    records, skipped = scan(REAL_IMAGES)
    assert len(records) == 23708 and skipped == []
    assert Counter(r.group for r in records) == {0: 7637, 1: 11463, 2: 3757, 3: 851}
    split_of = dict(zip((r.path for r in records), assign_splits(records, seed=0)))
    lines = (SHARED / "data" / "utkface_exact_duplicates.tsv").read_text().splitlines()[1:]
    assert len(lines) == 375
    for line in lines:
        files = line.split("\t")[1].split("|")
        assert len({split_of[f] for f in files}) == 1, files


def test_split_file_round_trip(tmp_path):
    csv_path = tmp_path / "split.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split"])
        writer.writerows([["part1/a.jpg", "train"], ["b.jpg", "test"]])
    mapping = read_split_file(csv_path)
    assert apply_split_file(["part1/a.jpg", "part9/b.jpg", "c.jpg"], mapping) == ["train", "test", ""]


def test_split_file_errors_name_the_problem(tmp_path):
    bad_columns = tmp_path / "cols.csv"
    bad_columns.write_text("name,fold\na.jpg,1\n")
    with pytest.raises(ValueError, match="file,split"):
        read_split_file(bad_columns)
    bad_split = tmp_path / "split.csv"
    bad_split.write_text("file,split\na.jpg,train\nb.jpg,holdout\n")
    with pytest.raises(ValueError, match="line 3.*holdout"):
        read_split_file(bad_split)


def test_split_file_encodings_bom_and_duplicates(tmp_path):
    # A UTF-8 BOM (Excel's "CSV UTF-8") is accepted.
    bom = tmp_path / "bom.csv"
    bom.write_bytes("\ufefffile,split\nJosé.jpg,train\n".encode("utf-8"))
    assert read_split_file(bom) == {"José.jpg": "train"}
    # Latin-1 is refused, naming the file, the byte and the line.
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("file,split\nJosé.jpg,train\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"split file .*latin1.csv is not UTF-8 text: byte 0xe9 at offset 14 \(line 2\)"):
        read_split_file(latin1)
    # The same file twice with the same split is harmless; with another split it is refused (it was: last one wins).
    same = tmp_path / "same.csv"
    same.write_text("file,split\na.jpg,train\na.jpg,train\n")
    assert read_split_file(same) == {"a.jpg": "train"}
    conflict = tmp_path / "conflict.csv"
    conflict.write_text("file,split\na.jpg,train\nb.jpg,val\na.jpg,test\n")
    with pytest.raises(ValueError, match=r"conflict.csv line 4: 'a.jpg' is listed again with split 'test', "
                                         r"but line 2 puts it in 'train'"):
        read_split_file(conflict)
    no_value = tmp_path / "short.csv"
    no_value.write_text("file,split\na.jpg\n")
    with pytest.raises(ValueError, match="short.csv line 2: no split value"):
        read_split_file(no_value)


def test_an_empty_split_is_warned_about(tmp_path):
    from pipeline.features.extract import FeaturizeConfig, make_plan
    from pipeline.ingest.dataset import empty_split_warnings, split_counts

    # 21 images over four groups, as in the report: the seeded split left test empty and said nothing.
    write_utk_folder(tmp_path, [10] * 5 + [30] * 5 + [60] * 5 + [90] * 6)
    plan = make_plan(FeaturizeConfig(data_dir=tmp_path, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                                     weights={"mobilenet_v2": "none"}, device="cpu"))
    counts = split_counts(plan.meta["split"])
    assert sum(counts.values()) == 21
    empty = [s for s in ("train", "val", "test") if counts.get(s, 0) == 0]
    assert empty == ["test"]  # strata of 5-6 units: 70 % and 15 % are reached before any test share
    assert [w.split("'")[1] for w in plan.warnings] == empty
    assert all("is empty" in w for w in plan.warnings)
    assert empty_split_warnings(["train", "val", "test"]) == []


def test_split_file_bare_names_match_only_when_unique(tmp_path):
    """Two class folders each holding 001.jpg: a bare-name entry cannot say which, so both stay unlisted."""
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("file,split\nold_layout/001.jpg,train\nold_layout/002.jpg,test\n")
    mapping = read_split_file(csv_path)
    found: list[str] = []
    paths = ["cats/001.jpg", "dogs/001.jpg", "dogs/002.jpg"]
    assert apply_split_file(paths, mapping, found) == ["", "", "test"]
    assert len(found) == 1 and "2 files" in found[0] and "cats/001.jpg" in found[0]
    # The name twice in the split file: no guess either, even for a single data file of that name.
    twice = {"a/001.jpg": "train", "b/001.jpg": "test"}
    with pytest.warns(UserWarning, match="not unique"):
        assert apply_split_file(["c/001.jpg"], twice) == [""]
    assert apply_split_file(["a/001.jpg", "c/001.jpg"], twice, []) == ["train", ""]


def test_collect_images_reports_entries_that_are_not_regular_files(tmp_path):
    """predict/explain inputs: a FIFO or a folder named like an image is reported with the reason, never opened."""
    from pipeline.ingest.dataset import collect_images, find_images

    folder = tmp_path / "in"
    write_utk_folder(folder, [20])
    os.mkfifo(folder / "b.jpg")
    (folder / "c.jpg").mkdir()
    (tmp_path / "empty").mkdir()
    paths, problems = collect_images([folder, tmp_path / "empty", tmp_path / "gone.jpg"])
    assert [p.name for p in paths] == [next(folder.glob("20_*")).name]
    assert problems == [(str(folder / "b.jpg"), "not a regular file (a FIFO)"),
                        (str(folder / "c.jpg"), "not a regular file (a folder)"),
                        (str(tmp_path / "empty"), "folder holds no .jpg, .jpeg or .png files"),
                        (str(tmp_path / "gone.jpg"), "no such file or folder")]
    assert find_images(folder) == paths    # the benchmarks' listing: regular image files only
