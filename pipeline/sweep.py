"""Train heads on cached features: one recipe or a sweep, as stacked (batched) computations.

Every run, single or sweep, goes through `train_heads`. Configurations that
share shapes (hidden sizes, batch size, epochs, target, standardization) are
stacked, up to max_stack at a time, into weights of shape [K, in, out] and
trained together: torch.bmm with a hand-written forward/backward of the MLP,
and PyTorch's fused Adam kernel over all stacked parameters. On a 2-core CPU
autograd, nn.Module calls and DataLoader cost more per step than the tiny
matmuls themselves; this loop issues about 30 kernel calls per step, whatever
K is, and draws each epoch's batch order, flips and targets in one go.

CPU threads: several configurations train in one single-threaded worker per
core (workers never wait for each other); a single configuration uses the
thread count that runs its matmuls fastest right now (see choose_threads).

Each configuration owns its random streams (initial weights, batch order,
flip choices, dropout masks), seeded from its own seed, so a configuration
trained inside a sweep gets the same weights as when trained alone, and a
seed gives the same head on the CPU every time.

Augmentation: every epoch, each image contributes its plain or its mirrored
cached feature with probability 0.5 (the cache's RandomHorizontalFlip).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

from .calibration import METHODS
from .calibration import fit_temperature as fit_calibration_temperature
from .constants import PAPER_HEAD, group_names
from .heads import (TARGETS, AgeHead, HeadData, age_thresholds, ordinal_group_probs, ordinal_log_probs,
                    ordinal_scores, output_width, soft_group_targets)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
HUBER_YEARS = 2.0   # age loss is quadratic within 2 years of the truth, linear beyond


@dataclass(frozen=True)
class HeadConfig:
    """One training recipe. Defaults are the paper's (constants.PAPER_HEAD)."""
    lr: float = PAPER_HEAD["lr"]
    epochs: int = PAPER_HEAD["epochs"]
    batch_size: int = PAPER_HEAD["batch_size"]
    dropout: float = PAPER_HEAD["dropout"]
    hidden: tuple[int, ...] = PAPER_HEAD["hidden"]
    weight_decay: float = 0.0          # decoupled (AdamW); 0 = the paper's plain Adam
    schedule: str = "constant"         # or "cosine" (per step, to 0 at the end)
    label_smoothing: float = 0.0
    class_weights: bool = False        # loss weights n / (C * count_c) from the training split
    standardize: bool = False          # z-score features with training-split statistics
    flip: bool = True                  # plain or mirrored view, p = 0.5, every epoch
    target: str = "group"              # or "age" (regression in years, groups derived), "soft", "ordinal"
    seed: int = 0
    soft_sigma: float = 3.0            # years: width of the Gaussian behind the soft targets (target "soft")

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be constant or cosine, not {self.schedule!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {self.target!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label smoothing must be in [0, 1), not {self.label_smoothing}")
        if self.target != "group" and self.label_smoothing:
            raise ValueError("label smoothing applies to the group target only")
        if not (math.isfinite(self.soft_sigma) and self.soft_sigma > 0):
            raise ValueError(f"soft sigma (--soft-sigma) must be a number of years above 0, not {self.soft_sigma}")
        # Each problem names its field (and the option that sets it); NaN fails every comparison, so check it first.
        for name in ("lr", "dropout", "weight_decay", "label_smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name.replace('_', ' ')} (--{name.replace('_', '-')}) must be a finite number, "
                                 f"not {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr (--lr) must be above 0, not {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight decay (--weight-decay) must be 0 or more, not {self.weight_decay}")
        if self.epochs < 1:
            raise ValueError(f"epochs (--epochs) must be at least 1, not {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch size (--batch-size) must be at least 1, not {self.batch_size}")
        if not self.hidden:
            raise ValueError("hidden (--hidden) needs at least one layer width")

    def shape_key(self):
        """Configurations with equal keys can be trained as one stacked computation."""
        return (self.hidden, self.batch_size, self.epochs, self.target, self.standardize)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def expand_grid(base: HeadConfig | None = None, **lists) -> list[HeadConfig]:
    """Every combination of the list-valued options, in a stable order."""
    base = base or HeadConfig()
    names = list(lists)
    return [replace(base, **dict(zip(names, values))) for values in itertools.product(*(lists[n] for n in names))]


# --------------------------------------------------------------------------- results


@dataclass
class HeadResult:
    config: HeadConfig
    history: list[dict]
    best_epoch: int
    params: list[tuple[torch.Tensor, torch.Tensor]]   # per layer (W [in, out], b [out]) of the best epoch, CPU
    feature_mean: torch.Tensor
    feature_std: torch.Tensor
    age_shift: float = 0.0
    age_scale: float = 1.0
    temperature: float = 4.0
    metrics: dict = field(default_factory=dict)
    seconds: float = 0.0
    keep: str = "best"
    diverged: str | None = None   # why training stopped making sense (non-finite loss or weights), else None
    calibration: str = "off"              # or "temperature": post-hoc scaling fitted on validation
    calibration_temperature: float = 1.0  # the group scores are divided by it (1 = uncalibrated)

    def to_head(self, group_edges) -> AgeHead:
        cfg = self.config
        head = AgeHead(self.params[0][0].shape[0], cfg.hidden, cfg.dropout, group_edges, cfg.target)
        linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for linear, (w, b) in zip(linears, self.params):
                linear.weight.copy_(w.t())
                linear.bias.copy_(b)
            head.feature_mean.copy_(self.feature_mean)
            head.feature_std.copy_(self.feature_std)
            head.calibration_temperature.fill_(self.calibration_temperature)
            if cfg.target == "age":
                head.age_shift.fill_(self.age_shift)
                head.age_scale.fill_(self.age_scale)
                head.temperature.fill_(self.temperature)
        return head.eval()

    def row(self) -> dict:
        """One line of the results table."""
        best = self.history[self.best_epoch - 1]
        row = {**{k: v for k, v in self.config.as_dict().items()}, "hidden": "x".join(map(str, self.config.hidden)),
               "best_epoch": self.best_epoch, "val_acc": best["val_acc"], "val_loss": best["val_loss"],
               "train_acc": best["train_acc"], **self.metrics, "seconds": round(self.seconds, 3)}
        if "val_mae" in best:
            row["val_mae"] = best["val_mae"]
        return row


# --------------------------------------------------------------------------- random streams


def init_params(generator: torch.Generator, sizes) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), stored as W [in, out], b [out]."""
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        w = torch.empty(fan_in, fan_out).uniform_(-bound, bound, generator=generator)
        b = torch.empty(fan_out).uniform_(-bound, bound, generator=generator)
        params.append((w, b))
    return params


def epoch_plan(generator: torch.Generator, n: int, flip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(order of the training rows, view of each position: 0 plain, 1 mirrored) for one epoch."""
    order = torch.randperm(n, generator=generator)
    views = torch.randint(0, 2, (n,), generator=generator) if flip else torch.zeros(n, dtype=torch.int64)
    return order, views


def keep_threshold(p: float) -> int:
    """Dropout keeps a unit when a uniform 16-bit number is below this: keep probability rounded to 1/65536.

    Drawing 16 bits instead of a float per unit is ~3x cheaper with PyTorch's CPU generator;
    the scale 1/keep uses the rounded probability, so the expected activation is exact.
    """
    return max(1, round((1.0 - p) * 65536))


def dropout_scale(p: float) -> float:
    return 65536 / keep_threshold(p)


def random_words(count: int) -> int:
    """Random 63-bit words for `count` dropout decisions: three full 16-bit lanes in each."""
    return -(-count // 3)


def keep_mask(words: torch.Tensor, count: int, threshold16: torch.Tensor) -> torch.Tensor:
    """[..., n_words] int64 random words -> [..., count] bool: lane value (signed 16-bit) < threshold16.

    threshold16 = keep_threshold(p) - 32768 as an int32 tensor (broadcast over leading dims).
    """
    if threshold16.dim() == 0:  # a 0-dim tensor would be cast to int16, and 32768 (p = 0) would wrap
        threshold16 = threshold16.reshape(1)
    n_words = words.shape[-1]
    lanes = words.view(torch.int16).reshape(*words.shape[:-1], n_words, 4)[..., :3]  # lane 3's top bit is 0
    return (lanes < threshold16).reshape(*words.shape[:-1], 3 * n_words)[..., :count]


def dropout_keep(generator: torch.Generator, b: int, width: int, p: float) -> torch.Tensor:
    """One config's keep mask [b, width] for one step, exactly as the trainer draws it."""
    words = torch.empty(random_words(b * width), dtype=torch.int64, device=generator.device)
    words.random_(generator=generator)
    threshold = torch.tensor(keep_threshold(p) - 32768, dtype=torch.int32, device=generator.device)
    return keep_mask(words, b * width, threshold).reshape(b, width)


def dropout_generator(seed: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + 7919)  # a stream apart from the CPU one that orders batches
    return g


# --------------------------------------------------------------------------- Adam


def _adam_groups(configs):
    """Indices of configurations that share (lr, weight_decay, schedule): one fused call each per step."""
    groups: dict[tuple, list[int]] = {}
    for k, cfg in enumerate(configs):
        groups.setdefault((cfg.lr, cfg.weight_decay, cfg.schedule), []).append(k)
    return groups


def adam_step(params, grads, exp_avg, exp_avg_sq, step: torch.Tensor, lr: float, weight_decay: float) -> None:
    """One Adam (weight_decay 0) or AdamW step, same math as torch.optim's, fused into one pass where possible."""
    steps = [step] * len(params)
    fused = torch._fused_adamw_ if weight_decay else torch._fused_adam_
    fused(params, grads, exp_avg, exp_avg_sq, [], steps, lr=lr, beta1=ADAM_BETAS[0], beta2=ADAM_BETAS[1],
          weight_decay=weight_decay, eps=ADAM_EPS, amsgrad=False, maximize=False)


# --------------------------------------------------------------------------- training


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


def train_heads(data: HeadData, configs: list[HeadConfig], max_stack: int = 16, keep: str = "best",
                threads: int | str | None = None, progress=None, calibrate: str = "off") -> list[HeadResult]:
    """Train every configuration; returns results in the order given.

    keep: "best" (the paper's: the epoch with the best validation accuracy,
    the earliest on ties) or "last" (the final epoch's weights).
    threads: CPU threads while training (None: leave torch's setting; "auto":
    choose_threads); restored afterwards. Results do not depend on it beyond
    float rounding.
    Configurations with the same shape_key are trained together, up to
    max_stack at a time (memory: about 5 copies of the weights per stacked head).
    progress(done, total) is called after each stack.
    calibrate: "off" or "temperature": after the kept epoch is chosen, fit each
    head's temperature on the validation split (calibration.py).
    """
    if calibrate not in METHODS:
        raise ValueError(f"calibrate must be one of {', '.join(METHODS)}, not {calibrate!r}")
    workers, intra = thread_plan(data, configs, threads)
    before = torch.get_num_threads()
    try:
        if intra:
            torch.set_num_threads(intra)
        results = _train_all(data, configs, max_stack, keep, progress, workers)
        if calibrate == "temperature":
            _fit_calibration(data, results)
        return results
    finally:
        torch.set_num_threads(before)


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


def _chunks(configs, max_stack: int, workers: int) -> list[list[int]]:
    """Indices of the configurations trained together: same shape, at most max_stack, and at
    least one stack per worker where there are enough configurations."""
    by_shape: dict[tuple, list[int]] = {}
    for i, cfg in enumerate(configs):
        by_shape.setdefault(cfg.shape_key(), []).append(i)
    size = max(1, min(max_stack, math.ceil(len(configs) / workers)))
    return [members[lo:lo + size] for members in by_shape.values() for lo in range(0, len(members), size)]


def _train_all(data, configs, max_stack, keep, progress, workers):
    results: list[HeadResult | None] = [None] * len(configs)
    chunks = _chunks(configs, max_stack, workers)
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


class _Stack:
    """K heads of one shape, as stacked tensors, with their optimizer state."""

    def __init__(self, configs, sizes, device):
        self.k = len(configs)
        self.sizes = sizes
        inits = []
        self.cpu_gens = []
        for cfg in configs:
            g = torch.Generator().manual_seed(cfg.seed)
            inits.append(init_params(g, sizes))
            self.cpu_gens.append(g)
        self.drop_gens = [dropout_generator(cfg.seed, device) for cfg in configs]
        n_layers = len(sizes) - 1
        self.W = [torch.stack([init[l][0] for init in inits]).to(device) for l in range(n_layers)]
        self.b = [torch.stack([init[l][1] for init in inits]).to(device) for l in range(n_layers)]
        self.gW = [torch.zeros_like(w) for w in self.W]
        self.gb = [torch.zeros_like(b) for b in self.b]
        state = lambda ts: [torch.zeros_like(t) for t in ts]  # noqa: E731
        self.mW, self.mb, self.vW, self.vb = state(self.W), state(self.b), state(self.W), state(self.b)
        self.best = [(w.clone(), b.clone()) for w, b in zip(self.W, self.b)]
        # Per Adam group: lists of per-config views (contiguous slices of the stacks).
        self.adam = []
        for (lr, wd, schedule), ks in _adam_groups(configs).items():
            pick = lambda ws, bs: [t[k] for k in ks for t in (*ws, *bs)]  # noqa: E731
            self.adam.append(dict(lr=lr, wd=wd, schedule=schedule,
                                  p=pick(self.W, self.b), g=pick(self.gW, self.gb),
                                  m=pick(self.mW, self.mb), v=pick(self.vW, self.vb),
                                  step=torch.zeros((), dtype=torch.float32, device=device)))

    def keep_best(self, improved: list[int]) -> None:
        for (bw, bb), w, b in zip(self.best, self.W, self.b):
            for k in improved:
                bw[k].copy_(w[k])
                bb[k].copy_(b[k])


def _train_stack(data: HeadData, configs: list[HeadConfig], keep: str = "best") -> list[HeadResult]:
    if keep not in ("best", "last"):
        raise ValueError(f"keep must be best or last, not {keep!r}")
    started = time.perf_counter()
    cfg0 = configs[0]
    device = data.device
    K, B, C = len(configs), cfg0.batch_size, data.n_classes
    regression = cfg0.target == "age"
    ordinal = cfg0.target == "ordinal"
    if cfg0.target in AGE_TARGETS and bool((data.train_age < 0).any() or (data.val_age < 0).any()):
        raise ValueError(missing_ages_message(cfg0.target))
    train, val = data.tables(cfg0.standardize)
    n, D = train.shape[0], train.shape[2]
    table = train.reshape(2 * n, D)  # row 2i: image i plain, 2i+1: mirrored
    sizes = [D, *cfg0.hidden, output_width(cfg0.target, C)]
    L = len(sizes) - 1
    hidden_total = sum(cfg0.hidden)
    net = _Stack(configs, sizes, device)
    if ordinal:
        _init_coral(net, data)

    # Per-config constants, shaped to broadcast over [K, b, h].
    thresholds16 = torch.tensor([keep_threshold(c.dropout) - 32768 for c in configs], dtype=torch.int32,
                                device=device).view(K, 1, 1)
    scale = torch.tensor([dropout_scale(c.dropout) for c in configs], device=device).view(K, 1, 1)
    class_w = data.class_weights().to(device)
    weights = torch.stack([class_w if c.class_weights else torch.ones_like(class_w) for c in configs])  # [K, C]
    if regression:
        age_shift = float(data.train_age.mean())
        age_scale = float(data.train_age.std().clamp_min(1.0))
        target_all = (data.train_age - age_shift) / age_scale   # [n]
        beta = HUBER_YEARS / age_scale
        thresholds = age_thresholds(data.group_edges, device)
    elif ordinal:
        # CORAL: binary cross-entropy of each cumulative logit z_j against [group > j], summed over j,
        # class-weighted per row and averaged over the batch as cross-entropy is. dLoss/dz_j = sigmoid(z_j) - t_j.
        above_all = (data.train_group.unsqueeze(1) > torch.arange(C - 1, device=device)).float()   # [n, C-1]
        soft_val = None
        T = None
    else:
        # Cross-entropy with class weights w and label smoothing e, as torch's:
        # loss_i = -sum_c T[y_i, c] log p_ic, T[y, c] = (1-e) w_y [y=c] + e w_c / C,
        # divided by sum_i w_{y_i}. Its gradient is (sum_c T[y_i, c]) p_i - T[y_i].
        eps = torch.tensor([c.label_smoothing for c in configs], device=device).view(K, 1, 1)
        eye = torch.eye(C, device=device)
        T = (1 - eps) * weights.unsqueeze(2) * eye + eps * weights.unsqueeze(1) / C     # [K, y, c]
        # Soft targets replace the one-hot row by the age's soft label (class weight of the true group kept):
        # T_i = w_{y_i} q_i, so the gradient keeps the same form, (sum_c T_ic) p_i - T_i.
        soft_rows = soft_val = None
        if cfg0.target == "soft":
            soft_rows = torch.stack([soft_group_targets(data.train_age, data.group_edges, c.soft_sigma)
                                     for c in configs])                                # [K, n, C]
            soft_val = torch.stack([soft_group_targets(data.val_age, data.group_edges, c.soft_sigma)
                                    for c in configs])                                 # [K, n_val, C]

    steps_per_epoch = math.ceil(n / B)
    total_steps = steps_per_epoch * cfg0.epochs
    starts = list(range(0, n, B))
    batch_of_row = torch.arange(n, device=device) // B                                  # [n]
    batch_size_of_row = torch.tensor([min(B, n - lo) for lo in starts], device=device,
                                     dtype=torch.float32)[batch_of_row]
    bits = {}  # per batch size: random words for the dropout masks

    history = [[] for _ in range(K)]
    best_acc = [-1.0] * K
    best_epoch = [0] * K
    diverged: list[str | None] = [None] * K
    ar = torch.arange(K, device=device).view(K, 1)
    for epoch in range(cfg0.epochs):
        # Everything per row that does not depend on the weights, for the whole epoch at once.
        plans = [epoch_plan(g, n, c.flip) for g, c in zip(net.cpu_gens, configs)]
        order = torch.stack([p[0] for p in plans]).to(device)                   # [K, n]
        rows = 2 * order + torch.stack([p[1] for p in plans]).to(device)        # [K, n] rows of `table`
        grp_epoch = data.train_group[order]                                     # [K, n]
        w_epoch = weights.gather(1, grp_epoch)                                  # [K, n] class weight per row
        norm = torch.zeros(K, steps_per_epoch, device=device).index_add_(1, batch_of_row, w_epoch)
        inv_norm = 1.0 / norm[:, batch_of_row]                                  # [K, n] 1 / batch weight
        if regression:
            tgt_epoch = target_all[order]                                       # [K, n]
            w_over = (w_epoch * inv_norm / beta).unsqueeze(2)                   # [K, n, 1]
        elif ordinal:
            above_epoch = above_all[order]                                      # [K, n, C-1]
            w_row = (w_epoch * inv_norm).unsqueeze(2)                           # [K, n, 1]
        else:
            if soft_rows is not None:
                T_epoch = soft_rows[ar, order] * (w_epoch * inv_norm).unsqueeze(2)
            else:
                T_epoch = T[ar, grp_epoch] * inv_norm.unsqueeze(2)              # [K, n, C], batch-normalized
            s_epoch = T_epoch.sum(2, keepdim=True)                              # [K, n, 1]
        outputs = []
        for step, lo in enumerate(starts):
            hi = min(lo + B, n)
            b = hi - lo
            X = table.index_select(0, rows[:, lo:hi].reshape(-1)).view(K, b, D)
            F_ = _dropout_factors(net.drop_gens, bits, K, b, hidden_total, thresholds16, scale, device)
            # Forward. M_l = keep-mask * scale * relu'(H_l), so A_l = H_l * M_l and dH_l = dA_l * M_l.
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
            outputs.append(Z)
            # dLoss/dZ for the batch mean (class-weighted as torch does); the loss itself is
            # computed from the stored outputs once per epoch.
            if regression:
                dZ = (Z - tgt_epoch[:, lo:hi].unsqueeze(2)).clamp_(-beta, beta).mul_(w_over[:, lo:hi])
            elif ordinal:
                dZ = torch.sigmoid(Z).sub_(above_epoch[:, lo:hi]).mul_(w_row[:, lo:hi])
            else:
                dZ = torch.softmax(Z, dim=2).mul_(s_epoch[:, lo:hi]).sub_(T_epoch[:, lo:hi])
            # Backward, straight into the gradient buffers.
            dA = dZ
            for l in range(L - 1, -1, -1):
                torch.bmm(acts[l].transpose(1, 2), dA, out=net.gW[l])
                torch.sum(dA, 1, out=net.gb[l])
                if l > 0:
                    dA = torch.bmm(dA, net.W[l].transpose(1, 2)).mul_(masks[l - 1])
            if ordinal:
                _tie_coral_gradient(net.gW[L - 1])
            t = epoch * steps_per_epoch + step
            for group in net.adam:
                lr = group["lr"]
                if group["schedule"] == "cosine":
                    lr = lr * 0.5 * (1 + math.cos(math.pi * t / total_steps))
                group["step"] += 1
                adam_step(group["p"], group["g"], group["m"], group["v"], group["step"], lr, group["wd"])

        # Training loss and accuracy of the epoch (dropout on, weights moving, as usual).
        Z = torch.cat(outputs, dim=1)                                           # [K, n, out]
        if regression:
            r = Z[:, :, 0] - tgt_epoch
            per = _huber(r, beta) * w_epoch * inv_norm                          # batch-mean terms
            pred_group = ((Z[:, :, 0] * age_scale + age_shift).unsqueeze(2) > thresholds).sum(2)
            train_mae = ((r.abs() * age_scale).sum(1) / n).tolist()
        elif ordinal:
            per = _coral_loss(Z, above_epoch) * w_epoch * inv_norm
            pred_group = ordinal_group_probs(Z.reshape(K * n, -1)).reshape(K, n, C).argmax(2)
        else:
            per = -(T_epoch * torch.log_softmax(Z, dim=2)).sum(2)
            pred_group = Z.argmax(2)
        train_loss = ((per * batch_size_of_row).sum(1) / n).tolist()           # mean of batch losses, by size
        train_acc = ((pred_group == grp_epoch).sum(1) / n).tolist()
        # Validation: the plain view, no dropout.
        val_out = _evaluate(net.W, net.b, val, data.val_group, data.val_age, configs, weights,
                            (age_shift, age_scale, beta, thresholds) if regression else None,
                            None if regression else T, soft_val=None if regression else soft_val, ordinal=ordinal)
        improved = []
        # A head whose loss or weights stopped being finite has diverged: it keeps its last finite best
        # weights, is flagged, and is never picked (the other heads of the stack are independent of it).
        finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in (*net.W, *net.b)]).all(0).tolist()
        for k in range(K):
            if diverged[k] is None and not (finite[k] and math.isfinite(train_loss[k])):
                diverged[k] = (f"diverged in epoch {epoch + 1} (non-finite loss or weights); "
                               f"lower --lr (was {configs[k].lr:g}) or standardize the features")
        for k in range(K):
            entry = {"epoch": epoch + 1, "train_loss": train_loss[k], "train_acc": train_acc[k],
                     "val_loss": val_out["loss"][k], "val_acc": val_out["acc"][k]}
            if regression:
                entry["train_mae"] = train_mae[k]
                entry["val_mae"] = val_out["mae"][k]
            history[k].append(entry)
            if diverged[k] is None and (val_out["acc"][k] > best_acc[k] or keep == "last"):  # ties: earlier
                best_acc[k], best_epoch[k] = val_out["acc"][k], epoch + 1
                improved.append(k)
        net.keep_best(improved)

    seconds = (time.perf_counter() - started) / K
    mean, std = data.standardization() if cfg0.standardize else (torch.zeros(D), torch.ones(D))
    results = []
    for k, cfg in enumerate(configs):
        params = [(bw[k].detach().cpu().clone(), bb[k].detach().cpu().clone()) for bw, bb in net.best]
        res = HeadResult(cfg, history[k], best_epoch[k], params, mean.cpu().clone(), std.cpu().clone(),
                         seconds=seconds, keep=keep, diverged=diverged[k])
        if regression:
            res.age_shift, res.age_scale = age_shift, age_scale
        results.append(res)
    _final_metrics(data, results, val)
    return results


def _init_coral(net: "_Stack", data: HeadData) -> None:
    """CORAL's last layer: one weight column shared by the C-1 cumulative logits, biases from the training prevalence.

    The shared column is kept shared by giving every column the same (summed)
    gradient (_tie_coral_gradient): equal values, equal gradients and equal Adam
    state stay equal. Starting the biases at logit P(group > j) makes them
    non-increasing from the first step, which CORAL's rank consistency needs.
    """
    C = data.n_classes
    W, b = net.W[-1], net.b[-1]
    with torch.no_grad():
        W.copy_(W[:, :, :1].expand_as(W))
        above = (data.train_group.unsqueeze(1) > torch.arange(C - 1, device=W.device)).float().mean(0)
        b.copy_(torch.logit(above.clamp(1e-4, 1 - 1e-4)).expand_as(b))
        for (bw, bb), w, bias in zip(net.best, net.W, net.b):
            bw.copy_(w)
            bb.copy_(bias)


def _tie_coral_gradient(grad_w: torch.Tensor) -> None:
    """[K, h, C-1] per-column gradients -> each column the sum: the gradient of the one shared weight vector."""
    grad_w.copy_(grad_w.sum(2, keepdim=True).expand_as(grad_w))


def _coral_loss(z: torch.Tensor, above: torch.Tensor) -> torch.Tensor:
    """Per row: sum over j of the binary cross-entropy of logit z_j against [group > j]."""
    return torch.nn.functional.binary_cross_entropy_with_logits(z, above, reduction="none").sum(-1)


def _huber(r: torch.Tensor, beta: float) -> torch.Tensor:
    a = r.abs()
    return torch.where(a < beta, 0.5 * r * r / beta, a - 0.5 * beta)


def _dropout_factors(gens, bits, K, b, width, thresholds16, scale, device) -> torch.Tensor:
    """[K, b, width]: 0 where dropped, 1/keep where kept; each config from its own generator."""
    if b not in bits:
        bits[b] = torch.empty(K, random_words(b * width), dtype=torch.int64, device=device)
    words = bits[b]
    for k, g in enumerate(gens):
        words[k].random_(generator=g)
    keep = keep_mask(words, b * width, thresholds16.view(K, 1, 1)).reshape(K, b, width)
    return keep.to(scale.dtype).mul_(scale)


def _mlp(W, b, x, k):
    """Eval-mode forward of stacked head k on [n, D] (no dropout)."""
    for l in range(len(W)):
        x = torch.addmm(b[l][k], x, W[l][k])
        if l < len(W) - 1:
            x.relu_()
    return x


@torch.no_grad()
def _evaluate(W, b, x, groups, ages, configs, weights, age_info, T, chunk=4096, soft_val=None, ordinal=False):
    """Loss, accuracy (and MAE for age heads) of each stacked head on [n, D] features, no dropout.

    soft_val: [K, n, C] soft labels of these rows (soft heads); ordinal: CORAL heads (C-1 cumulative logits).
    """
    regression = age_info is not None
    losses, accs, maes = [], [], []
    for k, cfg in enumerate(configs):
        loss = correct = err = 0.0
        wsum = 0.0
        for lo in range(0, len(x), chunk):
            z = _mlp(W, b, x[lo:lo + chunk], k)
            y = groups[lo:lo + chunk]
            w = weights[k][y]
            if regression:
                shift, scale, beta, thresholds = age_info
                r = z[:, 0] - (ages[lo:lo + chunk] - shift) / scale
                per = _huber(r, beta) * w
                pred = ((z[:, 0] * scale + shift).unsqueeze(1) > thresholds).sum(1)
                err += float((r.abs() * scale).sum())
            elif ordinal:
                above = (y.unsqueeze(1) > torch.arange(z.shape[1], device=z.device)).float()
                per = _coral_loss(z, above) * w
                pred = ordinal_group_probs(z).argmax(1)
            elif soft_val is not None:
                per = -(soft_val[k][lo:lo + chunk] * torch.log_softmax(z, dim=1)).sum(1) * w
                pred = z.argmax(1)
            else:
                logp = torch.log_softmax(z, dim=1)
                per = -(T[k][y] * logp).sum(1)   # class weights are inside T
                pred = z.argmax(1)
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
        z = _mlp(W, b, val, 0)
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
        _, val = data.tables(res.config.standardize)
        W = [w.to(data.device).unsqueeze(0) for w, _ in res.params]
        b = [bb.to(data.device).unsqueeze(0) for _, bb in res.params]
        z = _mlp(W, b, val, 0)
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


AGE_TARGETS = ("age", "soft")   # targets computed from the age in years, not only the group


def missing_ages_message(target: str) -> str:
    """labels.AGE_UNKNOWN (-1): a labels file or class folder gave only the group of some rows."""
    return (f"--target {target} needs an age for every train and val row; this file has rows labelled with a "
            f"group only (stored age -1, from a 'group' label column or a range folder)")


def fit_temperature(age_pred: torch.Tensor, groups: torch.Tensor, thresholds: torch.Tensor) -> float:
    """Temperature (years) of the ordinal group scores that minimizes validation NLL, on a log grid."""
    grid = torch.logspace(-1, 2, 61, device=age_pred.device)
    nll = [float(torch.nn.functional.cross_entropy(ordinal_scores(age_pred, thresholds, t), groups)) for t in grid]
    return float(grid[int(np.argmin(nll))])


def result_meta(loaded, result: HeadResult, split_file=None, rank: int = 1, n_configs: int = 1,
                recipe: str | None = None) -> dict:
    """The checkpoint meta of a trained head (see heads module docstring).

    recipe: the train-head --recipe the options started from (recipes.py), recorded in config.
    """
    settings = loaded.settings
    config = {**result.config.as_dict(), "recipe": recipe, "split_file": str(split_file) if split_file else None,
              "optimizer": "adamw" if result.config.weight_decay else "adam",
              "adam_betas": list(ADAM_BETAS), "adam_eps": ADAM_EPS,
              "loss": {"age": "huber", "soft": "soft_cross_entropy", "ordinal": "coral_binary_cross_entropy"}.get(
                  result.config.target, "cross_entropy"),
              "huber_years": HUBER_YEARS if result.config.target == "age" else None,
              "keep": result.keep, "selection": ("best validation accuracy (earliest on ties)"
                                                 if result.keep == "best" else "last epoch")}
    return {
        "backbones": list(loaded.backbones),
        "weights": {name: settings["weights"][name] for name in loaded.backbones},
        "feature_kind": loaded.feature_kind,
        "group_edges": list(loaded.group_edges),
        "class_names": group_names(loaded.group_edges),
        "target": result.config.target,
        "feature_fingerprint": settings["fingerprint"],
        "rows_fingerprint": loaded.rows_fingerprint,
        "feature_file": os.path.abspath(loaded.feature_file),  # absolute: evaluate may run from another folder
        "preprocessing": settings.get("preprocessing"),
        "faces": settings.get("faces"),  # face handling of the training features (None: whole aligned crops)
        "compute": settings.get("compute"),  # how the training features were computed (provenance.py)
        "feature_dim": int(result.params[0][0].shape[0]),
        "hidden": list(result.config.hidden),
        "config": config,
        "rows": loaded.counts,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "metrics": result.metrics,
        "temperature": result.temperature if result.config.target == "age" else None,
        # Post-hoc temperature scaling; heads.load_checkpoint checks it against the head's own buffer.
        "calibration": {"method": result.calibration, "temperature": result.calibration_temperature,
                        "fitted_on": "val" if result.calibration != "off" else None,
                        "objective": "validation NLL of softmax(group scores / T)"
                        if result.calibration != "off" else None},
        "sweep": {"rank": rank, "configurations": n_configs},
        "versions": {"torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
