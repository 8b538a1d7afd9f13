"""Where an explain run writes: a staging folder, names unique within the run, and a commit at the end.

Everything a run makes goes first into a hidden staging folder inside the output folder, so while it computes
the previous index (explanations.csv) and the pictures it names stay as they were: an interrupted run leaves
them untouched. The commit then removes the old index, replaces the old run's files with the new ones and
puts the new index in place last, with Ctrl-C and SIGTERM held back meanwhile. A file in the folder that the
old index does not name (a user's own file) is never overwritten: names that would clash get a suffix.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
from pathlib import Path

from pipeline.files import csv_cell, fsync_dir, write_bytes_atomically

INDEX = "explanations.csv"
STAGING_PREFIX = ".explain-partial-"
OWNED_COLUMNS = ("overlay", "npy", "photo_overlay")   # the index columns that name files of the run
OUTPUT_SUFFIXES = (".png", ".npy")


def _unescaped(cell: str) -> str:
    """A cell as csv_cell wrote it, back to its text (the leading apostrophe of an escaped formula removed)."""
    return cell[1:] if cell.startswith("'") and cell[1:2] in ("=", "+", "-", "@", "\t", "\r") else cell


def previous_run_files(out: Path) -> set[str]:
    """Names of the files the folder's index says an earlier run wrote (with the index and grids)."""
    owned = {INDEX} if (out / INDEX).is_file() else set()
    owned |= {p.name for p in out.glob("grid_*.png")}
    try:
        with open(out / INDEX, newline="", encoding="utf-8", errors="replace") as handle:
            for row in csv.DictReader(handle):
                owned |= {Path(_unescaped(row[c])).name for c in OWNED_COLUMNS if row.get(c)}
    except (OSError, csv.Error):
        pass
    return owned


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def csv_text(rows: list[dict]) -> bytes:
    """The rows as CSV (every field of every row, in first-seen order), each cell escaped by csv_cell."""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, restval="")
    writer.writeheader()
    writer.writerows([{k: csv_cell(v) for k, v in row.items()} for row in rows])
    return buffer.getvalue().encode("utf-8", "backslashreplace")


@contextlib.contextmanager
def signals_held():
    """SIGINT and SIGTERM wait until the block ends (where the platform allows), so a commit is not cut in two."""
    wanted = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    except (AttributeError, OSError, ValueError):
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class RunOutputs:
    """One explain run's outputs: staged, uniquely named, then committed over the previous run's."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        for stale in self.out.glob(f"{STAGING_PREFIX}*"):   # left by a run killed with SIGKILL
            pid = stale.name[len(STAGING_PREFIX):]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.previous = previous_run_files(self.out)
        self.foreign = {p.name for p in self.out.iterdir()
                        if p.name not in self.previous and not p.name.startswith(STAGING_PREFIX)}
        self.staging = self.out / f"{STAGING_PREFIX}{os.getpid()}"
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir()
        self.keys: set[str] = set()

    def unique_key(self, key: str) -> str:
        """`key`, or key-2, key-3 ...: unused in this run, and clashing with no file of the user's in the folder."""
        candidate, n = key, 1
        while candidate in self.keys or any(name.startswith(candidate + "_") and name.endswith(OUTPUT_SUFFIXES)
                                            for name in self.foreign):
            n += 1
            candidate = f"{key}-{n}"
        self.keys.add(candidate)
        return candidate

    def path(self, name: str) -> Path:
        """Where to write the output called `name` during the run (its final place is out/name)."""
        return self.staging / name

    def commit(self, rows: list[dict]) -> list[Path]:
        """Put this run's files and its index (rows) in place of the previous run's; returns the final paths."""
        write_bytes_atomically(self.staging / INDEX, csv_text(rows))
        made = sorted(p.name for p in self.staging.iterdir() if p.name != INDEX)
        with signals_held():
            (self.out / INDEX).unlink(missing_ok=True)   # first: no index describes a half-replaced folder
            for name in self.previous - set(made) - {INDEX}:
                with contextlib.suppress(OSError):
                    (self.out / name).unlink()
            for name in made:
                os.replace(self.staging / name, self.out / name)
            os.replace(self.staging / INDEX, self.out / INDEX)   # last: the new index names only new files
            fsync_dir(self.out)
        shutil.rmtree(self.staging, ignore_errors=True)
        return [self.out / name for name in made] + [self.out / INDEX]

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
