"""pipeline/files.py: atomic writes, file kinds and CSV cells."""

import csv
import io
import os
import stat

from pipeline.files import csv_cell, file_kind, file_sha256, write_json_atomically


def test_csv_cell_escapes_what_a_spreadsheet_would_run_and_nothing_else():
    for text in ("=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text) == "'" + text
    for value in ("photo.jpg", "a=b.jpg", "", 3, -2.5, None):
        assert csv_cell(value) == value
    out = io.StringIO()
    csv.writer(out).writerow([csv_cell("=HYPERLINK(\"x\")"), csv_cell(-1)])
    assert out.getvalue().startswith("\"'=HYPERLINK") and out.getvalue().rstrip().endswith(",-1")


def test_json_is_replaced_whole_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "a.json"
    write_json_atomically(path, {"b": 1})
    write_json_atomically(path, {"b": 2, "a": [1]})
    assert path.read_text() == '{\n "a": [\n  1\n ],\n "b": 2\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert len(file_sha256(path)) == 64


def test_file_kind_names_a_fifo(tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert file_kind(os.stat(fifo).st_mode) == "a FIFO"
    assert file_kind(stat.S_IFDIR) == "a folder"
