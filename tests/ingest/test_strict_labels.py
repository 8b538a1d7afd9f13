"""Label input read strictly: plain decimal ages, absolute paths through links inside the data folder, and a
skip summary grouped by reason with the full list in a file."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.featurize import main as featurize_cli
from pipeline.ingest.dataset import scan
from pipeline.ingest.labels import ClassFolders, CsvLabels, make_csv_format, parse_age
from pipeline.ingest.skips import reason_kind, skip_summary
from tests.support.folders import write_utk_folder

EDGES = (25, 50, 75, 116)


def write_csv(path: Path, rows) -> Path:
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    return path


def csv_scan(folder, labels_path):
    return scan(folder, EDGES, source=CsvLabels(labels_path, make_csv_format(labels_path=labels_path)))


@pytest.mark.parametrize("text", ["2_5", "1e1", "1e-400", "inf", "nan", "0x10", "+3", " ３４", "34.", ".5e2"])
def test_only_plain_decimal_ages_are_read(text):
    with pytest.raises(ValueError, match="not a"):
        parse_age(text)


@pytest.mark.parametrize("text, age", [("34", 34), ("34.0", 34), (" 7 ", 7), ("0", 0), ("116.00", 116)])
def test_plain_decimal_ages(text, age):
    assert parse_age(text) == age


def test_a_class_folder_named_like_a_float_is_not_an_age(tmp_path):
    write_utk_folder(tmp_path / "1e1", [30])
    write_utk_folder(tmp_path / "2_5", [30])
    write_utk_folder(tmp_path / "40", [30])
    records, skipped = scan(tmp_path, EDGES, source=ClassFolders())
    assert [r.age for r in records] == [40]
    assert sorted(s.reason.split(":")[0] for s in skipped) == ["bad label folder '1e1'", "bad label folder '2_5'"]


def test_an_absolute_path_through_a_link_inside_the_data_folder_is_accepted(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    (name,) = [p.name for p in write_utk_folder(elsewhere, [30])]
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(elsewhere, data / "link")
    labels = write_csv(tmp_path / "labels.csv", [["path", "age"], [f"link/{name}", "41"],
                                                 [str(data / "link" / name), "41"],
                                                 [str(elsewhere / name), "41"]])
    records, skipped = csv_scan(data, labels)
    assert [r.path for r in records] == [f"link/{name}"]   # relative and absolute name the same file: once
    assert [s.reason for s in skipped if "outside" in s.reason] == ["path is outside the data folder (labels.csv line 4)"]
    assert not [s for s in skipped if "relative" in s.reason]


def test_the_skip_summary_is_grouped_with_examples_and_the_full_list_is_a_file(tmp_path):
    data = tmp_path / "data"
    write_utk_folder(data, [30, 60])
    present = sorted(p.name for p in data.iterdir())
    rows = [["path", "age"]] + [[name, "30"] for name in present]
    rows += [[f"missing_{i}.jpg", "30"] for i in range(500)] + [[f"=bad_{i}.jpg", "1e1"] for i in range(40)]
    labels = write_csv(tmp_path / "labels.csv", rows)
    out = tmp_path / "f.h5"
    result = CliRunner().invoke(featurize_cli, [str(data), "-o", str(out), "--labels", str(labels),
                                                "--backbones", "mobilenet_v2", "--weights", "none", "--engine",
                                                "torch", "--device", "cpu", "--decoder", "torch", "--quiet"])
    assert result.exit_code == 3, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) < 300 and len(lines) < 40
    assert "skipped 540 (2 kinds of reason):" in result.output
    assert "500 x missing file" in result.output and "40 x age '...' is not a plain decimal number" in result.output
    listed = tmp_path / "f.h5.skipped.csv"
    assert str(listed) in result.output
    with listed.open(newline="") as handle:
        written = list(csv.DictReader(handle))
    bad = [row["path"] for row in written if "bad_" in row["path"]]
    assert len(written) == 540 and len(bad) == 40 and all(p.startswith("'=bad_") for p in bad)   # escaped


def test_reason_kinds_drop_details_and_origins():
    assert reason_kind("missing file (labels.csv line 12)") == "missing file"
    assert reason_kind("age 140 outside 0-116 (labels.csv line 3)") == "age N outside N-N"
    assert reason_kind("bad name: name is not age_gender_race_datetime") == "bad name"
    lines = skip_summary([(f"{i}.jpg", f"missing file (l.csv line {i})") for i in range(1000)], examples=2)
    assert lines[0] == "skipped 1000 (1 kind of reason):" and len(lines) == 4
