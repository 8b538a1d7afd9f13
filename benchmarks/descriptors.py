"""Benchmark: what each descriptor (featurize --descriptors) adds to featurize time and to the feature file.

On the same decoded images (plain + mirrored views), per backbone:
  - the featurize forward (extract.BackboneRunner: fused BatchNorm, channels_last)
    without descriptors and with all of them, in images/s (best of --repeats);
  - each descriptor alone, timed on the captured feature maps of those images
    (its own cost, in ms per image, both views), which stays measurable on a
    busy machine where the forward's own spread is larger than the descriptors;
  - the bytes each output takes in an HDF5 file written as featurize writes it
    (float16, 256-row chunks, store._create_datasets), per image and scaled to
    the 23,708 UTKFace crops.

    TORCH_HOME=../shared/torch python -m benchmarks.descriptors --images 128
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from benchmarks.machine_info import machine

DEFAULT_DATA = REPO.parent / "shared" / "data" / "utkface"
UTKFACE_IMAGES = 23_708


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--backbones", default="mobilenet_v2,efficientnet_b0")
    parser.add_argument("--weights", default="IMAGENET1K_V1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    import h5py
    import numpy as np
    import torch

    from pipeline.backbones import descriptors as desc
    from pipeline.backbones.descriptors import dataset_path
    from pipeline.backbones.registry import get_spec
    from pipeline.features.extract import BackboneRunner
    from pipeline.features.writer import _create_datasets
    from pipeline.images.decoders import make_decoder
    from pipeline.ingest.dataset import find_images

    info = machine()
    files = find_images(args.data)[: args.images]
    decoder = make_decoder("torch", "cpu", args.batch_size)
    batches = [decoder.decode([str(p) for p in files[lo:lo + args.batch_size]]).views
               for lo in range(0, len(files), args.batch_size)]
    n = sum(len(b) for b in batches)
    device = torch.device("cpu")
    rows = []
    for name in args.backbones.split(","):
        spec = get_spec(name)
        rates = {}
        outputs = None
        for label, chosen in (("none", ()), ("all", desc.DESCRIPTORS)):
            runner = BackboneRunner([name], {name: args.weights}, device, chosen)
            runner(batches[0][:2])  # warm-up
            best = float("inf")
            for _ in range(args.repeats):
                started = time.perf_counter()
                results = [runner(views)[name] for views in batches]
                best = min(best, time.perf_counter() - started)
            rates[label] = n / best
            if label == "all":
                outputs = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
        # Each descriptor alone, on the maps the forward produced (captured once).
        model = runner.models[name]
        maps = {}
        stage_index = spec.stage_indices[-1]
        stage_module = (model.model.get_submodule(f"layer{stage_index}") if spec.layout == "resnet"
                        else model.model.features[stage_index])
        hooks = [model.cam_layer.register_forward_hook(lambda _m, _i, o: maps.setdefault("last", []).append(o)),
                 stage_module.register_forward_hook(lambda _m, _i, o: maps.setdefault("stage", []).append(o))]
        with torch.inference_mode():
            for views in batches:
                model(views.flatten(0, 1).contiguous(memory_format=torch.channels_last))
        for h in hooks:
            h.remove()
        op_ms = {}
        for d in desc.DESCRIPTORS:
            best = float("inf")
            for _ in range(max(3, args.repeats)):
                started = time.perf_counter()
                with torch.inference_mode():
                    for last, stage in zip(maps["last"], maps["stage"]):
                        desc.compute([d], last, stage)
                best = min(best, time.perf_counter() - started)
            op_ms[d] = 1000 * best / n
        # Bytes on disk, written as featurize writes them.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "f.h5"
            with h5py.File(path, "w") as h5:
                _create_datasets(h5, n, {name: {k: v.shape[2] for k, v in outputs.items()}}, "float16")
                for k, v in outputs.items():
                    h5[dataset_path(k, name)][...] = v.astype(np.float16)
                sizes = {k: h5[dataset_path(k, name)].id.get_storage_size() / n for k in outputs}
        for k, per_image in sizes.items():
            rows.append({"backbone": name, "output": k, "width": outputs[k].shape[2],
                         "bytes_per_image": per_image, "utkface_mib": per_image * UTKFACE_IMAGES / 2**20,
                         "op_ms": op_ms.get(k), "none_rate": rates["none"], "all_rate": rates["all"]})

    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"commit {info['commit']}, {info['date']}, load average {info['load']:.1f}; {n} UTKFace images, "
          f"{args.weights}, CPU")
    print()
    print("| backbone | output | width | stored per image (KiB) | 23,708 images (MiB) | own compute (ms/image) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        op = "-" if r["op_ms"] is None else f"{r['op_ms']:.3f}"
        print(f"| {r['backbone']} | {r['output']} | {r['width']} | {r['bytes_per_image'] / 1024:.1f} | "
              f"{r['utkface_mib']:.0f} | {op} |")
    print()
    print("| backbone | forward, no descriptors (img/s) | forward, all descriptors (img/s) | ratio |")
    print("|---|---:|---:|---:|")
    for name in args.backbones.split(","):
        r = next(r for r in rows if r["backbone"] == name)
        print(f"| {name} | {r['none_rate']:.2f} | {r['all_rate']:.2f} | {r['none_rate'] / r['all_rate']:.2f} |")


if __name__ == "__main__":
    main()
