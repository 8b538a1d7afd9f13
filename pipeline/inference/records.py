"""Predictions as plain records, and predict's output files (CSV, JSON, JSON Lines), written atomically.

A face record is what AgeEstimator.predict returns per face: box [x0, y0, x1, y1] in the picture's pixels,
score (the detector's probability, None for a picture used whole), landmarks (5 [x, y] points: eyes, nose,
mouth corners; None when not known), group, probabilities {group: p} and age (years for age heads, else None).
A picture record is {"file": ..., "faces": [face records, largest first]}, plus "error" for a picture that
could not be read.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from pipeline.files import csv_cell, write_bytes_atomically

OUTPUT_SUFFIXES = (".csv", ".json", ".jsonl")
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


def _number(value, digits: int) -> float | None:
    return None if value is None or not math.isfinite(float(value)) else round(float(value), digits)


def face_record(prediction, class_names: list[str]) -> dict:
    """The record of one predicted face (see the module docstring)."""
    probs = np.asarray(prediction.probs, float)
    landmarks = prediction.landmarks
    known = landmarks is not None and np.isfinite(landmarks).all()
    return {
        "box": None if prediction.box is None else [round(float(v), 1) for v in prediction.box],
        "score": _number(prediction.score, 4),
        "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in landmarks] if known else None,
        "group": class_names[int(probs.argmax())],
        "probabilities": {name: round(float(p), 6) for name, p in zip(class_names, probs)},
        "age": _number(prediction.age, 2),
    }


def picture_records(files: list[str], predictions: list, class_names: list[str],
                    failures: list[tuple[str, str]] = ()) -> list[dict]:
    """One record per picture, in `files` order: its faces (empty when none was found), or why it failed."""
    faces = {str(file): [] for file in files}
    for prediction in predictions:
        faces.setdefault(str(prediction.file), []).append(face_record(prediction, class_names))
    errors = {str(file): reason for file, reason in failures}
    records = []
    for file, found in faces.items():
        record = {"file": file, "faces": found}
        if file in errors:
            record["error"] = errors[file]
        records.append(record)
    return records


def whole_picture_box(path: str) -> list[float] | None:
    """[0, 0, width, height] of an image file (header only; EXIF rotation applied), or None when unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)
            width, height = image.size
    except (OSError, ValueError):
        return None
    if orientation in (5, 6, 7, 8):  # turned a quarter: the decoded picture is the other way round
        width, height = height, width
    return [0.0, 0.0, float(width), float(height)]


def write_records(records: list[dict], class_names: list[str], path: Path, detected: bool = True) -> None:
    """Write picture records to `path` as CSV, JSON or JSON Lines, by its suffix (OUTPUT_SUFFIXES).

    detected: the faces were found in the pictures (the CSV then has the face columns; see records_csv)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = json.dumps(records, indent=1) + "\n"
    elif suffix == ".jsonl":
        text = "".join(json.dumps(record) + "\n" for record in records)
    elif suffix == ".csv":
        text = records_csv(records, class_names, detected)
    else:
        raise ValueError(f"{path}: unknown output type {suffix!r}; use one of {', '.join(OUTPUT_SUFFIXES)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, text.encode("utf-8", errors="backslashreplace"))


def records_csv(records: list[dict], class_names: list[str], detected: bool = True) -> str:
    """CSV: one row per face, and one (face columns empty) per picture with no face; pictures that could not be
    read have none (predict lists them with the reason).

    Columns: file, [face, x0, y0, x1, y1, score,] group, p_<group>..., [age,] [landmark x/y..., note]; the
    bracketed face columns only when faces were `detected` (pictures used whole have one face: all of it)."""
    with_age = any(face["age"] is not None for record in records for face in record["faces"])
    landmark_columns = [f"{name}_{axis}" for name in LANDMARK_NAMES for axis in "xy"]
    header = (["file"] + (["face", "x0", "y0", "x1", "y1", "score"] if detected else []) + ["group"]
              + [f"p_{name}" for name in class_names] + (["age"] if with_age else [])
              + (landmark_columns + ["note"] if detected else []))
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([csv_cell(cell) for cell in header])
    for record in records:
        if "error" in record:
            continue
        if not record["faces"]:
            writer.writerow([csv_cell(record["file"])] + [""] * (len(header) - 2) + ["no face found"])
        for index, face in enumerate(record["faces"]):
            points = face["landmarks"] or [[None, None]] * len(LANDMARK_NAMES)
            row = ([record["file"]] + ([index] + (face["box"] or [None] * 4) + [face["score"]] if detected else [])
                   + [face["group"]] + [f"{face['probabilities'][name]:.6f}" for name in class_names]
                   + ([face["age"]] if with_age else [])
                   + ([v for point in points for v in point] + [""] if detected else []))
            writer.writerow([csv_cell("" if cell is None else cell) for cell in row])
    return out.getvalue()
