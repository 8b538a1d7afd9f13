"""Benchmark: how steadily --faces detect frames one face pasted at several sizes, places and tilts,
with and without the close-up look (faces.MtcnnFaces._look_closer), and what the look costs.

Each UTKFace crop (the shipped sample by default) is pasted into 640x480 scenes
in five ways (side 80-230 px, tilt up to 22 degrees). For every paste the
cut-out square is mapped into the original crop's own frame; the spread of its
centre (px of the 200x200 crop), log side and angle over the five pastes says
how much the framing of one face moves with where and how big it is in the
picture. Less spread means the two sides of a scene-vs-crop comparison are cut
out alike. The detector's CPU time per scene is measured in interleaved rounds
on one thread (median round).

    python -m benchmarks.face_close_up                  # the 96 sample crops
    python -m benchmarks.face_close_up --crops 12 --rounds 3

Prints a Markdown table with the machine and commit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
from PIL import Image

from benchmarks.machine_info import machine

PASTES = [((320, 240), 80, 0.0), ((200, 180), 120, 18.0), ((420, 260), 170, -12.0),
          ((300, 240), 230, 6.0), ((250, 250), 100, -22.0)]   # (centre, side px, tilt degrees)


def framing_spread(detector, crops: list[np.ndarray]) -> tuple[np.ndarray, int]:
    """Mean over crops of the spread (std) of the cut-out square's centre (px), log side and angle
    (degrees) over PASTES, in the original crop's frame; and how many pastes were missed."""
    from pipeline.faces.detect import CROP_SIZE, align_face
    from tests.support.scenes import background, crop_geometry, paste

    spreads, missed = [], 0
    for crop in crops:
        frames = []
        for k, (centre, side, tilt) in enumerate(PASTES):
            scene = background(480, 640, seed=11 + k)
            paste_map = paste(scene, crop, centre, side, tilt)
            faces = detector.locate(scene)
            if not faces:
                missed += 1
                continue
            cut = align_face(scene, faces[0]).to_picture
            in_original = np.linalg.inv(np.vstack([paste_map, [0, 0, 1]])) @ np.vstack([cut, [0, 0, 1]])
            middle, size, angle = crop_geometry(in_original[:2], CROP_SIZE)
            frames.append([middle[0], middle[1], np.log(size), angle])
        frames = np.array(frames)
        spreads.append([np.linalg.norm(frames[:, :2].std(0)), frames[:, 2].std(), frames[:, 3].std()])
    return np.mean(spreads, 0), missed


def cpu_ms_per_scene(detector, scenes: list[np.ndarray]) -> float:
    detector.locate(scenes[0])
    start = time.process_time()
    for scene in scenes:
        detector.locate(scene)
    return 1000 * (time.process_time() - start) / len(scenes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "sample" / "utkface")
    parser.add_argument("--crops", type=int, default=96, help="How many crops of --data to paste (sorted by name).")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved timing rounds.")
    args = parser.parse_args()

    import torch

    from pipeline.faces.detect import MtcnnFaces
    from tests.support.scenes import background, paste

    torch.set_num_threads(1)  # as featurize's face workers run it
    files = sorted(args.data.glob("*.jpg"))[:args.crops]
    if not files:
        sys.exit(f"no crops in {args.data}")
    crops = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    scenes = []
    for k, crop in enumerate(crops):
        centre, side, tilt = PASTES[k % len(PASTES)]
        scene = background(480, 640, seed=100 + k)
        paste(scene, crop, centre, side, tilt)
        scenes.append(scene)
    detectors = {"first look only": MtcnnFaces(close_up=False), "with the close-up look": MtcnnFaces()}
    times = {name: [] for name in detectors}
    for _ in range(args.rounds):
        for name, detector in detectors.items():
            times[name].append(cpu_ms_per_scene(detector, scenes))

    info = machine()
    print(f"\n{info['cpu']}, {info['cores']} cores, torch {info['torch']}, 1 thread, commit {info['commit']}, "
          f"{info['date']}, load {info['load']:.1f}\n")
    print(f"{len(crops)} crops from {args.data}, each pasted {len(PASTES)} ways (side 80-230 px, tilt up to 22 deg)\n")
    print("| landmarks | spread of the centre (px of 200) | spread of the side | spread of the angle (deg) | "
          "pastes missed | detector CPU ms per scene (median of rounds) |")
    print("|---|---:|---:|---:|---:|---:|")
    results = {}
    for name, detector in detectors.items():
        spread, missed = framing_spread(detector, crops)
        results[name] = spread
        print(f"| {name} | {spread[0]:.2f} | {100 * spread[1]:.1f}% | {spread[2]:.2f} | {missed} | "
              f"{np.median(times[name]):.1f} |")
    ratio = results["with the close-up look"] / results["first look only"]
    added = np.median(times["with the close-up look"]) - np.median(times["first look only"])
    print(f"\nclose-up / first look: centre {ratio[0]:.2f}, side {ratio[1]:.2f}, angle {ratio[2]:.2f}; "
          f"the look adds {added:.1f} ms per scene")


if __name__ == "__main__":
    main()
