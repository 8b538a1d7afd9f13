"""One head's training configuration, the grid a sweep expands, and one trained head's result."""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from pipeline.constants import PAPER_HEAD, group_names
from pipeline.heads.model import (
    TARGETS,
    AgeHead,
)
from pipeline.heads.stack_ops import ADAM_BETAS, ADAM_EPS
from pipeline.heads.targets import HUBER_YEARS


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
    pca: int = 0                       # > 0: feed the first layer at most this many principal components

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
        if self.pca < 0:
            raise ValueError(f"--pca must be 0 (off) or a number of components, not {self.pca}")
        if self.pca and not self.standardize:
            raise ValueError("--pca needs --standardize on: the components are those of the standardized features")

    def shape_key(self):
        """Configurations with equal keys can be trained as one stacked computation."""
        return (self.hidden, self.batch_size, self.epochs, self.target, self.standardize, self.pca)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


def expand_grid(base: HeadConfig | None = None, **lists) -> list[HeadConfig]:
    """Every combination of the list-valued options, in a stable order."""
    base = base or HeadConfig()
    names = list(lists)
    return [replace(base, **dict(zip(names, values))) for values in itertools.product(*(lists[n] for n in names))]


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
    # A --pca head's reduction: {"blocks": [[width, kept], ...], "block{i}": [width, kept] projections,
    # "source": where the fit came from (fitted now, or reused from the cache beside the feature file)}.
    reduction: dict | None = None

    @property
    def feature_dim(self) -> int:
        """Width of the features the head takes (before any projection)."""
        return int(self.feature_mean.shape[0])

    def to_head(self, group_edges) -> AgeHead:
        cfg = self.config
        head = AgeHead(self.feature_dim, cfg.hidden, cfg.dropout, group_edges, cfg.target,
                       reduction=self.reduction["blocks"] if self.reduction else None)
        linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for linear, (w, b) in zip(linears, self.params):
                linear.weight.copy_(w.t())
                linear.bias.copy_(b)
            head.feature_mean.copy_(self.feature_mean)
            head.feature_std.copy_(self.feature_std)
            for name, projection in head.block_projections().items():
                projection.copy_(self.reduction[name])
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


def result_meta(loaded, result: HeadResult, split_file=None, rank: int = 1, n_configs: int = 1,
                recipe: str | None = None) -> dict:
    """The checkpoint meta of a trained head (the head.json of checkpoint.save_checkpoint).

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
        "weights_sha256": settings.get("weights_sha256"),  # the weights' bytes (None: features made before)
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
        "feature_dim": result.feature_dim,
        # A --pca head projects its standardized features itself (a buffer); this says how it was fitted.
        "reduction": None if not result.reduction else {
            "method": "pca", "components": result.config.pca, "blocks": result.reduction["blocks"],
            "fitted_on": "train rows, both views, standardized", "source": result.reduction["source"]},
        "hidden": list(result.config.hidden),
        "config": config,
        "rows": loaded.counts,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "metrics": result.metrics,
        "temperature": result.temperature if result.config.target == "age" else None,
        # Post-hoc temperature scaling; checkpoint.load_checkpoint checks it against the head's own buffer.
        "calibration": {"method": result.calibration, "temperature": result.calibration_temperature,
                        "fitted_on": "val" if result.calibration != "off" else None,
                        "objective": "validation NLL of softmax(group scores / T)"
                        if result.calibration != "off" else None},
        "sweep": {"rank": rank, "configurations": n_configs},
        "versions": {"torch": torch.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
