"""How far each decode path and compute precision moves the features from the CPU reference path.

The reference is what `featurize --verify` recomputes: torchvision decoding on
the CPU, float32, the torch engine. Each other way of computing (another
decoder, another batch size, bfloat16 or float16 autocast) runs on the same
images, and the table gives per backbone and output the minimum cosine and the
largest absolute difference, also relative to the largest |value|. These
numbers set pipeline/verify.py's tolerances. On a GPU machine add
`--device cuda` to measure the GPU paths themselves.

    TORCH_HOME=../shared/torch python -m benchmarks.precision_twins --images 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.machine_info import machine
from pipeline.features.extract import BackboneRunner
from pipeline.images.dali_decoder import dali_available
from pipeline.images.decoders import make_decoder

REPO = Path(__file__).resolve().parents[1]


def min_cosine(reference: np.ndarray, other: np.ndarray) -> float:
    a, b = (x.reshape(-1, x.shape[-1]).astype(np.float64) for x in (reference, other))
    return float((np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)).min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "utkface")
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_b0,resnet50")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()

    files = sorted(str(p) for p in args.data.rglob("*.jpg"))[:args.images]
    names = tuple(args.backbones.split(","))
    weights = {n: args.weights for n in names}
    cpu = torch.device("cpu")
    reference_views = make_decoder("torch", "cpu", 64).decode(files).views
    reference = BackboneRunner(names, weights, cpu, precision="float32", engine="torch")(reference_views)

    device = torch.device(args.device)
    where = "gpu" if device.type == "cuda" else "cpu"
    candidates = [(f"torch-{where}, float32, half the batch", "torch", "float32", len(files) // 2)]
    if dali_available():
        candidates.append((f"dali-{where}, float32", "dali", "float32", None))
    candidates += [(f"torch-{where}, float16 autocast", "torch", "float16", None),
                   (f"torch-{where}, bfloat16 autocast", "torch", "bfloat16", None)]

    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, gpu {info['gpu']}, torch {info['torch']}, commit {info['commit']}, "
          f"{info['date']}, load {info['load']:.1f}; {len(files)} images from {args.data}, weights {args.weights}\n")
    print("| against torch-cpu float32 | decoded max abs diff | backbone | output | min cosine | max abs diff "
          "| relative to max abs value | seconds |")
    print("|---|---:|---|---|---:|---:|---:|---:|")
    for label, family, precision, limit in candidates:
        views = make_decoder(family, args.device, 64).decode(files[:limit]).views
        decoded = float((views.float().cpu() - reference_views[:len(views)]).abs().max())
        started = time.perf_counter()
        out = BackboneRunner(names, weights, device, precision=precision, engine="torch")(views)
        seconds = time.perf_counter() - started
        for name in names:
            for output in ("features", "stages"):
                ref, got = reference[name][output][:len(views)], out[name][output]
                diff = float(np.abs(ref - got).max())
                print(f"| {label} | {decoded:.2g} | {name} | {output} | {min_cosine(ref, got):.6f} | {diff:.2g} "
                      f"| {diff / np.abs(ref).max():.2g} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
