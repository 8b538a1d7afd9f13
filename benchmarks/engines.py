"""Benchmark: the backbones' pure forward per engine and engine setting, on one decoded batch, in one process.

Compares, round after round on the same tensors (64 images x 2 views by default):
  torch                 PyTorch, channels_last, BatchNorm folded (the torch engine)
  ort-<n>t[-spin]       ONNX Runtime with n intra-op threads; -spin: idle workers busy-wait (ORT's default)
  openvino-<n>t         OpenVINO's CPU plugin on the same ONNX graph (only if `openvino` imports)
With --with-decode a thread decodes images the whole time, as featurize's decode
thread does beside the forward, so settings that fight it for the cores show.
Reports the median images/s over the rounds (an image = its 2 views) and the
largest feature difference from torch.

    python -m benchmarks.engines                       # ImageNet weights when TORCH_HOME is set
    python -m benchmarks.engines --with-decode --threads 1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from benchmarks.machine_info import machine

DEFAULT_DATA = REPO.parent / "shared" / "data" / "utkface"


def openvino_forward(path: Path, threads: int):
    import openvino as ov

    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                     "PERFORMANCE_HINT": "LATENCY",
                                                     "INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def forward(x: np.ndarray) -> dict[str, np.ndarray]:
        results = request.infer({0: x})
        return {out.get_any_name(): results[out] for out in compiled.outputs}
    return forward, ov.get_version()


def variants(backbone, args):
    """{label: callable(np.ndarray [N, 3, S, S]) -> {output: array}} for one backbone."""
    import onnxruntime as ort

    from pipeline.backbones.onnx_export import exported_model

    path, _ = exported_model(backbone, ort.__version__, log=lambda *_: None)
    found = {}
    model = backbone.to(memory_format=torch.channels_last)

    def torch_forward(x):
        with torch.inference_mode():
            return {k: v.numpy() for k, v in model(torch.from_numpy(x).contiguous(
                memory_format=torch.channels_last)).items()}
    found["torch"] = torch_forward
    for threads in args.threads:  # the engine itself uses ort-<PyTorch's thread count>t, without spinning
        for spin in (False, True):
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            names = [o.name for o in session.get_outputs()]
            found[f"ort-{threads}t{'-spin' if spin else ''}"] = (
                lambda x, s=session, n=names: dict(zip(n, s.run(n, {"views": x}))))
    try:
        for threads in args.threads:
            found[f"openvino-{threads}t"], version = openvino_forward(path, threads)
        print(f"  OpenVINO {version}", file=sys.stderr)
    except ImportError:
        print("  OpenVINO is not installed: skipped", file=sys.stderr)
    return found


def decode_forever(files, stop: threading.Event, counter: list) -> None:
    from pipeline.images.decoders import make_decoder

    decoder = make_decoder("auto", "cpu", 64)
    while not stop.is_set():
        decoder.decode(files)
        counter[0] += len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else REPO / "sample" / "utkface")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50,efficientnet_b0")
    parser.add_argument("--weights", default="IMAGENET1K_V1" if os.environ.get("TORCH_HOME") else "none")
    parser.add_argument("--threads", default=f"1,{torch.get_num_threads()}",
                        type=lambda t: sorted({int(x) for x in t.split(",")}))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--with-decode", action="store_true")
    args = parser.parse_args()

    from pipeline.backbones.registry import create_backbone, fuse_conv_bn
    from pipeline.images.decoders import make_decoder
    from pipeline.ingest.dataset import find_images

    files = [str(f) for f in find_images(args.data)[:args.images]]
    views = make_decoder("torch", "cpu", len(files)).decode(files).views
    x = np.ascontiguousarray(views.flatten(0, 1).numpy())
    stop, decoded = threading.Event(), [0]
    decoding = threading.Thread(target=decode_forever, args=(files, stop, decoded), daemon=True)
    if args.with_decode:
        decoding.start()
    rows = []
    try:
        for name in args.backbones.split(","):
            backbone = fuse_conv_bn(create_backbone(name, args.weights))
            forwards = variants(backbone, args)
            reference = forwards["torch"](x)
            rates = {label: [] for label in forwards}
            difference = {}
            for _ in range(args.rounds):  # interleaved, so load changes hit every variant alike
                for label, forward in forwards.items():
                    started = time.perf_counter()
                    out = forward(x)
                    rates[label].append(len(files) / (time.perf_counter() - started))
                    difference[label] = max(float(np.abs(out[k] - reference[k]).max()) for k in reference)
            for label in forwards:
                rows.append((name, label, statistics.median(rates[label]), difference[label]))
                print(f"  {name} {label}: {rows[-1][2]:.1f} images/s", file=sys.stderr)
    finally:
        stop.set()

    info = machine()
    print(f"\nmachine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, commit {info['commit']}, "
          f"{info['date']}, load average {info['load']:.1f}")
    print(f"{len(files)} images x 2 views from {args.data}; weights {args.weights}; median of {args.rounds} rounds"
          f"{'; a decode thread runs all the time' if args.with_decode else ''}\n")
    print("| backbone | engine | images/s | vs torch | max abs diff vs torch |")
    print("|---|---|---:|---:|---:|")
    torch_rate = {name: r for name, label, r, _ in rows if label == "torch"}
    for name, label, r, diff in rows:
        print(f"| {name} | {label} | {r:.1f} | {r / torch_rate[name]:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
