"""Benchmark: training heads from cached features, against the floor and a plain PyTorch loop.

In one run, on this machine:
  1. the float32 matmul rate (a large square sgemm, and the head's own [32, D] x [D, 512] shape);
  2. per backbone, the paper's recipe (10 epochs, batch 32, Adam, flip sampling, best-val epoch)
     on full-UTKFace-sized features: FLOPs, the floor at the measured matmul rate, our trainer,
     and a plain PyTorch loop (nn.Sequential + torch.optim.Adam + F.cross_entropy, index batches);
  3. a 64-configuration sweep (lr x dropout x weight decay x seed) as stacked computations;
  4. an estimate of the seed's cost for the same experiment: it reruns the frozen backbone over
     train+val every epoch; per-image forward time measured on a few random-init images.

Features are synthetic of the real shapes unless --features FILE (made by featurize) is given.
Prints a Markdown table with the machine (CPU model, cores, torch version, git commit).

    python -m benchmarks.train_head                       # ~2-3 minutes on a 2-core CPU
    python -m benchmarks.train_head --features utk.h5 --backbones mobilenet_v2
    python -m benchmarks.train_head --quick               # smaller, for a smoke test
    python -m benchmarks.train_head --profile --backbones mobilenet_v2   # time per op of one epoch
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.machine_info import machine
from pipeline.heads.config import HeadConfig, expand_grid
from pipeline.heads.data import HeadData, load_training_data
from pipeline.heads.training import train_heads

WIDTHS = {"mobilenet_v2": 1280, "resnet50": 2048, "efficientnet_b0": 1280}
# Full UTKFace: 23,708 images, 70/15/15.
UTK_ROWS = {"train": 16_596, "val": 3_556, "test": 3_556}


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def best_time(fn, repeats: int = 3, sync=lambda: None) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def matmul_rates(device, dims, thread_counts) -> dict:
    """GFLOP/s of float32 matmul at each thread count: large square, and the head's first-layer shape."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    before = torch.get_num_threads()
    rates = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        n = 2048
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        out = torch.empty(n, n, device=device)
        reps = 5 if device.type == "cpu" else 50
        torch.mm(a, b, out=out)
        square = best_time(lambda: [torch.mm(a, b, out=out) for _ in range(reps)], 3, sync) / reps
        rates[("square", threads)] = 2 * n ** 3 / square / 1e9
        for d in sorted(set(dims)):
            x, w = torch.randn(32, d, device=device), torch.randn(d, 512, device=device)
            o = torch.empty(32, 512, device=device)
            steps = 200
            t = best_time(lambda: [torch.mm(x, w, out=o) for _ in range(steps)], 3, sync) / steps
            rates[(f"[32,{d}]x[{d},512]", threads)] = 2 * 32 * d * 512 / t / 1e9
    torch.set_num_threads(before)
    return rates


# --------------------------------------------------------------------------- FLOPs


def recipe_flops(d: int, n_train: int, n_val: int, epochs: int, hidden=(512, 256), classes: int = 4) -> dict:
    """Multiply-adds x 2 the recipe cannot avoid: forward + weight gradients on every training row,
    input gradients of all but the first layer, and one forward over validation per epoch."""
    sizes = [d, *hidden, classes]
    params = sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    dx = sum(i * o for i, o in zip(sizes[1:-1], sizes[2:]))
    train = 2 * n_train * (params + params + dx)
    val = 2 * n_val * params
    return {"needed": epochs * (train + val), "six_np": epochs * 6 * n_train * params}


# --------------------------------------------------------------------------- data


def synthetic(d: int, rows: dict, seed: int = 0) -> HeadData:
    """Features of the real shape with a learnable class signal (the numbers are not UTKFace's)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(rows.values())
    groups = torch.multinomial(torch.tensor([0.32, 0.48, 0.16, 0.04]), n, replacement=True, generator=g)
    ages = torch.tensor([25, 50, 75, 116])[groups] - torch.randint(0, 25, (n,), generator=g)
    directions = torch.randn(4, d, generator=g) * 0.03
    plain = torch.randn(n, d, generator=g).abs_().add_(directions[groups])
    feats = torch.stack([plain, plain + 0.05 * torch.randn(n, d, generator=g)], dim=1)
    splits = np.array(sum(([s] * c for s, c in rows.items()), []), dtype=object)
    return HeadData.from_arrays(feats.numpy(), groups.numpy(), ages.numpy(), splits, (25, 50, 75, 116))


# --------------------------------------------------------------------------- the plain loop


def plain_loop(data: HeadData, epochs: int = 10, batch: int = 32, seed: int = 0) -> dict:
    """The recipe as one would write it in plain PyTorch (what the paper's notebook did per batch)."""
    torch.manual_seed(seed)
    device = data.device
    d = data.dim
    model = nn.Sequential(nn.Linear(d, 512), nn.ReLU(), nn.Dropout(0.3), nn.Linear(512, 256), nn.ReLU(),
                          nn.Dropout(0.3), nn.Linear(256, 4)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    n = data.train.shape[0]
    best, best_state = -1.0, None
    for _ in range(epochs):
        model.train()
        order = torch.randperm(n, device=device)
        views = torch.randint(0, 2, (n,), device=device)
        for lo in range(0, n, batch):
            idx = order[lo:lo + batch]
            x = data.train[idx, views[lo:lo + batch]]
            loss = F.cross_entropy(model(x), data.train_group[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(data.val).argmax(1) == data.val_group).float().mean().item()
        if acc > best:
            best, best_state = acc, copy.deepcopy(model.state_dict())
    return {"val_acc": best, "state": best_state}


# --------------------------------------------------------------------------- the seed's cost


def seed_forward_seconds(names, images: int = 8) -> dict:
    """Seconds per image of a frozen backbone forward (random init; timing only), batch of `images`."""
    from pipeline.backbones.registry import create_backbone

    out = {}
    x = torch.randn(images, 3, 224, 224)
    for name in names:
        model = create_backbone(name, None)
        with torch.inference_mode():
            model(x[:2])  # warm-up
            out[name] = best_time(lambda: model(x), 2) / images
        del model
    return out


# --------------------------------------------------------------------------- main


def timed(fn, sync=lambda: None):
    """(wall seconds, CPU seconds of this process, result). CPU time shows what other users' load hides."""
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def subset(data: HeadData, fraction: float) -> HeadData:
    if fraction >= 1:
        return data
    # Seeded random rows: a feature file's rows are sorted by path, i.e. by age, so a prefix is one group.
    gen = torch.Generator().manual_seed(0)
    t = torch.randperm(data.train.shape[0], generator=gen)[:int(data.train.shape[0] * fraction)]
    v = torch.randperm(data.val.shape[0], generator=gen)[:int(data.val.shape[0] * fraction)]
    return HeadData(data.train[t], data.train_group[t], data.train_age[t], data.val[v], data.val_group[v],
                    data.val_age[v], n_classes=data.n_classes, group_edges=data.group_edges)


def profile_step(data: HeadData) -> None:
    """Where a training step's time goes: one epoch of the paper's recipe under torch.profiler."""
    from torch.profiler import profile

    train_heads(data, [HeadConfig(epochs=1)])  # warm up
    with profile(record_shapes=True) as prof:
        train_heads(data, [HeadConfig(epochs=1)])
    batch = HeadConfig().batch_size
    steps = -(-data.train.shape[0] // batch)
    print(f"one epoch = {steps} steps of batch {batch}; divide an op's total by {steps} for its cost per step")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=16,
                                                             max_name_column_width=24, max_shapes_column_width=60))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=Path, help="a feature file made by featurize (default: synthetic)")
    parser.add_argument("--backbones", default="mobilenet_v2,resnet50,efficientnet_b0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sweep-configs", type=int, default=64, choices=[8, 16, 32, 64])
    parser.add_argument("--sweep-epochs", type=int, default=1)
    parser.add_argument("--sweep-rows", type=float, default=0.25,
                        help="fraction of the train/val rows the sweep uses (its rate, not its length, is the point)")
    parser.add_argument("--sweep-backbone", default="mobilenet_v2")
    parser.add_argument("--sweep-stacks", default="16,2",
                        help="max_stack values to run the sweep with (heads stacked per batched computation)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the plain PyTorch loop")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed's cost estimate")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1/4 of the rows, 8-config sweep")
    parser.add_argument("--profile", action="store_true",
                        help="only profile one epoch of the paper's recipe on the first backbone: time per op and shape")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    rows = {k: v // 4 for k, v in UTK_ROWS.items()} if args.quick else dict(UTK_ROWS)
    epochs = 2 if args.quick else args.epochs
    sweep_n = 8 if args.quick else args.sweep_configs
    stacks = [int(k) for k in args.sweep_stacks.split(",") if k.strip()]

    from pipeline.heads.training import choose_threads

    counts = sorted({1, torch.get_num_threads()}) if device.type == "cpu" else [torch.get_num_threads()]
    rates = matmul_rates(device, [WIDTHS.get(n, 1280) for n in names], counts)
    peak = max(v for (k, _), v in rates.items() if k == "square")
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        # Same thread count for ours and the plain loop: whichever runs the head's matmuls faster now.
        torch.set_num_threads(choose_threads(1280))
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['threads']} threads), "
          f"python {info['python']}, commit {info['commit']}, device {device}; load average {load_average()}",
          flush=True)
    rate_text = "; ".join(f"{k}, {t} thread(s): {v:.1f}" for (k, t), v in rates.items())
    print(f"matmul GFLOP/s: {rate_text}", flush=True)

    def get_data(name):
        if args.features:
            return load_training_data(args.features, [name], "last").data.to(device), "real"
        return synthetic(WIDTHS[name], rows).to(device), "synthetic"

    if args.profile:
        profile_step(get_data(names[0])[0])
        return

    table = []
    for name in names:
        data, source = get_data(name)
        d, n_train, n_val = data.dim, data.train.shape[0], data.val.shape[0]
        flops = recipe_flops(d, n_train, n_val, epochs)
        wall, cpu, result = timed(lambda: train_heads(data, [HeadConfig(epochs=epochs)])[0], sync)
        row = {"what": f"paper recipe, {name}", "source": source, "d": d, "rows": f"{n_train}/{n_val}",
               "tflop": flops["needed"] / 1e12, "floor": flops["needed"] / 1e9 / peak, "ours": wall, "cpu": cpu,
               "val_acc": result.metrics["val_acc"]}
        if not args.no_baseline:
            row["plain"], row["plain_cpu"], base = timed(lambda: plain_loop(data, epochs), sync)
            row["plain_val_acc"] = base["val_acc"]
        table.append(row)
        print(f"{name}: ours {wall:.2f} s (cpu {cpu:.2f} s), plain loop {row.get('plain', float('nan')):.2f} s "
              f"(cpu {row.get('plain_cpu', float('nan')):.2f} s); load {load_average()}", flush=True)
        del data

    # The sweep: lr x dropout x weight decay x seed, at each stack size.
    full, source = get_data(args.sweep_backbone)
    data = subset(full, args.sweep_rows)
    del full
    configs = expand_grid(HeadConfig(epochs=args.sweep_epochs), lr=[1e-3, 3e-4], dropout=[0.3, 0.5],
                          weight_decay=[0.0, 1e-4], seed=list(range(sweep_n // 8)))
    flops = recipe_flops(data.dim, data.train.shape[0], data.val.shape[0], args.sweep_epochs)
    for stack in stacks:
        wall, cpu, results = timed(lambda: train_heads(data, configs, max_stack=stack), sync)
        table.append({"what": f"{len(configs)}-config sweep, {args.sweep_backbone}, {args.sweep_epochs} epoch(s), "
                              f"stacks of {stack}", "source": source, "d": data.dim,
                      "rows": f"{data.train.shape[0]}/{data.val.shape[0]}",
                      "tflop": len(configs) * flops["needed"] / 1e12,
                      "floor": len(configs) * flops["needed"] / 1e9 / peak, "ours": wall, "cpu": cpu,
                      "val_acc": max(r.metrics["val_acc"] for r in results)})
        print(f"sweep, stacks of {stack}: {wall:.2f} s (cpu {cpu:.2f} s) for {len(configs)} configurations; "
              f"load {load_average()}", flush=True)
    del data

    seed_cost = {} if args.no_seed else seed_forward_seconds(names)

    print()
    print(f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads, "
          f"device {device}, commit {info['commit']}; load average at the end {load_average()} "
          f"(the machine is shared: wall times grow with other users' load; CPU time is this process's).")
    print(f"Measured float32 matmul rate (the best 2048x2048 square sgemm, used for floor and %): {peak:.1f} GFLOP/s. "
          f"All measured, GFLOP/s: {rate_text}. Training ran with {info['threads']} thread(s).")
    print()
    print("| experiment | features | D | train/val rows | TFLOP needed | floor at matmul rate (s) | ours, wall (s) "
          "| ours, CPU (s) | ours GFLOP/s | % of matmul rate | plain PyTorch loop, wall (s) | speed-up vs plain "
          "| best val acc |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        rate = r["tflop"] * 1e3 / r["ours"]
        plain = f"{r['plain']:.2f}" if "plain" in r else "—"
        speed = f"{r['plain'] / r['ours']:.1f}x" if "plain" in r else "—"
        acc = f"{r['val_acc']:.3f}" + (f" (plain {r['plain_val_acc']:.3f})" if "plain_val_acc" in r else "")
        print(f"| {r['what']} | {r['source']} | {r['d']} | {r['rows']} | {r['tflop']:.3f} | {r['floor']:.2f} "
              f"| {r['ours']:.2f} | {r['cpu']:.2f} | {rate:.1f} | {100 * rate / peak:.0f}% | {plain} | {speed} "
              f"| {acc} |")
    if seed_cost:
        n_seen = UTK_ROWS["train"] + UTK_ROWS["val"]
        print()
        print(f"Seed's cost for the same experiment (ESTIMATE): it runs the frozen backbone over train+val "
              f"({n_seen} images) every epoch, {epochs} epochs; per-image forward time measured on 8 random-init "
              f"224x224 images in one batch ({torch.get_num_threads()} threads); JPEG decoding and augmentation "
              f"not counted.")
        print()
        print("| backbone | forward s/image (measured) | seed, estimated (s) | ours, measured (s) | ratio |")
        print("|---|---|---|---|---|")
        for r, name in zip(table, names):
            est = seed_cost[name] * n_seen * epochs
            print(f"| {name} | {seed_cost[name]:.4f} | {est:,.0f} (~{est / 3600:.1f} h) | {r['ours']:.2f} "
                  f"| ~{est / r['ours']:,.0f}x |")
    print()
    print("FLOPs: per training row 2P (forward) + 2P (weight gradients) + 2x the input-gradient matmuls of all "
          "but the first layer, plus 2P per validation row per epoch; P = the head's weights. (6NP, the usual "
          "estimate, also counts the first layer's input gradient, which no one needs.) Floor = FLOPs / measured "
          "square matmul rate.")


if __name__ == "__main__":
    main()
