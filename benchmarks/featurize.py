"""Benchmark: our featurize vs the seed's per-epoch backbone pass vs the pure forward.

On the same image subset and machine, in one run:
  (a) our featurize: decode once, every backbone, plain + mirrored view, stored in HDF5;
  (b) the seed's cost per epoch: PIL + DataLoader + RandomHorizontalFlip, one forward
      pass per backbone (what the paper's notebook paid every epoch);
  (c) the ceiling: the same backbone forwards as (a) on tensors decoded beforehand.
Each mode runs in its own process so that its peak RSS is its own. (a) also runs
on twice the images, to show that its memory does not grow with N.

    python benchmarks/featurize.py                 # 128 UTKFace images, CPU
    python benchmarks/featurize.py --images 512 --device cuda --modes a,c
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from machine_info import machine  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "utkface"


def pick_images(data: Path, count: int, folder: Path) -> Path:
    """A folder of `count` links to the first images of `data`, the same subset for every mode."""
    from pipeline.dataset import find_images

    files = find_images(data)
    if len(files) < count:  # repeat a small folder (e.g. the sample) under new names
        files = [files[i % len(files)] for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files[:count]):
        age = path.name.split("_")[0]
        (folder / f"{age}_0_0_2017{i:013d}.jpg.chip.jpg").symlink_to(path.resolve())
    return folder


# ----------------------------------------------------------------------------- the three modes


def mode_ours(images: Path, args) -> dict:
    from pipeline import extract

    with tempfile.TemporaryDirectory() as folder:
        config = extract.FeaturizeConfig(
            data_dir=images, out=Path(folder) / "bench.h5", backbones=tuple(args.backbones.split(",")),
            weights={n: args.weights for n in args.backbones.split(",")}, batch_size=args.batch_size,
            device=args.device, decoder=args.decoder)
        started = time.perf_counter()
        summary = extract.run(config, progress=None, log=lambda *_: None)
        return {"seconds": time.perf_counter() - started, "images": summary["written"]}


def mode_seed(images: Path, args) -> dict:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from pipeline.backbones import create_backbone
    from pipeline.constants import IMAGENET_MEAN, IMAGENET_STD

    transform = transforms.Compose([transforms.Resize((224, 224)), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    class Faces(Dataset):
        def __init__(self):
            self.files = sorted(images.iterdir())

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            return transform(Image.open(self.files[i]).convert("RGB")), 0

    device = torch.device("cuda" if args.device == "cuda" else "cpu")
    loader = DataLoader(Faces(), batch_size=32, shuffle=True, num_workers=2)
    models = [create_backbone(n, args.weights).model.to(device) for n in args.backbones.split(",")]
    started = time.perf_counter()
    for model in models:  # the notebook trained one model at a time, decoding again for each
        with torch.no_grad():
            for x, _ in loader:
                model(x.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "images": len(loader.dataset)}


def mode_ceiling(images: Path, args) -> dict:
    import torch

    from pipeline.decode import make_decoder
    from pipeline.device import resolve_device
    from pipeline.extract import BackboneRunner

    device = resolve_device(args.device)
    files = sorted(images.iterdir())
    decoder = make_decoder(args.decoder, device.type, args.batch_size)
    batches = [decoder.decode(files[i:i + args.batch_size]).views for i in range(0, len(files), args.batch_size)]
    runner = BackboneRunner(args.backbones.split(","), {n: args.weights for n in args.backbones.split(",")}, device)
    runner(batches[0][:2])  # warm-up, as featurize's first batch pays it too
    started = time.perf_counter()
    for views in batches:
        runner(views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "images": len(files)}


MODES = {"a": mode_ours, "b": mode_seed, "c": mode_ceiling}


# ----------------------------------------------------------------------------- driver


def run_child(mode: str, images: Path, argv: list[str]) -> dict:
    """Run one mode in a fresh process; return its timing and peak RSS."""
    cmd = [sys.executable, __file__, "--child", mode, "--child-images", str(images), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"mode {mode} failed (status {status})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else REPO / "sample" / "utkface")
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50,efficientnet_b0")
    parser.add_argument("--weights", default="IMAGENET1K_V1" if os.environ.get("TORCH_HOME") else "none")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--decoder", default="auto", choices=["auto", "dali", "torch"])
    parser.add_argument("--modes", default="a,b,c")
    parser.add_argument("--no-double", action="store_true", help="skip the 2N run of (a) that checks memory")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-images", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(MODES[args.child](args.child_images, args)))
        return

    passthrough = ["--backbones", args.backbones, "--weights", args.weights, "--batch-size", str(args.batch_size),
                   "--device", args.device, "--decoder", args.decoder]
    temporary = tempfile.TemporaryDirectory()
    work = Path(temporary.name)
    subset = pick_images(args.data, args.images, work / f"n{args.images}")
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_child(mode, subset, passthrough)
        print(f"  ({mode}) {results[mode]['images'] / results[mode]['seconds']:.1f} images/s", file=sys.stderr)
    if "a" in results and not args.no_double:
        double = pick_images(args.data, 2 * args.images, work / f"n{2 * args.images}")
        results["a2"] = run_child("a", double, passthrough)

    info = machine()
    label = {"a": "(a) ours: decode once, all backbones, 2 views, stored",
             "b": "(b) seed, one epoch: PIL + DataLoader, each backbone, 1 view",
             "c": "(c) ceiling: same forwards as (a) on decoded tensors",
             "a2": f"(a) ours on {2 * args.images} images (memory check)"}
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}, torch {info['torch']}, "
          f"commit {info['commit']}, {info['date']}")
    print(f"images: {args.images} from {args.data}; backbones {args.backbones}; weights {args.weights}; "
          f"batch {args.batch_size}; device {args.device}\n")
    print("| mode | images | seconds | images/s | peak RSS (GB) |")
    print("|---|---:|---:|---:|---:|")
    for key, r in results.items():
        print(f"| {label[key]} | {r['images']} | {r['seconds']:.1f} | {r['images'] / r['seconds']:.2f} | "
              f"{r['peak_rss_gb']:.2f} |")
    rate = {k: r["images"] / r["seconds"] for k, r in results.items()}
    print()
    if "a" in rate and "b" in rate:
        print(f"a/b throughput: {rate['a'] / rate['b']:.2f} (ours does 2 views once; the seed pays (b) every epoch,"
              f" so 10 epochs cost it {10 * results['b']['seconds']:.0f} s vs our {results['a']['seconds']:.0f} s)")
    if "a" in rate and "c" in rate:
        print(f"a/c throughput: {rate['a'] / rate['c']:.3f}  -> overhead over the pure forward: "
              f"{100 * (rate['c'] / rate['a'] - 1):.1f}% (target <= 10%)")
    if "a2" in results:
        print(f"peak RSS at N={args.images}: {results['a']['peak_rss_gb']:.2f} GB, "
              f"at N={2 * args.images}: {results['a2']['peak_rss_gb']:.2f} GB (target <= 3 GB, flat in N)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"data": str(args.data)},
                                         "results": results}, indent=1, default=str))
    temporary.cleanup()


if __name__ == "__main__":
    main()
