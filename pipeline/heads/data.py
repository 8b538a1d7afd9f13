"""A head's inputs: features assembled from a feature file, training statistics and the training set."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.backbones.descriptors import kind_outputs
from pipeline.features.read import read_features, read_meta, read_settings
from pipeline.heads.checkpoint import HeadMismatch, check_compatible
from pipeline.heads.reduction import ReductionCache, block_components, fit_blocks, project


def assemble_features(pooled: dict, backbones, kind: str) -> torch.Tensor:
    """{name: FrozenBackbone outputs {"features", "stages", descriptors...}} -> [B, D_total], the training layout.

    Per backbone in order, the outputs the kind names (descriptors.kind_outputs:
    'last' -> features, 'both' -> features + stages, 'both+grid' -> features +
    stages + grid, ...); then concatenated over backbones, as read_features
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
    arrays = [read_features(feature_file, name, kind) for name in backbones]
    if len(arrays) == 1:
        return arrays[0]
    return np.concatenate(arrays, axis=2)


def load_head_inputs(feature_file, meta: dict) -> torch.Tensor:
    """The [N, 2, D_total] features a checkpoint's head takes, from a feature file; refuses misfits."""
    check_compatible(meta, read_settings(feature_file))
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
    blocks: tuple = ()           # widths of the feature blocks (backbone outputs) in column order
    reductions: ReductionCache | None = field(default=None, repr=False)   # where --pca fits are kept
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

    @property
    def block_widths(self) -> tuple[int, ...]:
        """Widths of the feature blocks in column order (one block when unknown)."""
        return tuple(self.blocks) if sum(self.blocks) == self.dim else (self.dim,)

    def pca_components(self, requested: int) -> int:
        """Components --pca N keeps of a block wider than that: at most the training rows (both views) less one."""
        return min(requested, 2 * self.train.shape[0] - 1)

    def reduced(self, components: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(train [n, 2, W], val [n_val, W], fit) for a head fed --pca N: blocks wider than N as N components.

        N is capped by pca_components.
        fit: {"mean" [D], "std" [D], "block{i}" [width_i, N] per reduced block, "blocks" [[width, kept]...],
        "source"}: reused from the cache beside the feature file when there is one, else fitted on the
        standardized training rows (and stored). The inputs are computed from the fit the same way in
        both cases, so a reused fit trains the same head.
        """
        key = ("pca", components)
        components = self.pca_components(components)
        widths = self.block_widths
        if key not in self._standardized:
            cache = self.reductions
            fit = cache.load(widths, components) if cache is not None else None
            source = f"reused from {cache.path(widths, components)}" if fit is not None else None
            if fit is None:
                fit = self._fit_pca(widths, components)
                problem = cache.save(widths, components, fit) if cache is not None else None
                source = (f"fitted on the training rows, stored in {cache.path(widths, components)}"
                          if cache is not None and problem is None
                          else f"fitted on the training rows ({problem or 'not stored'})")
            fit = {k: v.to(self.device) for k, v in fit.items()}
            projections = {k: v for k, v in fit.items() if k.startswith("block")}
            n = self.train.shape[0]
            train = project(self.train.reshape(2 * n, self.dim), fit["mean"], fit["std"], widths, projections)
            val = project(self.val, fit["mean"], fit["std"], widths, projections)
            blocks = [[w, k] for w, k in zip(widths, block_components(widths, components))]
            self._standardized[key] = (train.reshape(n, 2, -1), val, {**fit, "blocks": blocks, "source": source})
        return self._standardized[key]

    def _fit_pca(self, widths, components: int) -> dict:
        mean, std = self.standardization()
        if "tables" in self._standardized:
            standardized = self._standardized["tables"][0]
        else:  # a temporary copy: a --pca head never needs the standardized table again
            standardized = (self.train - mean) / std
        return {"mean": mean, "std": std, **fit_blocks(standardized.reshape(-1, self.dim), widths, components)}

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
    settings = read_settings(feature_file)
    missing = [b for b in backbones if b not in settings["backbones"]]
    if missing:
        raise ValueError(f"{feature_file} has no features for {', '.join(missing)}; "
                         f"it has {', '.join(settings['backbones'])}")
    meta = read_meta(feature_file)
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
    data.blocks = feature_blocks(feature_file, backbones, kind)
    data.reductions = ReductionCache(feature_file, {"feature_fingerprint": str(settings["fingerprint"]),
                                                    "rows_fingerprint": fingerprint, "backbones": list(backbones),
                                                    "feature_kind": kind})
    counts = {s: int((splits == s).sum()) for s in ("train", "val", "test")}
    counts["unused"] = int(len(splits) - sum(counts.values()))
    return TrainingSet(data, str(feature_file), list(backbones), kind, settings, edges, counts, fingerprint,
                       skipped)


def feature_blocks(feature_file, backbones, kind: str) -> tuple[int, ...]:
    """Widths of the blocks load_features concatenates: per backbone in order, each output of the kind."""
    import h5py

    from pipeline.backbones.descriptors import dataset_path

    with h5py.File(feature_file, "r") as h5:
        return tuple(int(h5[dataset_path(o, name)].shape[2]) for name in backbones for o in kind_outputs(kind))


def effective_splits(feature_file, split_file=None, meta: dict | None = None) -> np.ndarray:
    """Each row's split: the feature file's, or the --split-file's where given ('' = unused)."""
    meta = meta if meta is not None else read_meta(feature_file)
    if split_file is None:
        return np.asarray(meta["split"], dtype=object)
    from pipeline.ingest.dataset import apply_split_file, read_split_file

    return np.asarray(apply_split_file(list(meta["path"]), read_split_file(split_file)), dtype=object)


def rows_fingerprint(paths, ages, splits) -> str:
    """Short hash of which rows were used, with which labels and splits."""
    digest = hashlib.sha256()
    for p, a, s in zip(paths, ages, splits):
        digest.update(f"{p}\t{int(a)}\t{s}\n".encode())
    return digest.hexdigest()[:16]
