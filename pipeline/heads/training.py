"""Train heads on cached features: one recipe or a sweep, as stacked (batched) computations.

Configurations that share shapes are stacked, up to max_stack at a time, into
weights of shape [K, in, out] and trained together with a hand-written
forward/backward (torch.bmm) and PyTorch's fused Adam kernel: on a CPU,
autograd and per-module calls cost more per step than these small matmuls.
Each configuration owns its random streams (weights, batch order, flips,
dropout), seeded from its own seed, so a head trained inside a sweep equals
the head trained alone. The training target (group, soft, ordinal, age) is one
class of `targets`; every epoch, each image contributes its plain or its
mirrored cached feature with probability 0.5 (the cache's horizontal flip).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from pipeline.heads.calibration import METHODS
from pipeline.heads.calibration import fit_temperature as fit_calibration_temperature
from pipeline.heads.config import HeadConfig, HeadResult
from pipeline.heads.data import HeadData
from pipeline.heads.model import (
    age_thresholds,
    ordinal_group_probs,
    ordinal_log_probs,
    ordinal_scores,
    output_width,
)
from pipeline.heads.stack_ops import (
    Stack,
    adam_step,
    dropout_factors,
    dropout_scale,
    epoch_plan,
    keep_threshold,
    mlp_forward,
)
from pipeline.heads.targets import make_target


def choose_threads(dim: int, hidden: int = 512, candidates=None) -> int:
    """The CPU thread count that runs this head's first-layer matmul fastest right now.

    On an idle 2-core machine that is 2; when other processes keep the cores
    busy, a second thread mostly waits for its partner at every one of the
    ~5000 small matmuls, and 1 thread is several times faster. A 0.1 s probe.
    """
    before = torch.get_num_threads()
    candidates = candidates or sorted({1, before})
    x, w = torch.randn(32, dim), torch.randn(dim, hidden)
    out = torch.empty(32, hidden)
    best, best_time = before, float("inf")
    try:
        for n in candidates:
            torch.set_num_threads(n)
            torch.mm(x, w, out=out)
            for _ in range(3):
                started = time.perf_counter()
                for _ in range(10):
                    torch.mm(x, w, out=out)
                elapsed = time.perf_counter() - started
                # More threads must win clearly: their advantage is the first to vanish under load.
                if elapsed < best_time * (0.85 if n > best else 1.0):
                    best, best_time = n, elapsed
    finally:
        torch.set_num_threads(before)
    return best


def train_heads(data: HeadData, configs: list[HeadConfig], max_stack: int | None = None, keep: str = "best",
                threads: int | str | None = None, progress=None, calibrate: str = "off") -> list[HeadResult]:
    """Train every configuration; returns results in the order given.

    keep: "best" (the paper's: the epoch with the best validation accuracy,
    the earliest on ties) or "last" (the final epoch's weights).
    threads: CPU threads while training (None: leave torch's setting; "auto":
    choose_threads); restored afterwards. Results do not depend on it beyond
    float rounding.
    Configurations with the same shape_key are trained together, up to
    max_stack at a time (memory: about 5 copies of the weights per stacked head;
    None: default_max_stack for the data's device).
    progress(done, total) is called after each stack.
    calibrate: "off" or "temperature": after the kept epoch is chosen, fit each
    head's temperature on the validation split (calibration.py).
    """
    if calibrate not in METHODS:
        raise ValueError(f"calibrate must be one of {', '.join(METHODS)}, not {calibrate!r}")
    workers, intra = thread_plan(data, configs, threads)
    max_stack = max_stack or default_max_stack(data.device)
    before = torch.get_num_threads()
    try:
        if intra:
            torch.set_num_threads(intra)
        for cfg in {c.shape_key(): c for c in configs}.values():
            head_inputs(data, cfg)  # standardize / fit --pca once, with every thread, before any worker starts
        results = _train_all(data, configs, max_stack, keep, progress, workers)
        if calibrate == "temperature":
            _fit_calibration(data, results)
        return results
    finally:
        torch.set_num_threads(before)


def default_max_stack(device) -> int:
    """Heads per stacked computation: 2 on a CPU, where a stack's weights and Adam state then stay in
    cache (a 64-configuration sweep ran faster at 2 than at 16; benchmarks/RESULTS.md), 16 on a GPU."""
    return 2 if torch.device(device).type == "cpu" else 16


def thread_plan(data: HeadData, configs, threads: int | str | None = "auto") -> tuple[int, int | None]:
    """(worker threads, CPU threads per worker) for training these configurations.

    Several configurations on the CPU: one single-threaded worker per core, each
    training its own stacks; independent workers never wait for each other, unlike
    threads that split one small matmul. One configuration: `threads` for its
    matmuls ("auto": choose_threads). None leaves torch's setting alone.
    """
    if data.device.type != "cpu":
        return 1, None
    available = torch.get_num_threads()
    if len(configs) > 1:
        workers = available if threads in (None, "auto") else int(threads)
        if workers > 1:
            return workers, 1
    if threads == "auto":
        return 1, choose_threads(data.dim)
    return 1, (int(threads) if threads else None)


def stack_groups(configs, max_stack: int, workers: int) -> list[list[int]]:
    """Indices of the configurations trained together: same shape, at most max_stack, and at
    least one stack per worker where there are enough configurations."""
    by_shape: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        by_shape.setdefault(cfg.shape_key(), []).append(i)
    size = max(1, min(max_stack, math.ceil(len(configs) / workers)))
    return [members[lo:lo + size] for members in by_shape.values() for lo in range(0, len(members), size)]


def _train_all(data, configs, max_stack, keep, progress, workers):
    results: list[HeadResult | None] = [None] * len(configs)
    chunks = stack_groups(configs, max_stack, workers)
    done = 0

    def run(chunk):
        torch.set_num_threads(1)  # OpenMP's thread count is per calling thread
        return chunk, _train_stack(data, [configs[i] for i in chunk], keep)

    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=workers) as pool:
            finished = pool.map(run, chunks)
            for chunk, stack_results in finished:
                for i, result in zip(chunk, stack_results):
                    results[i] = result
                done += len(chunk)
                if progress:
                    progress(done, len(configs))
        return results
    for chunk in chunks:
        for i, result in zip(chunk, _train_stack(data, [configs[i] for i in chunk], keep)):
            results[i] = result
        done += len(chunk)
        if progress:
            progress(done, len(configs))
    return results


def _train_stack(data: HeadData, configs: list[HeadConfig], keep: str = "best") -> list[HeadResult]:
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be best or last, not {keep!r}")
    started = time.perf_counter()
    cfg0 = configs[0]
    device = data.device
    K, B = len(configs), cfg0.batch_size
    class_w = data.class_weights().to(device)
    weights = torch.stack([class_w if c.class_weights else torch.ones_like(class_w) for c in configs])  # [K, C]
    target = make_target(cfg0.target, data, configs, weights)
    train, val = head_inputs(data, cfg0)
    n, D = train.shape[0], train.shape[2]
    table = train.reshape(2 * n, D)  # row 2i: image i plain, 2i+1: mirrored
    sizes = [D, *cfg0.hidden, output_width(cfg0.target, data.n_classes)]
    net = Stack(configs, sizes, device)
    target.prepare(net)
    # Per-config dropout constants, shaped to broadcast over [K, b, h].
    thresholds16 = torch.tensor([keep_threshold(c.dropout) - 32768 for c in configs], dtype=torch.int32,
                                device=device).view(K, 1, 1)
    scale = torch.tensor([dropout_scale(c.dropout) for c in configs], device=device).view(K, 1, 1)
    dropout = (thresholds16, scale, sum(cfg0.hidden), {})  # {}: per batch size, random words for the masks

    steps_per_epoch = math.ceil(n / B)
    total_steps = steps_per_epoch * cfg0.epochs
    starts = list(range(0, n, B))
    batch_of_row = torch.arange(n, device=device) // B                                  # [n]
    batch_size_of_row = torch.tensor([min(B, n - lo) for lo in starts], device=device,
                                     dtype=torch.float32)[batch_of_row]
    progress = _Progress(configs, keep)
    for epoch in range(cfg0.epochs):
        # Everything per row that does not depend on the weights, for the whole epoch at once.
        plans = [epoch_plan(g, n, c.flip) for g, c in zip(net.cpu_gens, configs)]
        order = torch.stack([p[0] for p in plans]).to(device)                   # [K, n]
        rows = 2 * order + torch.stack([p[1] for p in plans]).to(device)        # [K, n] rows of `table`
        grp_epoch = data.train_group[order]                                     # [K, n]
        w_epoch = weights.gather(1, grp_epoch)                                  # [K, n] class weight per row
        norm = torch.zeros(K, steps_per_epoch, device=device).index_add_(1, batch_of_row, w_epoch)
        inv_norm = 1.0 / norm[:, batch_of_row]                                  # [K, n] 1 / batch weight
        target.start_epoch(order, grp_epoch, w_epoch, inv_norm)
        outputs = []
        for step, lo in enumerate(starts):
            hi = min(lo + B, n)
            X = table.index_select(0, rows[:, lo:hi].reshape(-1)).view(K, hi - lo, D)
            outputs.append(_step(net, target, X, lo, hi, sizes, dropout, epoch * steps_per_epoch + step, total_steps))

        # Training loss and accuracy of the epoch (dropout on, weights moving, as usual).
        per, pred_group, extra = target.epoch_scores(torch.cat(outputs, dim=1))
        scores = {"train_loss": ((per * batch_size_of_row).sum(1) / n).tolist(),   # mean of batch losses, by size
                 "train_acc": ((pred_group == grp_epoch).sum(1) / n).tolist(), **extra}
        # Validation: the plain view, no dropout.
        val_out = _evaluate(net.W, net.b, val, data.val_group, weights, target)
        net.keep_best(progress.record(epoch, net, scores, val_out, regression=cfg0.target == "age"))

    seconds = (time.perf_counter() - started) / K
    reduction = None
    if reduces(data, cfg0):
        fit = data.reduced(cfg0.pca)[2]
        mean, std = fit["mean"], fit["std"]
        reduction = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in fit.items()
                     if k not in ("mean", "std")}
    elif cfg0.standardize:
        mean, std = data.standardization()
    else:
        mean, std = torch.zeros(data.dim), torch.ones(data.dim)
    results = []
    for k, cfg in enumerate(configs):
        params = [(bw[k].detach().cpu().clone(), bb[k].detach().cpu().clone()) for bw, bb in net.best]
        res = HeadResult(cfg, progress.history[k], progress.best_epoch[k], params, mean.cpu().clone(),
                         std.cpu().clone(), seconds=seconds, keep=keep, diverged=progress.diverged[k],
                         reduction=reduction)
        target.finish(res)
        results.append(res)
    _final_metrics(data, results, val)
    return results


def head_inputs(data: HeadData, cfg: HeadConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train [n, 2, width], val [n_val, width]) as the configuration's first layer sees them."""
    if reduces(data, cfg):
        return data.reduced(cfg.pca)[:2]
    return data.tables(cfg.standardize)


def reduces(data: HeadData, cfg: HeadConfig) -> bool:
    """Whether --pca reduces any block of these features (a block no wider than N is fed whole)."""
    return bool(cfg.pca) and any(w > data.pca_components(cfg.pca) for w in data.block_widths)


def _step(net: Stack, target, X, lo, hi, sizes, dropout, t, total_steps) -> torch.Tensor:
    """One batch: forward with dropout, dLoss/dZ from the target, hand-written backward, Adam. Returns Z."""
    thresholds16, scale, hidden_total, bits = dropout
    K, b = X.shape[0], X.shape[1]
    F_ = dropout_factors(net.drop_gens, bits, K, b, hidden_total, thresholds16, scale, X.device)
    Z, acts, masks = forward_with_dropout(net, X, sizes, F_)
    # dLoss/dZ for the batch mean; the loss itself is computed from the stored outputs once per epoch.
    backward(net, acts, masks, target.gradient(Z, lo, hi))
    target.tie_gradient(net.gW[-1])
    for group in net.adam:
        lr = group["lr"]
        if group["schedule"] == "cosine":
            lr = lr * 0.5 * (1 + math.cos(math.pi * t / total_steps))
        group["step"] += 1
        adam_step(group["p"], group["g"], group["m"], group["v"], group["step"], lr, group["wd"])
    return Z


def forward_with_dropout(net: Stack, X, sizes, F_) -> tuple[torch.Tensor, list, list]:
    """(Z, activations, masks) of a training batch [K, b, D]; F_ [K, b, hidden total] the dropout factors.

    M_l = keep-mask * scale * relu'(H_l), so A_l = H_l * M_l and, in backward, dH_l = dA_l * M_l.
    """
    L = len(sizes) - 1
    acts, masks = [X], []
    col = 0
    for l in range(L - 1):
        h = sizes[l + 1]
        H = torch.baddbmm(net.b[l].unsqueeze(1), acts[-1], net.W[l])
        M = F_[:, :, col:col + h] * (H > 0)
        H.mul_(M)
        acts.append(H)
        masks.append(M)
        col += h
    Z = torch.baddbmm(net.b[L - 1].unsqueeze(1), acts[-1], net.W[L - 1])
    return Z, acts, masks


def backward(net: Stack, acts, masks, dA) -> None:
    """Gradients of every layer from dLoss/dZ, straight into the stack's gradient buffers."""
    for l in range(len(acts) - 1, -1, -1):
        torch.bmm(acts[l].transpose(1, 2), dA, out=net.gW[l])
        torch.sum(dA, 1, out=net.gb[l])
        if l > 0:
            dA = torch.bmm(dA, net.W[l].transpose(1, 2)).mul_(masks[l - 1])


class _Progress:
    """Per-head history, best epoch and divergence flags across the epochs of one stack."""

    def __init__(self, configs, keep: str):
        K = len(configs)
        self.configs, self.keep = configs, keep
        self.history = [[] for _ in range(K)]
        self.best_acc = [-1.0] * K
        self.best_epoch = [0] * K
        self.diverged: list[str | None] = [None] * K

    def record(self, epoch: int, net: Stack, train: dict, val_out: dict, regression: bool) -> list[int]:
        """Adds the epoch to each head's history; returns the heads whose kept weights this epoch replaces."""
        # A head whose loss or weights stopped being finite has diverged: it keeps its last finite best
        # weights, is flagged, and is never picked (the other heads of the stack are independent of it).
        finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in (*net.W, *net.b)]).all(0).tolist()
        for k, cfg in enumerate(self.configs):
            if self.diverged[k] is None and not (finite[k] and math.isfinite(train["train_loss"][k])):
                self.diverged[k] = (f"diverged in epoch {epoch + 1} (non-finite loss or weights); "
                                    f"lower --lr (was {cfg.lr:g}) or standardize the features")
        improved = []
        for k in range(len(self.configs)):
            entry = {"epoch": epoch + 1, "train_loss": train["train_loss"][k], "train_acc": train["train_acc"][k],
                     "val_loss": val_out["loss"][k], "val_acc": val_out["acc"][k]}
            if regression:
                entry["train_mae"] = train["train_mae"][k]
                entry["val_mae"] = val_out["mae"][k]
            self.history[k].append(entry)
            acc = val_out["acc"][k]
            if self.diverged[k] is None and (acc > self.best_acc[k] or self.keep == "last"):  # ties: earlier
                self.best_acc[k], self.best_epoch[k] = acc, epoch + 1
                improved.append(k)
        return improved


@torch.no_grad()
def _evaluate(W, b, x, groups, weights, target, chunk=4096):
    """Loss, accuracy and MAE (0 but for age heads) of each stacked head on [n, D] features, no dropout."""
    losses, accs, maes = [], [], []
    for k in range(len(W[0])):
        loss = correct = err = 0.0
        wsum = 0.0
        for lo in range(0, len(x), chunk):
            z = mlp_forward(W, b, x[lo:lo + chunk], k)
            y = groups[lo:lo + chunk]
            w = weights[k][y]
            per, pred, chunk_err = target.validate(z, y, w, k, lo, lo + chunk)
            err += chunk_err
            loss += float(per.sum())
            wsum += float(w.sum())
            correct += float((pred == y).sum())
        losses.append(loss / wsum)
        accs.append(correct / len(x))
        maes.append(err / len(x))
    return {"loss": losses, "acc": accs, "mae": maes}


@torch.no_grad()
def _final_metrics(data: HeadData, results: list[HeadResult], val) -> None:
    """Best-epoch validation metrics; for age heads also fit the ordinal temperature on validation.

    No test numbers here: a sweep picks on validation, and evaluate touches the test split once.
    """
    for res in results:
        W = [w.to(data.device).unsqueeze(0) for w, _ in res.params]
        b = [bb.to(data.device).unsqueeze(0) for _, bb in res.params]
        z = mlp_forward(W, b, val, 0)
        if res.config.target == "age":
            thresholds = age_thresholds(data.group_edges, data.device)
            age = z[:, 0] * res.age_scale + res.age_shift
            res.temperature = fit_temperature(age, data.val_group, thresholds)
            pred = (age.unsqueeze(1) > thresholds).sum(1)
            res.metrics["val_mae"] = float((age - data.val_age).abs().mean())
        elif res.config.target == "ordinal":
            pred = ordinal_group_probs(z).argmax(1)
        else:
            pred = z.argmax(1)
        res.metrics["val_acc"] = float((pred == data.val_group).double().mean())


@torch.no_grad()
def _fit_calibration(data: HeadData, results: list[HeadResult]) -> None:
    """Temperature scaling of each head's kept weights, fitted on the validation split.

    Every target is scaled the same way: the group scores its head's forward gives
    (logits for group/soft heads, log group probabilities for ordinal heads, the
    ordinal age scores for age heads) are divided by T. A diverged head is left alone.
    """
    for res in results:
        if res.diverged:
            continue
        _, val = head_inputs(data, res.config)
        W = [w.to(data.device).unsqueeze(0) for w, _ in res.params]
        b = [bb.to(data.device).unsqueeze(0) for _, bb in res.params]
        z = mlp_forward(W, b, val, 0)
        if res.config.target == "age":
            age = z[:, 0] * res.age_scale + res.age_shift
            scores = ordinal_scores(age, age_thresholds(data.group_edges, data.device), res.temperature)
        elif res.config.target == "ordinal":
            scores = ordinal_log_probs(z)
        else:
            scores = z
        # Rounded to float32 once here, so head.json and the head's buffer record the same number.
        temperature = float(torch.tensor(fit_calibration_temperature(scores, data.val_group), dtype=torch.float32))
        res.calibration, res.calibration_temperature = "temperature", temperature
        res.metrics["calibration_temperature"] = temperature


def fit_temperature(age_pred: torch.Tensor, groups: torch.Tensor, thresholds: torch.Tensor) -> float:
    """Temperature (years) of the ordinal group scores that minimizes validation NLL, on a log grid."""
    grid = torch.logspace(-1, 2, 61, device=age_pred.device)
    nll = [float(torch.nn.functional.cross_entropy(ordinal_scores(age_pred, thresholds, t), groups)) for t in grid]
    return float(grid[int(np.argmin(nll))])
