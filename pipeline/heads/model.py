"""The head module and the arithmetic of its targets (group, soft, ordinal, age)."""

from __future__ import annotations

import torch
from torch import nn

from pipeline.heads.reduction import apply_blocks

TARGETS = ("group", "age", "soft", "ordinal")


class AgeHead(nn.Module):
    """Standardize (buffers) -> [reduce wide blocks (buffers)] -> MLP -> group scores [B, C].

    `mlp` holds only the Linear/ReLU/Dropout layers, so its parameters are
    exactly the paper's head; standardization, the optional PCA projections
    (train-head --pca; reduction.py) and the age-to-group mapping are buffers.
    reduction: [[block width, columns kept], ...] over the feature blocks in order;
    a block that keeps fewer columns than it has is projected by buffer pca_block{i}.
    """

    def __init__(self, in_dim: int, hidden=(512, 256), dropout: float = 0.3, group_edges=(25, 50, 75, 116),
                 target: str = "group", reduction=None):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
        self.target = target
        self.in_dim = int(in_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.n_classes = len(group_edges)
        self.reduction = [(int(w), int(k)) for w, k in reduction] if reduction else None
        if self.reduction and sum(w for w, _ in self.reduction) != self.in_dim:
            raise ValueError(f"reduction blocks {self.reduction} do not add up to the {self.in_dim} features")
        layers: list[nn.Module] = []
        width = sum(k for _, k in self.reduction) if self.reduction else self.in_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, output_width(target, self.n_classes)))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))
        for i, (w, k) in enumerate(self.reduction or ()):
            if k < w:
                self.register_buffer(f"pca_block{i}", torch.zeros(w, k))
        # Post-hoc temperature scaling (train-head --calibrate temperature): the group scores are divided by it.
        # 1 = uncalibrated, as every head saved before calibration existed.
        self.register_buffer("calibration_temperature", torch.ones(()))
        if target == "age":
            # Output is standardized age: years = out * age_scale + age_shift.
            self.register_buffer("age_shift", torch.zeros(()))
            self.register_buffer("age_scale", torch.ones(()))
            self.register_buffer("thresholds", age_thresholds(group_edges))
            self.register_buffer("temperature", torch.tensor(4.0))

    def _check_width(self, features: torch.Tensor) -> None:
        if features.dim() != 2 or features.shape[1] != self.in_dim:
            raise HeadMismatch(f"head expects features [B, {self.in_dim}], got {list(features.shape)}")

    def raw(self, features: torch.Tensor) -> torch.Tensor:
        """The MLP's output: logits for 'group' heads, standardized age [B, 1] for 'age' heads."""
        self._check_width(features)
        x = (features - self.feature_mean) / self.feature_std
        if self.reduction:
            x = apply_blocks(x, [w for w, _ in self.reduction], self.block_projections())
        return self.mlp(x)

    def block_projections(self) -> dict[str, torch.Tensor]:
        """{"block{i}": [width, kept]} of the blocks the head reduces (reduction.apply_blocks' names)."""
        return {f"block{i}": getattr(self, f"pca_block{i}") for i, (w, k) in enumerate(self.reduction or ()) if k < w}

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Group scores [B, C], divided by the calibration temperature: their softmax is the probabilities.

        Dividing by a positive number never changes the argmax, so calibration moves
        probabilities (and ECE), never the predicted group.
        """
        return self.uncalibrated(features) / self.calibration_temperature

    def uncalibrated(self, features: torch.Tensor) -> torch.Tensor:
        """Group scores before temperature scaling (what --calibrate fits its temperature on)."""
        out = self.raw(features)
        if self.target in ("group", "soft"):
            return out
        if self.target == "ordinal":
            return ordinal_log_probs(out)
        return self.age_to_scores(out[:, 0] * self.age_scale + self.age_shift)

    def predict_age(self, features: torch.Tensor) -> torch.Tensor | None:
        if self.target != "age":
            return None
        return self.raw(features)[:, 0] * self.age_scale + self.age_shift

    def age_to_scores(self, age: torch.Tensor) -> torch.Tensor:
        return ordinal_scores(age, self.thresholds, self.temperature)


def age_thresholds(group_edges, device=None) -> torch.Tensor:
    """Ages [C-1] that separate the groups: between group k-1 and k, halfway from the edge to the next year."""
    return torch.tensor([float(e) + 0.5 for e in group_edges[:-1]], device=device)


def ordinal_scores(age: torch.Tensor, thresholds: torch.Tensor, temperature) -> torch.Tensor:
    """Adjacent-categories scores [B, C] from ages [B] (see module docstring).

    score_k = sum_{j<k} (age - t_j) / T, centred over k (centring changes no
    softmax or argmax, but gives every class a non-zero gradient).
    """
    steps = (age.unsqueeze(-1) - thresholds) / temperature
    # zeros from `age`, not from steps[..., :1]: with a single group there are no thresholds and no steps.
    scores = torch.cat([torch.zeros_like(age).unsqueeze(-1), torch.cumsum(steps, dim=-1)], dim=-1)
    return scores - scores.mean(dim=-1, keepdim=True)


def output_width(target: str, n_classes: int) -> int:
    """The MLP's last width: C logits (group, soft), 1 age (age), C-1 cumulative logits (ordinal)."""
    return {"group": n_classes, "soft": n_classes, "age": 1, "ordinal": n_classes - 1}[target]


def soft_group_targets(ages: torch.Tensor, group_edges, sigma: float) -> torch.Tensor:
    """Soft labels [n, C] from ages [n]: a Gaussian (sigma years) over the whole years 0..last edge, summed per group.

    A 25-year-old (last year of 0-25) gets most of its mass on 0-25 and some on
    26-50; a 40-year-old almost all on 26-50. Rows sum to 1.
    """
    years = torch.arange(0, int(group_edges[-1]) + 1, dtype=torch.float32, device=ages.device)
    mass = torch.exp(-0.5 * ((years - ages.float().unsqueeze(1)) / float(sigma)) ** 2)      # [n, years]
    group_of_year = torch.bucketize(years, torch.tensor([float(e) for e in group_edges[:-1]], device=ages.device),
                                    right=False)                                            # year <= edge -> that group
    onehot = torch.nn.functional.one_hot(group_of_year, len(group_edges)).float()           # [years, C]
    summed = mass @ onehot
    return summed / summed.sum(1, keepdim=True)


def ordinal_group_probs(cumulative_logits: torch.Tensor) -> torch.Tensor:
    """[B, C-1] logits of P(group > j) -> [B, C] group probabilities P(>k-1) - P(>k) (CORAL's model).

    With CORAL's shared weights and non-increasing biases the differences are
    never negative; they are clamped at 0 and renormalized in case they are.
    """
    above = torch.sigmoid(cumulative_logits.float())
    ones, zeros = torch.ones_like(above[:, :1]), torch.zeros_like(above[:, :1])
    probs = (torch.cat([ones, above], 1) - torch.cat([above, zeros], 1)).clamp_min(0)
    return probs / probs.sum(1, keepdim=True).clamp_min(1e-12)


def ordinal_log_probs(cumulative_logits: torch.Tensor) -> torch.Tensor:
    """Group scores of an ordinal head: log of ordinal_group_probs (softmax of them gives the probabilities back)."""
    return torch.log(ordinal_group_probs(cumulative_logits).clamp_min(1e-12))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class HeadMismatch(ValueError):
    """A head was asked to score features it was not trained on."""
