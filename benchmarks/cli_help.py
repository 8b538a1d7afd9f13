"""Benchmark: how long each command takes to answer --help, beside `python -c "import torch"`.

Every run is a fresh interpreter started from the repository root (the top-level
featurize.py, train_head.py, ... of a checkout), timed from start to exit. The
commands and the yardsticks run in turn, round after round, so that a change in the
machine's load touches them all alike; the table gives the median of the rounds.

    python -m benchmarks.cli_help --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

COMMANDS = {
    "featurize --help": ["featurize.py", "--help"],
    "train-head --help": ["train_head.py", "--help"],
    "evaluate --help": ["evaluate.py", "--help"],
    "predict --help": ["predict.py", "--help"],
    "explain --help": ["explain.py", "--help"],
    "train-head (usage error)": ["train_head.py"],
}
YARDSTICKS = {
    'python -c "import torch"': ["-c", "import torch"],
    'python -c "pass"': ["-c", "pass"],
}


def wall_seconds(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (after one untimed warm-up round)")
    args = parser.parse_args()

    runs = {**COMMANDS, **YARDSTICKS}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds + 1):
        for name, argv in runs.items():
            seconds = wall_seconds(argv)
            if round_:  # round 0 warms the file cache
                times[name].append(seconds)

    from benchmarks.machine_info import machine

    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, python {info['python']}, torch {info['torch']}, "
          f"commit {info['commit']}, {info['date']}, load {info['load']:.1f}; {args.rounds} rounds")
    torch_median = statistics.median(times['python -c "import torch"'])
    print()
    print("| command | median s | min s | max s | share of `import torch` |")
    print("|---|---:|---:|---:|---:|")
    for name, seconds in times.items():
        print(f"| `{name}` | {statistics.median(seconds):.3f} | {min(seconds):.3f} | {max(seconds):.3f} | "
              f"{statistics.median(seconds) / torch_median:.0%} |")


if __name__ == "__main__":
    main()
