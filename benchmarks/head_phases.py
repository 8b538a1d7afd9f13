"""Benchmark: where one head's training time goes, per phase, against the measured matmul rate.

Times, on features of a given width (synthetic, of the real shape: speed does not depend on the values),
the phases of the stacked trainer's epoch one at a time over a number of steps: assembling the batches,
the forward pass (with dropout), the target's gradient, the backward pass, the Adam step, and the
validation pass; plus the once-per-run standardization and, with --pca, the fit and the projection.
Prints seconds per epoch per phase, FLOPs and GFLOP/s of the matmul phases, and the share of the
measured square-matmul rate.

    python -m benchmarks.head_phases --width 5928                  # the best recipe's MobileNetV2 input
    python -m benchmarks.head_phases --width 5928 --pca 512 --blocks 1280,488,4160
    python -m benchmarks.head_phases --width 1280 --batch-size 32  # the paper head
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.machine_info import machine
from benchmarks.train_head import UTK_ROWS, load_average, matmul_rates, synthetic
from pipeline.heads.config import HeadConfig
from pipeline.heads.model import output_width
from pipeline.heads.stack_ops import (
    Stack,
    adam_step,
    dropout_factors,
    dropout_scale,
    epoch_plan,
    keep_threshold,
)
from pipeline.heads.targets import make_target
from pipeline.heads.training import _evaluate, backward, forward_with_dropout, head_inputs


def phase_times(data, cfg: HeadConfig, steps: int) -> dict:
    """Seconds per epoch of each phase, timed over `steps` steps and scaled to the epoch's step count."""
    clock = time.perf_counter
    times = {}
    started = clock()
    train, val = head_inputs(data, cfg)
    times["inputs (standardize / PCA fit + projection), once"] = clock() - started
    n, width = train.shape[0], train.shape[2]
    table = train.reshape(2 * n, width)
    weights = torch.ones(1, data.n_classes)
    target = make_target(cfg.target, data, [cfg], weights)
    sizes = [width, *cfg.hidden, output_width(cfg.target, data.n_classes)]
    net = Stack([cfg], sizes, data.device)
    thresholds = torch.tensor([keep_threshold(cfg.dropout) - 32768], dtype=torch.int32).view(1, 1, 1)
    scale = torch.tensor([dropout_scale(cfg.dropout)]).view(1, 1, 1)
    bits = {}
    order, views = epoch_plan(net.cpu_gens[0], n, cfg.flip)
    rows = (2 * order + views).unsqueeze(0)
    grp = data.train_group[order].unsqueeze(0)
    inv = torch.full((1, n), 1.0 / cfg.batch_size)
    target.start_epoch(order.unsqueeze(0), grp, weights.gather(1, grp), inv)
    B = cfg.batch_size
    per = dict.fromkeys(["batches", "forward (with dropout)", "target gradient", "backward", "Adam"], 0.0)
    steps = min(steps, n // B)
    for step in range(steps + 1):
        lo, hi = step * B, step * B + B
        t = [clock()]
        X = table.index_select(0, rows[:, lo:hi].reshape(-1)).view(1, B, width)
        t.append(clock())
        F_ = dropout_factors(net.drop_gens, bits, 1, B, sum(cfg.hidden), thresholds, scale, X.device)
        Z, acts, masks = forward_with_dropout(net, X, sizes, F_)
        t.append(clock())
        dA = target.gradient(Z, lo, hi)
        t.append(clock())
        backward(net, acts, masks, dA)
        t.append(clock())
        for group in net.adam:
            group["step"] += 1
            adam_step(group["p"], group["g"], group["m"], group["v"], group["step"], group["lr"], group["wd"])
        t.append(clock())
        if step:  # the first step warms up
            for name, a, b in zip(per, t[:-1], t[1:]):
                per[name] += b - a
    steps_per_epoch = math.ceil(n / B)
    times.update({name: seconds / steps * steps_per_epoch for name, seconds in per.items()})
    started = clock()
    _evaluate(net.W, net.b, val, data.val_group, weights, target)
    times["validation pass"] = clock() - started
    return times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=5928, help="feature width (5928: MobileNetV2 both+stage_grid)")
    parser.add_argument("--blocks", help="block widths, comma-separated, summing to --width (for --pca)")
    parser.add_argument("--pca", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the recipe, for the totals")
    parser.add_argument("--steps", type=int, default=100, help="steps timed per phase")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = matmul_rates(torch.device("cpu"), [args.width], [args.threads])
    peak = rates[("square", args.threads)]
    data = synthetic(args.width, dict(UTK_ROWS))
    if args.blocks:
        data.blocks = tuple(int(w) for w in args.blocks.split(","))
    cfg = HeadConfig(epochs=args.epochs, batch_size=args.batch_size, standardize=True, pca=args.pca,
                     target="soft", dropout=0.5, weight_decay=1e-4, schedule="cosine")
    times = phase_times(data, cfg, args.steps)
    width = head_inputs(data, cfg)[0].shape[2]
    n, n_val = data.train.shape[0], data.val.shape[0]
    sizes = [width, *cfg.hidden, output_width(cfg.target, data.n_classes)]
    params = sum(i * o for i, o in zip(sizes[:-1], sizes[1:]))
    dx = sum(i * o for i, o in zip(sizes[1:-1], sizes[2:]))
    flops = {"forward (with dropout)": 2 * n * params, "backward": 2 * n * (params + dx),
             "validation pass": 2 * n_val * params}
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {args.threads} thread(s), "
          f"commit {info['commit']}; load average {load_average()}; square matmul {peak:.1f} GFLOP/s")
    print(f"head: input {args.width} wide -> first layer {width} wide (--pca {args.pca}), batch {args.batch_size}, "
          f"{n} training rows; per epoch unless marked once")
    print()
    print("| phase | s per epoch | share | GFLOP/s | % of matmul rate |")
    print("|---|---|---|---|---|")
    epoch_total = sum(v for k, v in times.items() if "once" not in k)
    for name, seconds in times.items():
        share = "—" if "once" in name else f"{100 * seconds / epoch_total:.0f}%"
        rate = flops.get(name, 0) / seconds / 1e9 if name in flops else None
        print(f"| {name} | {seconds:.2f} | {share} | {'—' if rate is None else f'{rate:.1f}'} "
              f"| {'—' if rate is None else f'{100 * rate / peak:.0f}%'} |")
    total = times["inputs (standardize / PCA fit + projection), once"] + args.epochs * epoch_total
    print(f"| {args.epochs} epochs, all phases | {total:.1f} | | "
          f"{args.epochs * sum(flops.values()) / total / 1e9:.1f} | "
          f"{100 * args.epochs * sum(flops.values()) / total / 1e9 / peak:.0f}% |")


if __name__ == "__main__":
    main()
