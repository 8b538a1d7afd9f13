"""UTKFace files -> records (age, gender, race, group, sha256), a skip list, splits.

UTKFace names are `age_gender_race_datetime.jpg.chip.jpg`. A few real names
lack the race field; they keep their age and get race RACE_UNKNOWN. Names that
do not parse, or ages outside 0-116, are skipped with a reason.

Splits are 70/15/15, seeded, stratified by age group, and keep byte-identical
files together: UTKFace has 375 groups of identical images (some labelled with
different ages), which a plain random split leaks between train and test.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .constants import DEFAULT_GROUP_EDGES, MAX_AGE, RACE_UNKNOWN, SPLIT_FRACTIONS, SPLIT_NAMES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}
_NAME = re.compile(r"^(?P<age>\d+)_(?P<gender>\d+)_(?:(?P<race>\d+)_)?(?P<datetime>\d{8,})")


@dataclass(frozen=True)
class Record:
    path: str        # relative to the data folder, POSIX separators
    age: int
    gender: int      # 0 male, 1 female
    race: int        # 0-4, or RACE_UNKNOWN
    group: int       # index into the age groups
    sha256: str


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


def parse_name(name: str) -> tuple[int, int, int]:
    """'23_1_2_2017....jpg.chip.jpg' -> (age, gender, race). Raises ValueError with the reason."""
    match = _NAME.match(name)
    if not match:
        raise ValueError("name is not age_gender_race_datetime")
    age, gender = int(match["age"]), int(match["gender"])
    race = int(match["race"]) if match["race"] is not None else RACE_UNKNOWN
    if not 0 <= age <= MAX_AGE:
        raise ValueError(f"age {age} outside 0-{MAX_AGE}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} is not 0 or 1")
    if race != RACE_UNKNOWN and not 0 <= race <= 4:
        raise ValueError(f"race {race} is not 0-4")
    return age, gender, race


def parse_edges(text: str | None) -> tuple[int, ...]:
    """'25,50,75,116' -> (25, 50, 75, 116): inclusive upper edges, increasing, last = MAX_AGE."""
    if text is None or text == "":
        return DEFAULT_GROUP_EDGES
    try:
        edges = tuple(int(t) for t in str(text).split(","))
    except ValueError:
        raise ValueError(f"--bins must be comma-separated integers, got {text!r}") from None
    if any(b <= a for a, b in zip(edges, edges[1:])) or edges[0] < 0:
        raise ValueError(f"--bins must be increasing and non-negative, got {text!r}")
    if edges[-1] > MAX_AGE:
        raise ValueError(f"--bins edges must not exceed {MAX_AGE}, got {text!r}")
    if edges[-1] < MAX_AGE:  # the oldest group is open-ended up to MAX_AGE
        edges = edges + (MAX_AGE,)
    return edges


def age_to_group(age: int | np.ndarray, edges=DEFAULT_GROUP_EDGES):
    """Group index of an age: the first edge that the age does not exceed."""
    return np.searchsorted(np.asarray(edges), age, side="left")


def find_images(data_dir: Path) -> list[Path]:
    """Every image file under data_dir, recursively, in a stable order."""
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist or is not a folder")
    return sorted(
        (p for p in data_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: p.relative_to(data_dir).as_posix(),
    )


def collect_images(inputs) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given and folders expanded (recursively, as featurize does), in order, without repeats.

    Returns (paths, problems): problems are (input, reason) for inputs that do not exist or hold no image.
    """
    paths, problems, seen = [], [], set()
    for item in map(Path, inputs):
        if item.is_dir():
            found = find_images(item)
            if not found:
                problems.append((str(item), "folder holds no .jpg, .jpeg or .png files"))
        elif item.exists():
            found = [item]
        else:
            found = []
            problems.append((str(item), "no such file or folder"))
        for path in found:
            if path.resolve() not in seen:
                seen.add(path.resolve())
                paths.append(path)
    return paths, problems


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan(data_dir: Path, edges=DEFAULT_GROUP_EDGES, limit: int | None = None) -> tuple[list[Record], list[Skip]]:
    """Parse and hash every image under data_dir (the first `limit` files if given)."""
    data_dir = Path(data_dir)
    files = find_images(data_dir)
    if limit is not None:
        files = files[:limit]
    records, skipped = [], []
    for path in files:
        rel = path.relative_to(data_dir).as_posix()
        try:
            age, gender, race = parse_name(path.name)
        except ValueError as err:
            skipped.append(Skip(rel, f"bad name: {err}"))
            continue
        group = int(age_to_group(age, edges))
        records.append(Record(rel, age, gender, race, group, sha256_of(path)))
    return records, skipped


def assign_splits(records: list[Record], seed: int = 0, fractions=SPLIT_FRACTIONS) -> list[str]:
    """Seeded 70/15/15 split, stratified by group, identical files kept together.

    Identical files form one unit; a unit's stratum is its first member's group.
    Within each stratum the units are shuffled and dealt out until each split
    holds its share of files.
    """
    units: dict[str, list[int]] = {}
    for i, rec in enumerate(records):
        units.setdefault(rec.sha256, []).append(i)
    strata: dict[int, list[list[int]]] = {}
    for members in units.values():
        strata.setdefault(records[members[0]].group, []).append(members)

    rng = np.random.default_rng(seed)
    splits = [""] * len(records)
    cut_train = fractions["train"]
    cut_val = fractions["train"] + fractions["val"]
    for group in sorted(strata):
        stratum = strata[group]
        order = rng.permutation(len(stratum))
        total = sum(len(u) for u in stratum)
        placed = 0
        for k in order:
            share = placed / total
            name = "train" if share < cut_train else "val" if share < cut_val else "test"
            for i in stratum[k]:
                splits[i] = name
            placed += len(stratum[k])
    return splits


def read_split_file(path: Path) -> dict[str, str]:
    """A CSV with columns file,split -> {file: split}. Files are matched by relative path or name."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"file", "split"} <= set(reader.fieldnames):
                raise ValueError(f"split file {path} needs the columns 'file,split', found {reader.fieldnames}")
            mapping = {}
            for line, row in enumerate(reader, start=2):
                split = row["split"].strip()
                if split not in SPLIT_NAMES:
                    raise ValueError(f"split file {path} line {line}: split {split!r} is not one of {SPLIT_NAMES}")
                mapping[row["file"].strip()] = split
    except OSError as err:
        raise ValueError(f"cannot read split file {path}: {err}") from err
    return mapping


def apply_split_file(paths: list[str], mapping: dict[str, str]) -> list[str]:
    """Split of each relative path from a split-file mapping; '' where the file is not listed."""
    by_name = {Path(k).name: v for k, v in mapping.items()}
    return [mapping.get(p, by_name.get(Path(p).name, "")) for p in paths]


def split_counts(splits) -> dict[str, int]:
    values, counts = np.unique(np.asarray(splits, dtype=object).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}
