"""Heads on cached features: the MLP module, its safe checkpoint, compatibility checks, feature loading.

(Training lives in sweep.py; this module is what every later stage needs to use a head.)

The head is the paper's MLP: Linear(D,512) ReLU Dropout(0.3) Linear(512,256)
ReLU Dropout(0.3) Linear(256,C), with optional feature standardization kept
inside as buffers, so `head(features)` takes the raw float32 features exactly
as the feature file stores them (`assemble_features` builds the same layout
from live backbone outputs).

Four targets:
  'group'  the paper's: C logits, cross-entropy.
  'age'    one output, the age in years (regression). Group scores are derived
           from it as an adjacent-categories ordinal model: log p(k)/p(k-1) =
           (age - t_k) / T, with t_k the midpoint between groups k-1 and k and
           T a temperature fitted on the validation split. So the argmax of the
           scores is exactly the group the predicted age falls in, softmax gives
           probabilities, and every score is differentiable (Grad-CAM works).
  'soft'   C logits trained with cross-entropy against soft labels from the age
           (soft_group_targets: a Gaussian over years summed into groups).
  'ordinal' C-1 cumulative logits, CORAL (Cao et al. 2020): one shared weight
           vector and C-1 biases, P(group > j) = sigmoid(z_j); the scores are the
           log group probabilities P(>k-1) - P(>k) (ordinal_group_probs).

Checkpoint: a directory holding two files, neither of them a pickle:
  head.safetensors  the head's state dict (tensors only; safetensors cannot run code)
  head.json         meta: format, backbones (concatenation order), weights
                    ({backbone: id}), feature_kind, group_edges, class_names,
                    target, feature_fingerprint (the feature file's settings
                    fingerprint), rows_fingerprint (hash of the rows and splits
                    used), preprocessing, feature_dim, hidden, config (the
                    training recipe), history (per-epoch train/val loss and
                    accuracy, plus MAE for age heads), best_epoch, metrics,
                    calibration (post-hoc temperature scaling: method, T, the
                    validation ECE/NLL before and after; absent = T 1). T also
                    lives in the weights file (buffer calibration_temperature),
                    and the two must agree at load.
`load_checkpoint` takes the directory or either file of the pair.

Features: `load_features` / `load_head_inputs` read [N, 2, D_total] (view 0
plain, view 1 mirrored; backbones concatenated in order) from a feature file;
`assemble_features` builds the same layout from live backbone outputs;
`load_training_data` reads a file once into `HeadData` (train rows with both
views, val plain; test rows stay on disk for evaluate), with an optional split
file overriding the stored split.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import store
from .descriptors import kind_outputs

FORMAT = "utkface-age-head/1"
WEIGHTS_FILE = "head.safetensors"
META_FILE = "head.json"
TARGETS = ("group", "age", "soft", "ordinal")


class HeadMismatch(ValueError):
    """A head was asked to score features it was not trained on."""


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not in the safe format."""


# --------------------------------------------------------------------------- the module


class AgeHead(nn.Module):
    """Standardize (buffers) -> MLP -> group scores [B, C].

    `mlp` holds only the Linear/ReLU/Dropout layers, so its parameters are
    exactly the paper's head; standardization and the age-to-group mapping are
    buffers.
    """

    def __init__(self, in_dim: int, hidden=(512, 256), dropout: float = 0.3, group_edges=(25, 50, 75, 116),
                 target: str = "group"):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, not {target!r}")
        self.target = target
        self.in_dim = int(in_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.n_classes = len(group_edges)
        layers: list[nn.Module] = []
        width = self.in_dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, output_width(target, self.n_classes)))
        self.mlp = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(self.in_dim))
        self.register_buffer("feature_std", torch.ones(self.in_dim))
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
        return self.mlp(x)

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


# --------------------------------------------------------------------------- checkpoint


@dataclass
class HeadCheckpoint:
    head: AgeHead          # eval mode; forward(raw features [B, D]) -> group scores [B, C]
    meta: dict

    def check_compatible(self, settings: dict) -> None:
        """Raise HeadMismatch, naming every difference, unless features made with `settings` fit this head."""
        check_compatible(self.meta, settings)

    def predict_age(self, features: torch.Tensor) -> torch.Tensor | None:
        """Predicted age in years for 'age' heads; None for group heads."""
        if self.meta.get("target") != "age":
            return None
        with torch.no_grad():
            return self.head.predict_age(features)


def check_compatible(meta: dict, settings: dict) -> None:
    """Compare a head's meta with a feature file's settings (store.read_settings) or live settings."""
    problems = []
    have = list(settings.get("backbones", []))
    missing = [b for b in meta["backbones"] if b not in have]
    if missing:
        problems.append(f"backbones: the head was trained on {', '.join(meta['backbones'])} features; "
                        f"these features are from {', '.join(have) or 'no backbone'} (missing {', '.join(missing)})")
    weights = settings.get("weights", {}) or {}
    for name in meta["backbones"]:
        if name in have and str(weights.get(name)) != str(meta["weights"].get(name)):
            problems.append(f"weights of {name}: the head was trained on features from weights "
                            f"{meta['weights'].get(name)!r}; these features come from {weights.get(name)!r}")
    edges = [int(e) for e in settings.get("group_edges", [])]
    if edges != [int(e) for e in meta["group_edges"]]:
        problems.append(f"group_edges (bins): the head predicts groups {meta['group_edges']}; "
                        f"these features are labelled with {edges}")
    mine, theirs = meta.get("preprocessing"), settings.get("preprocessing")
    if mine and theirs and mine != theirs:
        problems.append(f"preprocessing: the head was trained on features made with {mine}; these use {theirs}")
    # Face handling (featurize --faces): absent on either side means whole aligned crops, the only mode before.
    mine_faces, their_faces = meta.get("faces"), settings.get("faces")
    if mine_faces != their_faces:
        problems.append(f"face handling (--faces): the head was trained on features made with "
                        f"{mine_faces or 'aligned crops'}; these use {their_faces or 'aligned crops'}")
    if problems:
        raise HeadMismatch("this head does not fit these features:\n  " + "\n  ".join(problems))
    _warn_other_compute(meta, settings)


class ComputeWarning(UserWarning):
    """The head's training features and these features were computed differently (device, precision, ...)."""


def _warn_other_compute(meta: dict, settings: dict) -> None:
    """Allowed, with a warning: same backbones, weights and preprocessing, computed another way.

    The features then differ within featurize --verify's tolerance (e.g. float16
    autocast on a GPU against float32 on the CPU), which a head tolerates; what
    is refused is mixing computations inside one feature file (provenance.py).
    """
    from . import provenance

    mine, theirs = meta.get("compute"), settings.get("compute")
    if mine is None or theirs is None or mine == theirs:
        return  # heads and files from before compute records carry none
    import warnings

    mixed = " (a file that mixes computations, made with --allow-mixed)" if provenance.is_mixed(settings) else ""
    warnings.warn(f"the head was trained on features computed with {provenance.describe_all({'compute': mine})}; "
                  f"these were computed with {provenance.describe_all(settings)}{mixed}. Allowed: they agree "
                  f"within featurize --verify's tolerance, but scores can move slightly.", ComputeWarning, stacklevel=3)


def _checkpoint_paths(path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path if path.is_dir() or path.suffix not in (".safetensors", ".json") else path.parent
    return folder / WEIGHTS_FILE, folder / META_FILE


def save_checkpoint(out, head: AgeHead, meta: dict) -> Path:
    """Write OUT/head.safetensors + OUT/head.json (weights first, meta last, each atomically)."""
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise ValueError(f"refusing to save a head to {folder}: {bad} holds values that are not finite "
                         f"(did training diverge?)")
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    # The weights file repeats what the head was trained on, so that an edited head.json is caught at load.
    save_file(state, str(tmp), metadata={"format": FORMAT, "identity": json.dumps(_identity(meta), sort_keys=True)})
    tmp.replace(weights_path)
    full = {"format": FORMAT, **meta}
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(full), indent=1, sort_keys=True))
    tmp.replace(meta_path)
    return folder


def load_checkpoint(path, device: str | torch.device = "cpu") -> HeadCheckpoint:
    """Load a head safely: tensors via safetensors, meta via JSON; nothing is unpickled."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    weights_path, meta_path = _checkpoint_paths(path)
    for p in (weights_path, meta_path):
        if not p.is_file():
            raise CheckpointError(f"{path} is not a head checkpoint: {p} is missing "
                                  f"(a checkpoint is a folder with {WEIGHTS_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a head checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in IDENTITY_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} is damaged: it lacks {', '.join(missing)}")
    try:
        state = load_file(str(weights_path), device="cpu")
        stored = safe_open(str(weights_path), framework="pt").metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is not a safetensors file ({err}); "
                              f"pickled checkpoints are refused because loading them can run code") from err
    if "identity" in stored:  # checkpoints saved before this check carry none
        trained_on, described = json.loads(stored["identity"]), _identity(meta)
        changed = [f"{k}: {WEIGHTS_FILE} was trained on {trained_on.get(k)!r}, {META_FILE} says {described.get(k)!r}"
                   for k in IDENTITY_KEYS if trained_on.get(k) != described.get(k)]
        if changed:
            raise CheckpointError(f"{meta_path} was edited after training and no longer describes its weights:\n  "
                                  + "\n  ".join(changed))
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"{weights_path}: {bad} holds values that are not finite; this head cannot be used")
    head = AgeHead(meta["feature_dim"], meta["hidden"], 0.0, meta["group_edges"], meta["target"])
    # Heads saved before temperature scaling existed hold no temperature: they are uncalibrated, T = 1.
    state.setdefault("calibration_temperature", torch.ones(()))
    stored_t, described_t = float(state["calibration_temperature"]), calibration_temperature(meta)
    if described_t is None or not math.isclose(stored_t, described_t, rel_tol=1e-6):
        raise CheckpointError(f"{meta_path} was edited after training and no longer describes its weights:\n  "
                              f"calibration temperature: {WEIGHTS_FILE} holds {stored_t!r}, {META_FILE} says "
                              f"{described_t!r}")
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path} does not match the head described in {meta_path}: {err}") from err
    head.eval().to(device)
    for p in head.parameters():
        p.requires_grad_(False)
    return HeadCheckpoint(head, meta)


def calibration_temperature(meta: dict) -> float | None:
    """The temperature head.json records (meta["calibration"]["temperature"]); 1 when it records no calibration.

    None when the record is there but not a positive number (a damaged or edited file).
    """
    calibration = meta.get("calibration")
    if calibration is None:
        return 1.0
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        return None
    return float(value)


# What a head's weights mean: checked between head.json and head.safetensors at load.
IDENTITY_KEYS = ("backbones", "weights", "feature_kind", "feature_dim", "hidden", "group_edges", "target")


def _identity(meta: dict) -> dict:
    return {k: _jsonable(meta.get(k)) for k in IDENTITY_KEYS}


def _non_finite(state: dict) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value


# --------------------------------------------------------------------------- features


def assemble_features(pooled: dict, backbones, kind: str) -> torch.Tensor:
    """{name: FrozenBackbone outputs {"features", "stages", descriptors...}} -> [B, D_total], the training layout.

    Per backbone in order, the outputs the kind names (descriptors.kind_outputs:
    'last' -> features, 'both' -> features + stages, 'both+grid' -> features +
    stages + grid, ...); then concatenated over backbones, as store.read_features
    and load_features lay them out.
    """
    outputs = kind_outputs(kind)
    parts = []
    for name in backbones:
        found = pooled[name]
        parts += [found[o] for o in outputs]
    return torch.cat([p.float() for p in parts], dim=1)


def load_features(feature_file, backbones, kind: str = "last") -> np.ndarray:
    """[N, 2, D_total] float32 (view 0 plain, view 1 mirrored), backbones concatenated in order."""
    kind_outputs(kind)  # an unknown kind fails here, before the file is opened
    arrays = [store.read_features(feature_file, name, kind) for name in backbones]
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays, axis=2)


def load_head_inputs(feature_file, meta: dict) -> torch.Tensor:
    """The [N, 2, D_total] features a checkpoint's head takes, from a feature file; refuses misfits."""
    check_compatible(meta, store.read_settings(feature_file))
    features = load_features(feature_file, meta["backbones"], meta["feature_kind"])
    if features.shape[2] != meta["feature_dim"]:
        raise HeadMismatch(f"{feature_file} gives {features.shape[2]}-wide {meta['feature_kind']!r} features "
                           f"for {', '.join(meta['backbones'])}; the head takes {meta['feature_dim']}")
    return torch.from_numpy(features)


STATS_CHUNK_BYTES = 64 * 2**20   # float64 working set of chunked_mean_std


def chunked_mean_std(rows: torch.Tensor, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std (n - 1, as torch.std) of [n, D] rows, in float64, `chunk` rows at a time.

    Only one chunk at a time is converted to float64: a float64 copy of all the
    training rows of a 35,000-wide descriptor would take 9.5 GB beside the
    features. chunk=None: as many rows as fit in STATS_CHUNK_BYTES (4096 rows of
    a 2,000-wide feature, ~230 of a 35,000-wide one). Two passes (the mean, then
    squared deviations from it), as accurate as the one-shot float64
    computation: no sum-of-squares cancellation.
    """
    n, width = rows.shape
    if n == 0:
        raise ValueError("no rows to compute standardization statistics from")
    chunk = chunk or max(1, min(4096, STATS_CHUNK_BYTES // (8 * max(width, 1))))
    total = torch.zeros(width, dtype=torch.float64, device=rows.device)
    for lo in range(0, n, chunk):
        total += rows[lo:lo + chunk].double().sum(0)
    mean = total / n
    squares = torch.zeros_like(total)
    for lo in range(0, n, chunk):
        deviation = rows[lo:lo + chunk].double()
        deviation -= mean                       # in place: one float64 chunk alive at a time
        squares += deviation.square_().sum(0)
    std = (squares / (n - 1)).sqrt() if n > 1 else torch.full_like(mean, float("nan"))  # torch.std of 1 row: NaN
    return mean, std


@dataclass
class HeadData:
    """Training and validation features in memory once (float32, on one device).

    Test rows are left out: heads are chosen on validation only; evaluate scores test.
    """
    train: torch.Tensor          # [n_train, 2, D]  view 0 plain, 1 mirrored
    train_group: torch.Tensor    # [n_train] int64
    train_age: torch.Tensor      # [n_train] float32
    val: torch.Tensor            # [n_val, D]  plain view
    val_group: torch.Tensor
    val_age: torch.Tensor
    n_classes: int = 4
    group_edges: tuple = (25, 50, 75, 116)
    _standardized: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_arrays(cls, features: np.ndarray, groups, ages, splits, group_edges, device="cpu") -> "HeadData":
        splits = np.asarray(splits, dtype=object)
        groups, ages = np.asarray(groups), np.asarray(ages)
        rows = {s: np.flatnonzero(splits == s) for s in ("train", "val")}
        for s in ("train", "val"):
            if len(rows[s]) == 0:
                raise ValueError(f"no {s} rows: the split assigns none (check --split-file)")

        def pick(s, view=None):
            block = features[rows[s]] if view is None else features[rows[s], view]
            return torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32)).to(device)

        def labels(s):
            return (torch.from_numpy(groups[rows[s]].astype(np.int64)).to(device),
                    torch.from_numpy(ages[rows[s]].astype(np.float32)).to(device))

        return cls(pick("train"), *labels("train"), pick("val", 0), *labels("val"),
                   n_classes=len(group_edges), group_edges=tuple(int(e) for e in group_edges))

    def to(self, device) -> "HeadData":
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()
                 if not k.startswith("_")}
        return HeadData(**moved)

    @property
    def dim(self) -> int:
        return self.train.shape[2]

    @property
    def device(self):
        return self.train.device

    def standardization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std per feature over the training rows, both views."""
        if "stats" not in self._standardized:
            mean, std = chunked_mean_std(self.train.reshape(-1, self.dim))
            std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features pass through
            self._standardized["stats"] = (mean.float(), std.float())
        return self._standardized["stats"]

    def tables(self, standardize: bool):
        """(train [n, 2, D], val [n_val, D]) as the head's first layer sees them."""
        if not standardize:
            return self.train, self.val
        if "tables" not in self._standardized:
            mean, std = self.standardization()
            self._standardized["tables"] = ((self.train - mean) / std, (self.val - mean) / std)
        return self._standardized["tables"]

    def class_weights(self) -> torch.Tensor:
        counts = torch.bincount(self.train_group, minlength=self.n_classes).double()
        weights = len(self.train_group) / (self.n_classes * counts.clamp_min(1))
        return weights.float()


@dataclass
class TrainingSet:
    """What train_head loaded from a feature file, with what a checkpoint must record about it."""
    data: HeadData
    feature_file: str
    backbones: list
    feature_kind: str
    settings: dict
    group_edges: list
    counts: dict
    rows_fingerprint: str
    skipped: list = field(default_factory=list)   # (path, reason) of train/val rows left out


def load_training_data(feature_file, backbones, kind: str = "last", split_file=None, device="cpu") -> TrainingSet:
    """Read the features once and keep the train and val rows as tensors (a split file overrides the file's split)."""
    settings = store.read_settings(feature_file)
    missing = [b for b in backbones if b not in settings["backbones"]]
    if missing:
        raise ValueError(f"{feature_file} has no features for {', '.join(missing)}; "
                         f"it has {', '.join(settings['backbones'])}")
    meta = store.read_meta(feature_file)
    splits = effective_splits(feature_file, split_file, meta)
    features = load_features(feature_file, backbones, kind)
    edges = [int(e) for e in settings["group_edges"]]
    # A NaN or Inf in one row would turn every weight into NaN: such train/val rows are left out, by name.
    fingerprint = rows_fingerprint(meta["path"], meta["age"], splits)
    broken = np.isin(splits, ("train", "val")) & ~np.isfinite(features).all(axis=(1, 2))
    skipped = [(str(p), f"features not finite (NaN or Inf); left out of {s}")
               for p, s in zip(meta["path"][broken], splits[broken])]
    if broken.any():
        splits = splits.copy()
        splits[broken] = ""
    data = HeadData.from_arrays(features, meta["group"], meta["age"], splits, edges, device=device)
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    counts["unused"] = int(len(splits) - sum(counts.values()))
    return TrainingSet(data, str(feature_file), list(backbones), kind, settings, edges, counts, fingerprint,
                       skipped)


def effective_splits(feature_file, split_file=None, meta: dict | None = None) -> np.ndarray:
    """Each row's split: the feature file's, or the --split-file's where given ('' = unused)."""
    meta = meta if meta is not None else store.read_meta(feature_file)
    if split_file is None:
        return np.asarray(meta["split"], dtype=object)
    from .dataset import apply_split_file, read_split_file

    return np.asarray(apply_split_file(list(meta["path"]), read_split_file(split_file)), dtype=object)


def rows_fingerprint(paths, ages, splits) -> str:
    """Short hash of which rows were used, with which labels and splits."""
    digest = hashlib.sha256()
    for p, a, s in zip(paths, ages, splits):
        digest.update(f"{p}\t{int(a)}\t{s}\n".encode())
    return digest.hexdigest()[:16]

