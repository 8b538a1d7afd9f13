"""The skip list, summarized for people: grouped by kind of reason with a few examples, the full list in a file.

A label file of 100,000 rows naming missing files gives 100,000 reasons that differ only in their line
numbers; printed as they are they make one line of megabytes. Each reason's kind is its text without the
details (after a colon) and without where it came from (a trailing "(labels.csv line 12)").
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from pathlib import Path

from pipeline.files import csv_cell, write_bytes_atomically

_ORIGIN = re.compile(r"\s*\([^()]*\bline \d+\)$")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def reason_kind(reason: str) -> str:
    """'missing file (labels.csv line 12)' -> 'missing file'; 'age 140 outside 0-116' -> 'age N outside N-N'."""
    text = _ORIGIN.sub("", str(reason)).split(":")[0].strip()
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'...'", text)   # quoted values (a bad age, a folder name)
    return _NUMBER.sub("N", text) or "skipped"


def skip_summary(skipped: list[tuple[str, str]], examples: int = 3, kinds: int = 10) -> list[str]:
    """Lines for the terminal: the count, then per kind of reason (most frequent first) its count and examples."""
    if not skipped:
        return []
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for path, reason in skipped:
        by_kind.setdefault(reason_kind(reason), []).append((path, reason))
    counts = Counter({kind: len(rows) for kind, rows in by_kind.items()})
    lines = [f"skipped {len(skipped)} ({len(by_kind)} kind{'s' if len(by_kind) != 1 else ''} of reason):"]
    for kind, n in counts.most_common(kinds):
        lines.append(f"  {n} x {kind}, e.g.")
        lines += [f"      {path}: {reason}" for path, reason in by_kind[kind][:examples]]
    if len(by_kind) > kinds:
        rest = sum(n for _, n in counts.most_common()[kinds:])
        lines.append(f"  ... {len(by_kind) - kinds} more kinds ({rest} files)")
    return lines


def skip_list_path(out: Path) -> Path:
    """Where the full list of a run's skips goes: beside its output, <out>.skipped.csv."""
    return Path(out).with_name(Path(out).name + ".skipped.csv")


def write_skip_list(path: Path, skipped: list[tuple[str, str]]) -> Path:
    """Every skipped file with its reason as CSV (path, reason; cells escaped by csv_cell), written atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    writer.writerow(["path", "reason"])
    writer.writerows([csv_cell(str(p)), csv_cell(str(r))] for p, r in skipped)
    write_bytes_atomically(Path(path), buffer.getvalue().encode("utf-8", "backslashreplace"))
    return Path(path)
