"""Labelled files -> records (age, gender, race, group, sha256, ...), a skip list, splits.

The labels come from a label source (labels.py: UTKFace names by default, a CSV/TSV file, or class folders).
Every source's rows are checked here the same way: a name that is not UTF-8, a missing, non-regular (never
opened) or unreadable file, an age outside 0-116 or a group outside the bins, and a path listed twice with
conflicting labels all go into the skip list with a reason. UTKFace names that lack the race field keep
their age and get race RACE_UNKNOWN.
Splits are 70/15/15, seeded, stratified by age group, and keep byte-identical files together: UTKFace has
375 groups of identical images (some labelled with different ages), which a plain random split leaks
between train and test. With subjects (a `subject` label column), one person's images also stay in one
split: the units are the connected sets of files sharing a subject or a hash.
"""

from __future__ import annotations

import csv
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.constants import (
    DEFAULT_GROUP_EDGES,
    MAX_AGE,
    SPLIT_FRACTIONS,
    SPLIT_NAMES,
)
from pipeline.files import file_kind, file_sha256
from pipeline.ingest.labels import (
    AGE_UNKNOWN,
    LabelRow,
    LabelSource,
    Skip,
    UTKFaceNames,
    display_path,
    list_files,
    read_text_file,
)

# AGE_UNKNOWN, IMAGE_SUFFIXES, Skip and parse_name live in labels.py and are imported from here by older code.


@dataclass(frozen=True)
class Record:
    path: str        # relative to the data folder, POSIX separators
    age: int         # years, or AGE_UNKNOWN (-1) when the source gives only the group
    gender: int      # 0 male, 1 female, -1 unknown
    race: int        # 0-4, or RACE_UNKNOWN
    group: int       # index into the age groups
    sha256: str
    subject: str | None = None        # the person, when the source names one
    box: tuple | None = None          # given face box x, y, w, h
    eyes: tuple | None = None         # given eye points left x, y, right x, y
    split: str | None = None          # a split given by the source; None = assign one


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
    """Every regular image file under data_dir, recursively, in path order (labels.list_files' regular files)."""
    return [p for p in list_files(Path(data_dir)) if p.is_file()]


def collect_images(inputs) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given and folders expanded (recursively, as featurize does), in order, without repeats.

    Returns (paths, problems): problems are (input, reason) for inputs that do not exist or hold no
    image, and for entries of a folder with an image suffix that are not regular files (a FIFO, a
    socket, a folder named x.jpg), which are never opened.
    """
    paths, problems, seen = [], [], set()
    for item in map(Path, inputs):
        if item.is_dir():
            listed = list_files(item)
            found = [p for p in listed if p.is_file()]
            problems += [(str(p), f"not a regular file ({_kind_of(p)})") for p in listed if not p.is_file()]
            if not listed:
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


def _kind_of(path: Path) -> str:
    """'a FIFO', 'a folder', ... for an entry that is not a regular file (stat only, never opened)."""
    try:
        return file_kind(os.stat(path).st_mode)
    except OSError as err:
        return f"unreadable: {err.strerror or err}"


def scan(data_dir: Path, edges=DEFAULT_GROUP_EDGES, limit: int | None = None,
         source: LabelSource | None = None) -> tuple[list[Record], list[Skip]]:
    """Label, check and hash every image of data_dir (the first `limit` by path if given).

    source: a labels.LabelSource; UTKFace names when None.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data folder {data_dir} does not exist or is not a folder")
    rows, skipped = (source or UTKFaceNames()).rows(data_dir, edges)
    rows, conflicts = _drop_conflicting_duplicates(rows)
    # Rows and skips in path order, so that --limit takes the first N entries as it always has.
    entries = sorted([(r.path, 0, i) for i, r in enumerate(rows)] + [(s.path, 1, i) for i, s in enumerate(skipped)]
                     + [(c.path, 1, -1 - i) for i, c in enumerate(conflicts)])
    if limit is not None:
        entries = entries[:limit]
    records, skips = [], []
    for _, is_skip, i in entries:
        if is_skip:
            skips.append(skipped[i] if i >= 0 else conflicts[-1 - i])
            continue
        record = _check(rows[i], data_dir, edges)
        (skips if isinstance(record, Skip) else records).append(record)
    return records, skips


def _check(row: LabelRow, data_dir: Path, edges) -> Record | Skip:
    """A label row as a Record, or a Skip with the reason the row cannot be used."""
    where = f" ({row.origin})" if row.origin else ""
    try:
        row.path.encode("utf-8")
    except UnicodeEncodeError:
        return Skip(display_path(row.path), "file name is not valid UTF-8 (rename the file to keep it)")
    path = data_dir / row.path
    try:
        info = os.stat(path)  # stat only: a FIFO or device is never opened
    except FileNotFoundError:
        return Skip(row.path, f"missing file{where}")
    except OSError as err:
        return Skip(row.path, f"unreadable: {err.strerror or err}{where}")
    if not stat.S_ISREG(info.st_mode):
        return Skip(row.path, f"not a regular file{where}")
    age, group = row.age, row.group
    if age is not None:
        if not 0 <= age <= MAX_AGE:
            return Skip(row.path, f"age {age} outside 0-{MAX_AGE}{where}")
        from_age = int(age_to_group(age, edges))
        if group is not None and group != from_age:
            return Skip(row.path, f"age {age} is in group {from_age}, but the group column says {group}{where}")
        group = from_age
    try:
        sha = file_sha256(path)
    except OSError as err:
        return Skip(row.path, f"unreadable: {err.strerror or err}{where}")
    return Record(row.path, AGE_UNKNOWN if age is None else age, row.gender, row.race, group, sha,
                  row.subject, row.box, row.eyes, row.split)


def _drop_conflicting_duplicates(rows: list[LabelRow]) -> tuple[list[LabelRow], list[Skip]]:
    """A path listed twice with the same labels is kept once; with conflicting labels, every copy is skipped."""
    by_path: dict[str, list[LabelRow]] = {}
    for row in rows:
        by_path.setdefault(row.path, []).append(row)
    if all(len(same) == 1 for same in by_path.values()):
        return rows, []
    kept, conflicts = [], []
    for path, same in by_path.items():
        labels = {(r.age, r.group, r.gender, r.race, r.split, r.subject, r.box, r.eyes) for r in same}
        if len(labels) == 1:
            kept.append(same[0])
        else:
            conflicts.append(Skip(path, f"listed {len(same)} times with conflicting labels "
                                        f"({', '.join(r.origin or '?' for r in same)})"))
    return kept, conflicts


def assign_splits(records: list[Record], seed: int = 0, fractions=SPLIT_FRACTIONS) -> list[str]:
    """Seeded 70/15/15 split, stratified by group, identical files and one subject's files kept together.

    A unit is a connected set of files sharing a hash or a subject (without
    subjects: the identical files); a unit's stratum is its first member's group.
    Within each stratum the units are shuffled and dealt out until each split
    holds its share of files.
    """
    units = split_units(records)
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


def split_units(records: list[Record]) -> dict[int, list[int]]:
    """{first member: member indices} of the files that must share a split, in order of first member."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, rec in enumerate(records):
        for key in (("sha", rec.sha256), ("subject", rec.subject)):
            if key[1] is None:
                continue
            if key in first:
                a, b = root(first[key]), root(i)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # the earliest index stays the root
            else:
                first[key] = i
    units: dict[int, list[int]] = {}
    for i in range(len(records)):
        units.setdefault(root(i), []).append(i)
    return units


def subjects_straddling(records: list[Record], splits) -> list[str]:
    """Subjects whose images are in more than one split (for a split given by a file)."""
    seen: dict[str, set] = {}
    for rec, split in zip(records, splits):
        if rec.subject is not None:
            seen.setdefault(rec.subject, set()).add(split)
    return sorted(s for s, found in seen.items() if len(found) > 1)


def empty_split_warnings(splits) -> list[str]:
    """One line per train/val/test split that holds no image (a tiny data set or a split file that omits it)."""
    counts = split_counts(splits)
    if not counts:
        return []
    found = ", ".join(f"{k or 'unlisted'} {v}" for k, v in sorted(counts.items()))
    return [f"split {name!r} is empty ({found}): too few images (or subjects) for a 70/15/15 split, or the "
            f"split source lists none" for name in SPLIT_NAMES if counts.get(name, 0) == 0]


def read_split_file(path: Path) -> dict[str, str]:
    """A CSV with columns file,split -> {file: split}. Files are matched by relative path or name.

    A UTF-8 BOM is accepted; a file that is not UTF-8, a row without a split,
    or a file listed twice with different splits is refused, naming the file and line.
    """
    path = Path(path)
    text = read_text_file(path, "split file")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or not {"file", "split"} <= {f.strip() for f in reader.fieldnames}:
        raise ValueError(f"split file {path} needs the columns 'file,split', found {reader.fieldnames}")
    reader.fieldnames = [f.strip() for f in reader.fieldnames]
    mapping, first_line = {}, {}
    for row in reader:
        line = reader.line_num
        file, split = (row.get("file") or "").strip(), row.get("split")
        if split is None:
            raise ValueError(f"split file {path} line {line}: no split value (expected file,split)")
        split = split.strip()
        if split not in SPLIT_NAMES:
            raise ValueError(f"split file {path} line {line}: split {split!r} is not one of {SPLIT_NAMES}")
        if not file:
            raise ValueError(f"split file {path} line {line}: empty file name")
        if file in mapping and mapping[file] != split:
            raise ValueError(f"split file {path} line {line}: {file!r} is listed again with split {split!r}, "
                             f"but line {first_line[file]} puts it in {mapping[file]!r}")
        mapping[file] = split
        first_line.setdefault(file, line)
    return mapping


def apply_split_file(paths: list[str], mapping: dict[str, str], warnings: list[str] | None = None) -> list[str]:
    """Split of each relative path from a split-file mapping; '' where the file is not listed.

    A path the file does not list matches by bare file name only when that name is unique both
    among the file's entries and among `paths` (two class folders may each hold 001.jpg); other
    unlisted paths stay '' and one line about them goes to `warnings` (or Python's warnings).
    """
    def names(items) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in items:
            counts[Path(item).name] = counts.get(Path(item).name, 0) + 1
        return counts

    in_mapping, in_paths = names(mapping), names(paths)
    by_name = {Path(k).name: v for k, v in mapping.items() if in_mapping[Path(k).name] == 1}
    splits, ambiguous = [], []
    for path in paths:
        name = Path(path).name
        if path in mapping:
            splits.append(mapping[path])
        elif name in by_name and in_paths[name] == 1:
            splits.append(by_name[name])
        else:
            splits.append("")
            if in_mapping.get(name, 0):  # listed under another folder, but the bare name is not unique
                ambiguous.append(path)
    if ambiguous:
        message = (f"{len(ambiguous)} files are not listed in the split file by their path and their bare file "
                   f"name is not unique (e.g. {ambiguous[0]!r}); they stay unlisted")
        if warnings is None:
            import warnings as python_warnings

            python_warnings.warn(message, stacklevel=2)
        else:
            warnings.append(message)
    return splits


def split_counts(splits) -> dict[str, int]:
    values, counts = np.unique(np.asarray(splits, dtype=object).astype(str), return_counts=True)
    return {str(v): int(c) for v, c in zip(values, counts)}
