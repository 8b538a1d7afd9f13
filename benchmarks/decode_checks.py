"""Benchmark: what the shared decode file checks cost, what nvJPEG's chroma would change, what a DALI rebuild costs.

  checks    ms per file of the old check (end marker only), the header walk, and every check
            (header walk + pixel limit + libjpeg-turbo strict pass), over --files UTKFace files;
            and how many of them the checks refuse (should be 0 on UTKFace);
  chroma    torchvision's nvJPEG decodes 4:2:0 JPEGs without chroma interpolation. Simulated on
            the CPU with libjpeg-turbo's non-interpolating upsampler (simplejpeg fastupsample) vs
            its default: the difference in decoded levels and after resize + normalization;
  rebuild   DALI CPU pipeline: build time, first run after a build vs a warm run (8 files).

    python -m benchmarks.decode_checks                 # 1000 files for checks, 512 for chroma
    python -m benchmarks.decode_checks --data /path/to/UTKFace --files 200

Prints Markdown tables, with the machine, torch version and git commit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

from benchmarks.machine_info import machine
from pipeline.images.checks import checked_header, parse_header


def old_end_marker_check(data: np.ndarray) -> bool:
    """The check decode.py made before: the last KiB, zeros stripped, ends with FF D9."""
    return data[-1024:].tobytes().rstrip(b"\x00").endswith(b"\xff\xd9")


def time_per_file(check, files: list[np.ndarray], repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for data in files:
            check(data)
        best = min(best, time.perf_counter() - started)
    return best / len(files) * 1e3


def checks_table(paths: list[Path]) -> None:
    files = [np.fromfile(path, np.uint8) for path in paths]
    refused = sum(isinstance(checked_header(data), str) for data in files)
    print(f"\n### file checks, {len(files)} files ({refused} refused)\n")
    print("| check | ms per file (best of 3) |\n|---|---:|")
    for name, check in [("old: end marker only", old_end_marker_check), ("header walk", parse_header),
                        ("all checks (walk + limit + strict libjpeg)", checked_header)]:
        print(f"| {name} | {time_per_file(check, files):.3f} |")


def chroma_table(paths: list[Path]) -> None:
    import simplejpeg

    from pipeline.images.views import preprocess_rgb

    worst_level, maxima, means = 0, [], []
    for path in paths:
        data = path.read_bytes()
        smooth = simplejpeg.decode_jpeg(data, colorspace="RGB")
        blocky = simplejpeg.decode_jpeg(data, colorspace="RGB", fastupsample=True)
        worst_level = max(worst_level, int(np.abs(smooth.astype(int) - blocky).max()))
        difference = (preprocess_rgb([smooth]) - preprocess_rgb([blocky])).abs()
        maxima.append(difference.max().item())
        means.append(difference.mean().item())
    print(f"\n### chroma without interpolation (torch-gpu's nvJPEG, simulated), {len(paths)} files\n")
    print("| decoded levels, max | normalized, max | normalized, mean | normalized, median of per-file max |")
    print("|---:|---:|---:|---:|")
    print(f"| {worst_level} | {max(maxima):.4f} | {np.mean(means):.5f} | {np.median(maxima):.4f} |")


def rebuild_table(paths: list[Path]) -> None:
    from pipeline.images.dali_decoder import build_dali_pipeline, dali_available

    if not dali_available():
        print("\n(no DALI: rebuild cost not measured)")
        return
    encoded = [np.fromfile(path, np.uint8) for path in paths[:8]]
    build_dali_pipeline(64, 2, None).run(encoded=encoded)  # load DALI's libraries once, outside the timing
    rows = []
    for _ in range(3):
        started = time.perf_counter()
        pipe = build_dali_pipeline(64, 2, None)
        built = time.perf_counter()
        pipe.run(encoded=encoded)
        first = time.perf_counter()
        pipe.run(encoded=encoded)
        warm = time.perf_counter()
        rows.append(((built - started) * 1e3, (first - built) * 1e3, (warm - first) * 1e3))
        del pipe
    print(f"\n### DALI CPU pipeline rebuild, batch of {len(encoded)} files, 2 threads\n")
    print("| build (ms) | first run after build (ms) | warm run (ms) |\n|---:|---:|---:|")
    for build, first, warm in rows:
        print(f"| {build:.1f} | {first:.1f} | {warm:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "utkface")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--chroma-files", type=int, default=512)
    args = parser.parse_args()
    paths = sorted(args.data.rglob("*.jpg"))
    if not paths:
        sys.exit(f"no JPEG files under {args.data}; pass --data")
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, commit {info['commit']}, {info['date']}, "
          f"load average {info['load']:.1f}")
    checks_table(paths[:: max(1, len(paths) // args.files)][: args.files])
    chroma_table(paths[:: max(1, len(paths) // args.chroma_files)][: args.chroma_files])
    rebuild_table(paths)


if __name__ == "__main__":
    main()
