"""Benchmark: our featurize vs the seed's per-epoch backbone pass vs the pure forward, per inference engine.

On the same image subset and machine, in one run:
  (a) our featurize: decode once, every backbone, plain + mirrored view, stored in HDF5;
  (b) the seed's cost per epoch: PIL + DataLoader + RandomHorizontalFlip, one forward
      pass per backbone (what the paper's notebook paid every epoch);
  (c) the ceiling: the same backbone forwards as (a) on tensors decoded beforehand.
(a) and (c) run once per engine (--engines torch,onnxruntime: PyTorch, ONNX Runtime),
and with --per-backbone also for each backbone alone. Each measurement runs in
its own process so that its peak RSS is its own. (a) also runs on twice the
images, to show that its memory does not grow with N.

(a) reports two rates: over the whole run, and over its loop alone, from the first
forward's start to the last one's end (the later decodes and the saves included),
without the setup a full-size run pays once: planning, building the models (for
ONNX Runtime: opening the cached graphs), starting the decoder and decoding the
first batch, assembling the file. The graphs are exported into the cache and
checked against PyTorch before any timing ("prepare"), as a first run would have
done, so (a) and (c) time a later run: one that trusts the stored verdict and
builds no PyTorch model (engine_cache.py).

    python -m benchmarks.featurize                          # 128 UTKFace images, CPU, both engines
    python -m benchmarks.featurize --per-backbone --modes a,c --no-double
    python -m benchmarks.featurize --images 512 --device cuda --modes a,c --engines torch
    python -m benchmarks.featurize --images 1024 --backbones mobilenet_v2 --modes a,c --no-double --rounds 7

On a shared or virtual machine one run of each mode spreads by 10-20%; --rounds N
runs every measurement N times, interleaved, and reports the run with the median
rate per row, the range, and the overhead of (a) over (c) per round.
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

from benchmarks.machine_info import machine

DEFAULT_DATA = REPO.parent / "shared" / "data" / "utkface"
ENGINE_LABEL = {"torch": "PyTorch", "onnxruntime": "ONNX Runtime"}


def pick_images(data: Path, count: int, folder: Path) -> Path:
    """A folder of `count` links to the first images of `data`, the same subset for every mode."""
    from pipeline.ingest.dataset import find_images

    files = find_images(data)
    if len(files) < count:  # repeat a small folder (e.g. the sample) under new names
        files = [files[i % len(files)] for i in range(count)]
    folder.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(files[:count]):
        age = path.name.split("_")[0]
        (folder / f"{age}_0_0_2017{i:013d}.jpg.chip.jpg").symlink_to(path.resolve())
    return folder


def _weights(args) -> dict:
    return {n: args.weights for n in args.backbones.split(",")}


# ----------------------------------------------------------------------------- the modes


def mode_prepare(images: Path, args) -> dict:
    """Export the graphs into the cache (not timed): a first run pays this once."""
    from pipeline.device import resolve_device
    from pipeline.features.extract import BackboneRunner

    runner = BackboneRunner(args.backbones.split(","), _weights(args), resolve_device(args.device),
                            engine=args.engine, probe_files=sorted(images.iterdir())[:3], log=lambda *_: None)
    return {"seconds": 0.0, "images": 0, "engine": runner.describe()}


def mode_ours(images: Path, args) -> dict:
    from pipeline.features import extract

    calls = []
    original = extract.BackboneRunner

    class TimedRunner(original):  # when each forward starts and ends
        def __call__(self, views):
            started = time.perf_counter()
            out = super().__call__(views)
            calls.append((started, time.perf_counter()))
            return out

    extract.BackboneRunner = TimedRunner
    with tempfile.TemporaryDirectory() as folder:
        config = extract.FeaturizeConfig(
            data_dir=images, out=Path(folder) / "bench.h5", backbones=tuple(args.backbones.split(",")),
            weights=_weights(args), batch_size=args.batch_size, device=args.device, decoder=args.decoder,
            engine=args.engine)
        started = time.perf_counter()
        summary = extract.run(config, progress=None, log=lambda *_: None)
        seconds = time.perf_counter() - started
        # Setup: all but the loop from the first forward's start to the last one's end (plan, models, graph
        # check, decoder start, first decode, assembling the file). The loop keeps the other decodes and saves.
        return {"seconds": seconds, "images": summary["written"], "setup": seconds - (calls[-1][1] - calls[0][0])}


def mode_seed(images: Path, args) -> dict:
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    from pipeline.backbones.registry import create_backbone
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

    from pipeline.device import resolve_device
    from pipeline.features.extract import BackboneRunner
    from pipeline.images.decoders import make_decoder

    device = resolve_device(args.device)
    files = sorted(images.iterdir())
    decoder = make_decoder(args.decoder, device.type, args.batch_size)
    batches = [decoder.decode(files[i:i + args.batch_size]).views for i in range(0, len(files), args.batch_size)]
    runner = BackboneRunner(args.backbones.split(","), _weights(args), device, engine=args.engine,
                            probe_files=files[:3], log=lambda *_: None)
    runner(batches[0][:2])  # warm-up, as featurize's first batch pays it too
    started = time.perf_counter()
    for views in batches:
        runner(views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "images": len(files), "engine": runner.describe()}


MODES = {"prepare": mode_prepare, "a": mode_ours, "b": mode_seed, "c": mode_ceiling}


# ----------------------------------------------------------------------------- driver


def run_child(mode: str, images: Path, argv: list[str]) -> dict:
    """Run one mode in a fresh process; return its timing and peak RSS."""
    cmd = [sys.executable, __file__, "--child", mode, "--child-images", str(images), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"mode {mode} failed (status {status}): {' '.join(argv)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gb"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def rate(result: dict, steady: bool = False) -> float:
    seconds = result["seconds"] - (result.get("setup", 0.0) if steady else 0.0)
    return result["images"] / seconds


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
    parser.add_argument("--engines", default="torch,onnxruntime",
                        help="engines for (a) and (c), comma-separated (torch, onnxruntime)")
    parser.add_argument("--per-backbone", action="store_true",
                        help="also run (a) and (c) for each backbone alone")
    parser.add_argument("--no-double", action="store_true", help="skip the 2N run of (a) that checks memory")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every measurement, interleaved; report medians")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-images", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--engine", default="torch", help=argparse.SUPPRESS)  # the child's engine
    args = parser.parse_args()

    if args.child:
        print(json.dumps(MODES[args.child](args.child_images, args)))
        return

    engines = args.engines.split(",")
    modes = args.modes.split(",")
    groups = [args.backbones] + (args.backbones.split(",") if args.per_backbone and "," in args.backbones else [])

    def passthrough(backbones: str, engine: str) -> list[str]:
        return ["--backbones", backbones, "--weights", args.weights, "--batch-size", str(args.batch_size),
                "--device", args.device, "--decoder", args.decoder, "--engine", engine]

    temporary = tempfile.TemporaryDirectory()
    work = Path(temporary.name)
    subset = pick_images(args.data, args.images, work / f"n{args.images}")
    for engine in engines:
        if engine != "torch":
            described = run_child("prepare", subset, passthrough(args.backbones, engine))["engine"]
            print(f"  prepared {engine}: {described}", file=sys.stderr)

    runs = {}   # (backbones, engine, mode) -> [result per round]
    for round_ in range(args.rounds):
        for backbones in groups:
            for mode in modes:
                for engine in (engines if mode in ("a", "c") else ["torch"]):
                    if mode == "b" and backbones != args.backbones:
                        continue
                    r = run_child(mode, subset, passthrough(backbones, engine))
                    runs.setdefault((backbones, engine, mode), []).append(r)
                    print(f"  round {round_ + 1}: ({mode}) {backbones} {engine}: {rate(r):.2f} images/s", file=sys.stderr)
    # Per row, the round with the median rate (its seconds and setup belong together).
    results = [(b, e, m, sorted(rs, key=rate)[len(rs) // 2]) for (b, e, m), rs in runs.items()]
    if "a" in modes and not args.no_double:
        double = pick_images(args.data, 2 * args.images, work / f"n{2 * args.images}")
        for engine in engines:
            results.append((args.backbones, engine, "a2", run_child("a", double, passthrough(args.backbones, engine))))

    info = machine()
    label = {"a": "(a) ours: decode once, 2 views, stored",
             "b": "(b) seed, one epoch: PIL + DataLoader, 1 view",
             "c": "(c) pure forward on decoded tensors",
             "a2": f"(a) ours on {2 * args.images} images (memory check)"}
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu']}, torch {info['torch']}, "
          f"commit {info['commit']}, {info['date']}, load average {info['load']:.1f}")
    print(f"images: {args.images} from {args.data}; weights {args.weights}; batch {args.batch_size}; "
          f"device {args.device}; decoder {args.decoder}\n")
    several = args.rounds > 1
    print("| backbones | engine | mode | images | seconds | images/s | images/s without setup | peak RSS (GB) |"
          + (f" images/s, {args.rounds} rounds (min-max) |" if several else ""))
    print("|---|---|---|---:|---:|---:|---:|---:|" + ("---:|" if several else ""))
    for backbones, engine, mode, r in results:
        steady = f"{rate(r, True):.2f}" if "setup" in r else ""
        spread = [rate(x) for x in runs.get((backbones, engine, mode), [r])]
        print(f"| {backbones.replace(',', ' + ')} | {ENGINE_LABEL.get(engine, engine) if mode != 'b' else 'PyTorch'} "
              f"| {label[mode]} | {r['images']} | {r['seconds']:.1f} | {rate(r):.2f} | {steady} | "
              f"{r['peak_rss_gb']:.2f} |" + (f" {min(spread):.1f}-{max(spread):.1f} |" if several else ""))

    found = {(b, e, m): r for b, e, m, r in results}
    print()
    for backbones in groups:
        name = backbones.replace(",", " + ")
        for engine in engines:
            a, c = found.get((backbones, engine, "a")), found.get((backbones, engine, "c"))
            if a and c:
                print(f"{name}, {engine}: overhead of (a) over its pure forward (c): "
                      f"{100 * (rate(c) / rate(a, True) - 1):.1f}% without setup, "
                      f"{100 * (rate(c) / rate(a) - 1):.1f}% with it (target <= 10%)")
                if several:  # each round's (a) against the (c) of the same round
                    pairs = sorted(100 * (rate(cc) / rate(aa, True) - 1)
                                   for aa, cc in zip(runs[(backbones, engine, "a")], runs[(backbones, engine, "c")]))
                    print(f"  per round, without setup: median {pairs[len(pairs) // 2]:.1f}%, "
                          f"range {pairs[0]:.1f}% to {pairs[-1]:.1f}%")
        if "torch" in engines and "onnxruntime" in engines:
            for mode in ("a", "c"):
                t, o = found.get((backbones, "torch", mode)), found.get((backbones, "onnxruntime", mode))
                if t and o:
                    extra = (f" ({rate(o, True) / rate(t, True):.2f}x without setup)" if mode == "a" else "")
                    print(f"{name}, ({mode}): ONNX Runtime / PyTorch = {rate(o) / rate(t):.2f}x{extra}")
    a_b = found.get((args.backbones, engines[0], "a")), found.get((args.backbones, "torch", "b"))
    if all(a_b):
        print(f"a/b throughput ({engines[0]}): {rate(a_b[0]) / rate(a_b[1]):.2f} (ours does 2 views once; the seed "
              f"pays (b) every epoch, so 10 epochs cost it {10 * a_b[1]['seconds']:.0f} s vs our "
              f"{a_b[0]['seconds']:.0f} s)")
    for engine in engines:
        single, double = found.get((args.backbones, engine, "a")), found.get((args.backbones, engine, "a2"))
        if single and double:
            print(f"peak RSS, {engine}: {single['peak_rss_gb']:.2f} GB at N={args.images}, "
                  f"{double['peak_rss_gb']:.2f} GB at N={2 * args.images} (target <= 3 GB, flat in N)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "args": vars(args) | {"data": str(args.data)},
                                         "results": [{"backbones": b, "engine": e, "mode": m, **r}
                                                     for b, e, m, r in results]}, indent=1, default=str))
    temporary.cleanup()


if __name__ == "__main__":
    main()
