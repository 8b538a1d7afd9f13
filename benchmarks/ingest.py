"""Ingest time per label source: the same images labelled by UTKFace names, by a CSV file and by class folders.

    python -m benchmarks.ingest [DATA_DIR] [--limit N]

Ingest (dataset.scan) lists the files, reads the labels, stats and hashes every
file; it runs once per featurize job before any decoding. The CSV and the class
folders are made from the UTKFace names in a temporary folder (the folders as
symlinks, so no image is copied). Each source is timed twice; the second run
reads the files from the page cache. Prints a Markdown table with the machine.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from benchmarks.machine_info import machine
from pipeline.ingest.dataset import scan
from pipeline.ingest.labels import ClassFolders, CsvLabels, make_csv_format

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "utkface"


def timed(data_dir: Path, source, limit):
    started = time.perf_counter()
    records, skipped = scan(data_dir, limit=limit, source=source)
    return time.perf_counter() - started, len(records), len(skipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--limit", type=int)
    args = parser.parse_args()

    records, _ = scan(args.data, limit=args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        labels = Path(tmp) / "labels.csv"
        with labels.open("w", newline="") as handle:
            csv.writer(handle).writerows([["path", "age", "gender", "race"]]
                                         + [[r.path, r.age, r.gender, r.race] for r in records])
        folders = Path(tmp) / "folders"
        for r in records:  # DATA/<age>/<name>, symlinks to the originals
            link = folders / str(r.age) / r.path.replace("/", "__")
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to((args.data / r.path).resolve())
        sources = [("UTKFace names", args.data, None),
                   ("CSV labels", args.data, CsvLabels(labels, make_csv_format(labels_path=labels))),
                   ("class folders (symlinks)", folders, ClassFolders())]
        rows = []
        for name, data_dir, source in sources:
            for attempt in (1, 2):
                seconds, n, skipped = timed(data_dir, source, args.limit if source is None else None)
                rows.append((name, attempt, n, skipped, seconds))

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, load {info['load']:.1f}; commit {info['commit']}; "
          f"{info['date']}; data {args.data}")
    print("\n| source | run | images | skipped | seconds | images/s |\n|---|---:|---:|---:|---:|---:|")
    for name, attempt, n, skipped, seconds in rows:
        print(f"| {name} | {attempt} | {n} | {skipped} | {seconds:.2f} | {n / seconds:.0f} |")


if __name__ == "__main__":
    main()
