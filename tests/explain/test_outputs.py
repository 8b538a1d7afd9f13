"""explain's outputs: never over its inputs, unique names, escaped CSV cells, an interrupted run changes nothing,
and the report refuses pictures whose bytes are not the ones featurized."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.explain import main as explain_cli
from pipeline.explain import job
from pipeline.explain.outputs import INDEX
from tests.explain.test_cam import _faces, cached  # noqa: F401 - the module's fixture, reused here
from tests.support.imagefactory import asymmetric_rgb, write_jpeg

pytestmark = pytest.mark.slow   # each test rebuilds a MobileNetV2 and explains with it (10-30 s)


def explain(cached, *args):
    return CliRunner().invoke(explain_cli, [*map(str, args), "-c", str(cached["checkpoints"][0]), "--device", "cpu",
                                            "--weights", f"mobilenet_v2={cached['weights']['mobilenet_v2']}"])


def index_rows(out):
    with open(out / INDEX, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_the_output_folder_is_never_among_the_inputs(cached, tmp_path):
    photos = tmp_path / "photos"
    pictures = _faces(photos, 1)
    before = pictures[0].read_bytes()
    inside = explain(cached, photos, "-o", photos / "explained")
    assert inside.exit_code == 1 and "inside the input folder" in inside.output, inside.output
    onto = explain(cached, pictures[0], "-o", pictures[0])
    assert onto.exit_code in (1, 2) and "Traceback" not in onto.output, onto.output   # 2: click's "is a file"
    head = explain(cached, pictures[0], "-o", cached["checkpoints"][0])
    assert head.exit_code == 1 and "is a head checkpoint" in head.output, head.output
    features = explain(cached, pictures[0], "-o", cached["features"])
    assert features.exit_code in (1, 2), features.output
    assert pictures[0].read_bytes() == before and not (photos / "explained").exists()


def test_output_names_are_unique_within_a_run(cached, tmp_path):
    pixels = asymmetric_rgb(120, 120)
    for folder in "abc":
        (tmp_path / folder).mkdir()
    paths = [write_jpeg(tmp_path / "a" / "x.jpg", pixels), write_jpeg(tmp_path / "b" / "x.jpg", pixels[::-1].copy()),
             write_jpeg(tmp_path / "c" / "x-2.jpg", pixels[:, ::-1].copy())]
    out = tmp_path / "out"
    result = explain(cached, *paths, "-o", out)
    assert result.exit_code == 0, result.output
    rows = index_rows(out)
    overlays = [row["overlay"] for row in rows]
    assert len(rows) == 3 and len(set(overlays)) == 3, overlays
    assert all((out / name).is_file() for name in overlays)
    assert len(list(out.glob("*.png"))) == 3


def test_csv_cells_that_a_spreadsheet_would_run_are_escaped(cached, tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    write_jpeg(tmp_path / "in" / "=HYPERLINK(1).jpg", asymmetric_rgb(100, 100))
    monkeypatch.chdir(tmp_path / "in")   # the image column shows the path as given: it starts with =
    out = tmp_path / "out"
    result = explain(cached, "=HYPERLINK(1).jpg", "-o", out)
    assert result.exit_code == 0, result.output
    (row,) = index_rows(out)
    assert row["image"] == "'=HYPERLINK(1).jpg"
    assert row["overlay"].startswith("'=") and (out / row["overlay"][1:]).is_file()
    raw = (out / INDEX).read_text()
    assert ",=" not in raw and "\n=" not in raw


def test_an_interrupted_run_leaves_the_previous_index_and_pictures(cached, tmp_path, monkeypatch):
    first = _faces(tmp_path / "first", 2)
    out = tmp_path / "out"
    assert explain(cached, *first, "-o", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "notes.txt").write_text("mine")   # a file of the user's in the same folder

    (tmp_path / "second").mkdir()
    shutil.copy(first[0], tmp_path / "second" / first[0].name)   # one name in common with the first run
    for age in (33, 61):
        write_jpeg(tmp_path / "second" / f"{age}_0_0_20170111000000000.jpg.chip.jpg", asymmetric_rgb(150, 150))
    calls = []
    real = job.save_overlay

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(job, "save_overlay", interrupted)
    result = explain(cached, tmp_path / "second", "-o", out)
    assert result.exit_code != 0 and calls == [1, 1]
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != "notes.txt"}
    assert after == before   # the old index beside exactly the pictures it describes
    assert (out / "notes.txt").read_text() == "mine"

    monkeypatch.setattr(job, "save_overlay", real)
    done = explain(cached, tmp_path / "second", "-o", out)
    assert done.exit_code == 0, done.output
    rows = index_rows(out)
    assert len(rows) == 3 and all((out / row["overlay"]).is_file() for row in rows)
    pngs = {p.name for p in out.glob("*.png")}
    assert pngs == {row["overlay"] for row in rows}   # nothing left of the first run
    assert (out / "notes.txt").read_text() == "mine"


def test_the_report_refuses_pictures_that_are_not_the_ones_featurized(cached, tmp_path):
    from pipeline.explain.cam import CamError
    from pipeline.explain.report import ReportConfig, run_report

    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(5)
    for name in cached["meta"]["path"]:   # other pictures under the same names
        write_jpeg(other / str(name), rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    split = str(cached["meta"]["split"][0])
    config = dict(checkpoints=[cached["checkpoints"][0]], features=cached["features"], out_dir=tmp_path / "report",
                  split=split, steps=2, device="cpu", weights=cached["weights"])
    with pytest.raises(CamError, match="not the picture that was featurized"):
        run_report(ReportConfig(data_dir=other, **config), log=lambda *_: None, warn=lambda *_: None)
    assert not (tmp_path / "report" / "report.md").exists()

    # One picture of the split replaced: reported and skipped, the others are scored.
    mixed = tmp_path / "mixed"
    shutil.copytree(cached["data"], mixed)
    rows = [str(p) for p, s in zip(cached["meta"]["path"], cached["meta"]["split"]) if s == split]
    write_jpeg(mixed / rows[0], rng.integers(0, 255, (200, 200, 3), dtype=np.uint8))
    warned = []
    report = run_report(ReportConfig(data_dir=mixed, **config), log=lambda *_: None, warn=warned.append)
    assert report["images"] == len(rows) - 1 and len(report["failures"]) == 1
    assert any("not the picture that was featurized" in w for w in warned)
