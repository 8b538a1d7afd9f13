"""Benchmark: where featurize's CPU goes besides the forward pass, as CPU seconds per thread role (Linux).

Wall-clock overheads are unreadable on a shared machine; CPU time is not. This runs
one featurize job in this process and reads every thread's CPU time from
/proc/self/task before the first forward and after the last one (the loop), and
for the whole run (the difference: setup). Threads are named by what they run:
the main thread (ONNX Runtime's first intra-op thread, or PyTorch's, plus the
loop's Python and the part files), the engine's other intra-op threads, DALI's
workers (decode, resize, normalize), the prefetch thread (feeds DALI, copies its
output out), and the file-check threads (read, header walk, strict libjpeg pass).

    TORCH_HOME=../shared/torch nice python -m benchmarks.featurize_overhead --images 1024 --engine onnxruntime
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks.featurize import DEFAULT_DATA, pick_images
from benchmarks.machine_info import machine

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, tuple[str, float]]:
    """{thread id: (name, CPU seconds)} of this process's threads."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
        except OSError:  # the thread ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        found[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / TICKS)   # utime + stime
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--backbones", default="mobilenet_v2")
    parser.add_argument("--weights", default="IMAGENET1K_V1" if os.environ.get("TORCH_HOME") else "none")
    parser.add_argument("--engine", default="onnxruntime", choices=["torch", "onnxruntime", "auto"])
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    from pipeline.features import extract
    from pipeline.images import dali_decoder, torch_decoder, views

    roles: dict[int, str] = {}   # thread id -> role, for the Python threads we can see
    marks = []                   # per forward: (thread CPU before, wall before, thread CPU after, wall after)
    original_call, original_decode = extract.BackboneRunner.__call__, views.read_checked

    def timed_call(self, views):
        before = (thread_cpu(), time.perf_counter())
        out = original_call(self, views)
        marks.append((*before, thread_cpu(), time.perf_counter()))
        return out

    def tagged_read_checked(*a, **k):   # runs in the prefetch thread; its pool's threads tag themselves below
        roles.setdefault(threading.get_native_id(), "prefetch thread (feeds DALI, copies its output)")
        return original_decode(*a, **k)

    original_read_one = views._read_one

    def tagged_read_one(*a, **k):
        roles.setdefault(threading.get_native_id(), "file checks (read, header walk, strict libjpeg pass)")
        return original_read_one(*a, **k)

    extract.BackboneRunner.__call__ = timed_call
    dali_decoder.read_checked = torch_decoder.read_checked = tagged_read_checked
    views._read_one = tagged_read_one
    roles[threading.main_thread().native_id] = "main (engine intra-op thread 1, loop Python, part files)"

    with tempfile.TemporaryDirectory() as folder:
        images = pick_images(args.data, args.images, Path(folder) / "images")
        config = extract.FeaturizeConfig(data_dir=images, out=Path(folder) / "out.h5",
                                         backbones=tuple(args.backbones.split(",")),
                                         weights={n: args.weights for n in args.backbones.split(",")},
                                         batch_size=args.batch_size, device="cpu", engine=args.engine)
        start_cpu, start_wall = time.process_time(), time.perf_counter()   # all threads, ended ones too
        summary = extract.run(config, progress=None, log=lambda *_: None)
        whole_cpu, end_wall = time.process_time() - start_cpu, time.perf_counter()

    def role(tid: int, name: str) -> str:
        if tid in roles:
            return roles[tid]
        return "DALI workers (decode, resize, normalize)" if name.startswith("[DALI]") else \
            "engine intra-op threads 2.. (ONNX Runtime / PyTorch pool)"

    loop = collections.defaultdict(float)
    first, last = marks[0], marks[-1]
    for tid, (name, seconds) in last[2].items():
        loop[role(tid, name)] += seconds - first[0].get(tid, (name, 0.0))[1]
    # Threads that ended before the last mark (none in a normal run) are not in the loop's sum.
    loop_cpu = sum(loop.values())
    loop_wall = last[3] - first[1]
    images_done = summary["written"]
    engine = (summary.get("compute") or {}).get("engine", args.engine)

    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, commit {info['commit']}, "
          f"{info['date']}, load average {info['load']:.1f}")
    print(f"{images_done} images, {args.backbones}, engine {engine}, batch {args.batch_size}, DALI decoder on the CPU\n")
    print("| thread role | CPU s in the loop | ms per image |")
    print("|---|---:|---:|")
    for name, seconds in sorted(loop.items(), key=lambda item: -item[1]):
        print(f"| {name} | {seconds:.2f} | {1000 * seconds / images_done:.2f} |")
    forward = loop.get(roles[threading.main_thread().native_id], 0.0) + \
        loop.get("engine intra-op threads 2.. (ONNX Runtime / PyTorch pool)", 0.0)
    print(f"| loop, all threads | {loop_cpu:.2f} | {1000 * loop_cpu / images_done:.2f} |")
    print(f"\nbeside the forward (all but the main and engine threads): {loop_cpu - forward:.2f} CPU s, "
          f"{100 * (loop_cpu - forward) / forward:.1f}% of the forward threads' CPU")
    print(f"loop: {loop_wall:.1f} s wall; setup (whole run minus the loop): {whole_cpu - loop_cpu:.2f} CPU s, "
          f"{(end_wall - start_wall) - loop_wall:.2f} s wall")


if __name__ == "__main__":
    main()
