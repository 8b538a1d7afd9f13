"""Picture records and predict's output files: one record per picture, faces in order, failures kept in JSON."""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from pipeline.inference.predictor import Prediction
from pipeline.inference.records import picture_records, records_csv, write_records

NAMES = ["0-25", "26-50", "51-75", "76-116"]


def face(file, k, probs, age=None, landmarks=True):
    points = np.arange(10, dtype=float).reshape(5, 2) + 100 * k if landmarks else np.full((5, 2), np.nan)
    return Prediction(file, np.array(probs), age, k, np.array([1.0, 2.0, 30.0, 40.0]) + k, 0.99, points)


def test_records_keep_every_picture_in_order_with_its_faces_or_its_error(tmp_path):
    predictions = [face("b.jpg", 0, [0.1, 0.6, 0.2, 0.1], 33.3), face("b.jpg", 1, [0.7, 0.1, 0.1, 0.1], 12.0,
                                                                         landmarks=False)]
    records = picture_records(["a.jpg", "b.jpg", "c.jpg"], predictions, NAMES, [("c.jpg", "cannot decode")])
    assert [r["file"] for r in records] == ["a.jpg", "b.jpg", "c.jpg"]
    assert records[0] == {"file": "a.jpg", "faces": []}
    assert records[2] == {"file": "c.jpg", "faces": [], "error": "cannot decode"}
    first, second = records[1]["faces"]
    assert first["group"] == "26-50" and first["age"] == 33.3 and first["landmarks"][4] == [8.0, 9.0]
    assert second["group"] == "0-25" and second["landmarks"] is None and second["box"] == [2.0, 3.0, 31.0, 41.0]
    assert first["probabilities"] == {"0-25": 0.1, "26-50": 0.6, "51-75": 0.2, "76-116": 0.1}

    write_records(records, NAMES, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == records
    write_records(records, NAMES, tmp_path / "r.jsonl")
    assert [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()] == records
    rows = list(csv.DictReader(io.StringIO(records_csv(records, NAMES))))
    assert [(r["file"], r["face"], r["group"], r["note"]) for r in rows] == [
        ("a.jpg", "", "", "no face found"), ("b.jpg", "0", "26-50", ""), ("b.jpg", "1", "0-25", "")]
    assert rows[1]["age"] == "33.3" and rows[1]["nose_x"] == "4.0" and rows[2]["nose_x"] == ""
    # Pictures used whole (aligned crops): file, group, probabilities (and age), as before faces were detected.
    whole = list(csv.reader(io.StringIO(records_csv(records[1:2], NAMES, detected=False))))
    assert whole[0] == ["file", "group", "p_0-25", "p_26-50", "p_51-75", "p_76-116", "age"]
    assert whole[1] == ["b.jpg", "26-50", "0.100000", "0.600000", "0.200000", "0.100000", "33.3"]
    with pytest.raises(ValueError, match="unknown output type '.txt'"):
        write_records(records, NAMES, tmp_path / "r.txt")
    assert not (tmp_path / "r.txt").exists()
