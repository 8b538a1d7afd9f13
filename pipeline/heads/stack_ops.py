"""The arithmetic of K heads trained side by side: stacked weights, dropout masks, Adam."""

from __future__ import annotations

import math

import torch

ADAM_BETAS = (0.9, 0.999)


ADAM_EPS = 1e-8


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

    Drawing 16 bits instead of a float per unit is several times cheaper with PyTorch's CPU generator;
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


def adam_groups(configs):
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


def dropout_factors(gens, bits, K, b, width, thresholds16, scale, device) -> torch.Tensor:
    """[K, b, width]: 0 where dropped, 1/keep where kept; each config from its own generator."""
    if b not in bits:
        bits[b] = torch.empty(K, random_words(b * width), dtype=torch.int64, device=device)
    words = bits[b]
    for k, g in enumerate(gens):
        words[k].random_(generator=g)
    keep = keep_mask(words, b * width, thresholds16.view(K, 1, 1)).reshape(K, b, width)
    return keep.to(scale.dtype).mul_(scale)


def mlp_forward(W, b, x, k):
    """Eval-mode forward of stacked head k on [n, D] (no dropout)."""
    for l in range(len(W)):
        x = torch.addmm(b[l][k], x, W[l][k])
        if l < len(W) - 1:
            x.relu_()
    return x


class Stack:
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
        for (lr, wd, schedule), ks in adam_groups(configs).items():
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
