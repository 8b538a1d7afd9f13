"""Benchmark: memory that train-head's --standardize statistics add beside the training table.

HeadData.standardization used to convert every training row (both views) to
float64 at once: for the 35,800-wide `both+grid` features of two backbones on
UTKFace's 16,598 training images, 9.5 GB beside the 4.8 GB table. It now goes
through heads.chunked_mean_std (a bounded float64 chunk at a time). Each method
runs in its own fresh process on the same random [n, 2, width] float32
table; we report the peak resident memory it added over the table itself
(VmHWM - VmRSS before, from /proc/self/status, with the peak reset after the
table is built), its time, and how far the chunked statistics are from the
one-shot float64 ones.

    nice python -m benchmarks.standardization_memory --rows 2000 --width 35800
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks.machine_info import machine


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure(method: str, rows: int, width: int) -> dict:
    """In this process: build the table, then compute the statistics one way; memory in MiB."""
    import torch

    from pipeline.heads.data import chunked_mean_std

    torch.manual_seed(0)
    train = torch.rand(rows, 2, width).mul_(3).add_(1)
    flat = train.reshape(-1, width)
    Path("/proc/self/clear_refs").write_text("5")   # resets VmHWM to the current RSS: the peak from here on
    before = _status_kib("VmRSS")
    started = time.perf_counter()
    if method == "one-shot float64":           # what HeadData.standardization did before
        as_double = flat.double()
        mean, std = as_double.mean(0), as_double.std(0)
        del as_double
    else:
        mean, std = chunked_mean_std(flat)
    seconds = time.perf_counter() - started
    return {"method": method, "added_mib": (_status_kib("VmHWM") - before) / 1024,
            "table_mib": train.numel() * 4 / 2**20, "seconds": seconds,
            "mean": mean.tolist()[:256], "std": std.tolist()[:256]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000, help="training images (each with 2 views)")
    parser.add_argument("--width", type=int, default=35_800, help="feature width (both+grid of two backbones)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.width)))
        return
    results = []
    for method in ("one-shot float64", "chunked"):
        out = subprocess.run([sys.executable, __file__, "--rows", str(args.rows), "--width", str(args.width),
                              "--child", method], capture_output=True, text=True, check=True).stdout
        results.append(json.loads(out))
    diff = max(max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(results[0][k], results[1][k]))
               for k in ("mean", "std"))
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"commit {info['commit']}, {info['date']}, load average {info['load']:.1f}; "
          f"{args.rows} rows x 2 views x {args.width} float32")
    print()
    print("| method | table (MiB) | added peak memory (MiB) | time (s) |")
    print("|---|---:|---:|---:|")
    for r in results:
        print(f"| {r['method']} | {r['table_mib']:.0f} | {r['added_mib']:.0f} | {r['seconds']:.2f} |")
    print()
    print(f"largest relative difference of the chunked mean/std from the one-shot ones (first 256 columns): "
          f"{diff:.1e}")


if __name__ == "__main__":
    main()
