"""Benchmark: Grad-CAMs per second per backbone, in batches, and what a model load costs.

For each backbone:
  load      build the full model (backbone weights + head), once;
  forward   images/s of the plain forward pass (no map), for reference;
  gradcam   maps/s at each batch size (forward + backward to the target layer);
  explain   end to end over a folder of --images pictures: one model load, decode,
            maps, overlay PNGs written; the share of the load in the total shows
            that a folder is one load, not one per image.

    python -m benchmarks.explain                          # 32 UTKFace images, CPU, all three backbones
    python -m benchmarks.explain --backbones mobilenet_v2 --batch-sizes 1,16 --images 100

Weights: ImageNet (TORCH_HOME=../shared/torch is set when that folder exists),
else --weights none (random init; the speed is the same, except that random
MobileNetV2/EfficientNet activations are tiny, which can hit slow denormal paths).
Prints a Markdown table, with the machine, torch version and git commit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
if (SHARED / "torch").is_dir():
    os.environ.setdefault("TORCH_HOME", str(SHARED / "torch"))

import numpy as np
import torch

from benchmarks.machine_info import machine


def pick_images(data: Path | None, count: int, folder: Path) -> list[Path]:
    """`count` UTKFace pictures (evenly spread over the sorted folder), or made-up ones when absent."""
    folder.mkdir(parents=True, exist_ok=True)
    if data and data.is_dir():
        files = sorted(data.glob("*.jpg"))
        step = max(1, len(files) // count)
        return files[::step][:count]
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        path = folder / f"{20 + i % 60}_0_0_2017{i:013d}.jpg.chip.jpg"
        Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(path, "JPEG")
        paths.append(path)
    return paths


def head_checkpoint(name: str, weights: str, folder: Path) -> Path:
    """A random head with the meta of a real one: the speed does not depend on its values."""
    from pipeline.backbones.registry import get_spec, resolve_weights_id
    from pipeline.constants import DEFAULT_GROUP_EDGES, group_names
    from pipeline.features.extract import PREPROCESSING
    from pipeline.heads.checkpoint import save_checkpoint
    from pipeline.heads.model import AgeHead

    width = get_spec(name).feature_width
    return save_checkpoint(folder / f"head_{name}", AgeHead(width), {
        "backbones": [name], "weights": {name: resolve_weights_id(name, weights)}, "feature_kind": "last",
        "group_edges": list(DEFAULT_GROUP_EDGES), "class_names": group_names(DEFAULT_GROUP_EDGES),
        "target": "group", "feature_fingerprint": "benchmark", "preprocessing": PREPROCESSING,
        "feature_dim": width, "hidden": [512, 256], "config": {}, "history": [], "best_epoch": 0})


def rate(fn, batches: list[torch.Tensor], repeats: int) -> float:
    fn(batches[0])  # warm-up at the batch shape: first-call allocation and kernel selection
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        for batch in batches:
            fn(batch)
        best = max(best, sum(len(b) for b in batches) / (time.perf_counter() - started))
    return best


def bench_backbone(name: str, args, pictures: list[np.ndarray], paths: list[Path], work: Path) -> dict:
    from pipeline.explain.cam import grad_cam
    from pipeline.explain.job import ExplainConfig, explain_images, to_model_input
    from pipeline.inference.full_model import load_full_model

    checkpoint = head_checkpoint(name, args.weights, work)
    started = time.perf_counter()
    model, _ = load_full_model(checkpoint, device=args.device)
    load_s = time.perf_counter() - started
    x = to_model_input(pictures, torch.device(args.device))
    row = {"backbone": name, "load_s": load_s}

    def forward(batch):
        with torch.inference_mode():
            model(batch.contiguous(memory_format=torch.channels_last))

    sizes = [int(s) for s in args.batch_sizes.split(",")]
    row["forward"] = rate(forward, list(x.split(max(sizes))), args.repeats)
    for size in sizes:
        row[f"gradcam_b{size}"] = rate(lambda b: grad_cam(model, b), list(x.split(size)), args.repeats)
    del model
    out = work / f"out_{name}"
    started = time.perf_counter()
    summary = explain_images(ExplainConfig(inputs=paths, checkpoints=[checkpoint], out_dir=out,
                                           batch_size=max(sizes), device=args.device),
                             log=lambda *_: None, warn=print)
    total = time.perf_counter() - started
    row["explain_images_per_s"] = summary["explained"] / total
    row["explain_load_share"] = load_s / total
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50,efficientnet_b0")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,8,16")
    parser.add_argument("--weights", default="IMAGENET1K_V1", help="IMAGENET1K_V1 or none")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "utkface")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="best of N passes over the images")
    args = parser.parse_args()

    from pipeline.explain.job import read_pictures

    info = machine()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        paths = pick_images(args.data, args.images, work / "pictures")
        _, pictures, failures = read_pictures(paths)
        if failures:
            sys.exit(f"cannot read benchmark pictures: {failures[:3]}")
        rows = [bench_backbone(name, args, pictures, paths, work) for name in args.backbones.split(",")]

    sizes = args.batch_sizes.split(",")
    print(f"\nGrad-CAM speed, {len(pictures)} pictures ({'UTKFace' if args.data.is_dir() else 'synthetic'} "
          f"200x200 -> 224), weights {args.weights}, device {args.device}")
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads), "
          f"commit {info['commit']}, load average at start {info['load']:.1f}\n")
    print("| backbone | model load (s) | forward (img/s) | "
          + " | ".join(f"Grad-CAM batch {s} (maps/s)" for s in sizes)
          + f" | explain {len(pictures)} files end to end (img/s) | load share |")
    print("|---|---:|---:|" + "---:|" * len(sizes) + "---:|---:|")
    for row in rows:
        print(f"| {row['backbone']} | {row['load_s']:.2f} | {row['forward']:.1f} | "
              + " | ".join(f"{row[f'gradcam_b{s}']:.1f}" for s in sizes)
              + f" | {row['explain_images_per_s']:.1f} | {100 * row['explain_load_share']:.0f}% |")


if __name__ == "__main__":
    main()
