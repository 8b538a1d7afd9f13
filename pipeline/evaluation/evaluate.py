"""Evaluate heads on a feature file: one checkpoint or an ensemble, with the checks that keep the numbers honest."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.evaluation.scores import (
    age_metrics,
    classification_metrics,
    combine_views,
)
from pipeline.ingest.labels import describe_label_source


def head_outputs(checkpoint, inputs, batch_size: int = 8192) -> tuple[np.ndarray, np.ndarray | None]:
    """Run a head on [N, V, D] raw features -> (probabilities [N, V, C], ages [N, V] or None)."""
    import torch

    inputs = np.asarray(inputs, dtype=np.float32)
    n, views, d = inputs.shape
    flat = torch.from_numpy(inputs.reshape(n * views, d))
    probs, ages = [], []
    head = checkpoint.head.eval()
    with torch.no_grad():
        for lo in range(0, len(flat), batch_size):
            chunk = flat[lo:lo + batch_size]
            probs.append(torch.softmax(head(chunk).float(), dim=1).numpy())
            age = checkpoint.predict_age(chunk)
            if age is not None:
                ages.append(age.float().reshape(-1).numpy())
    prob = np.concatenate(probs).reshape(n, views, -1) if probs else np.zeros((0, views, 0), np.float32)
    age = np.concatenate(ages).reshape(n, views) if ages else None
    return prob, age


class FeatureInputs:
    """Head inputs from one feature file, shared by the checkpoints of one run.

    Features are read once per (backbone, kind) and only the scored rows are kept.
    """

    def __init__(self, feature_file: Path):
        from pipeline.features.read import read_meta, read_settings

        self.path = Path(feature_file)
        self.settings = read_settings(self.path)
        self.meta = read_meta(self.path)
        self.dataset = describe_label_source(self.settings)
        self._cache: dict[tuple, np.ndarray] = {}

    def splits(self, split_file: Path | None = None) -> np.ndarray:
        """Each row's split: the file's own, or the split file's ('' where it does not list the row)."""
        from pipeline.heads.data import effective_splits

        return effective_splits(self.path, split_file)

    def rows(self, backbones: list[str], kind: str, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 2, D_total]: per backbone in order, its features of `kind`, concatenated.

        The layout of heads.data.load_features, which training uses.
        """
        from pipeline.features.read import read_features

        parts = []
        for name in backbones:
            key = (name, kind, rows.tobytes())
            if key not in self._cache:
                self._cache[key] = read_features(self.path, name, kind)[rows]
            parts.append(self._cache[key])
        return np.concatenate(parts, axis=2)


def is_in_domain(meta: dict, inputs: "FeatureInputs") -> bool:
    """True when a head is scored on its own training data: the same feature file (fingerprint), or a file
    holding the same rows with the same labels and splits (e.g. the training file joined with another backbone)."""
    from pipeline.heads.data import rows_fingerprint

    if meta.get("feature_fingerprint") and meta.get("feature_fingerprint") == inputs.settings.get("fingerprint"):
        return True
    trained = meta.get("rows_fingerprint")
    return trained is not None and trained == rows_fingerprint(inputs.meta["path"], inputs.meta["age"],
                                                               inputs.meta["split"])


def training_file_path(recorded: str | None, checkpoint_path=None) -> Path | None:
    """Where the head's training feature file (head.json `feature_file`) is now.

    Heads saved since the path is stored absolute name it exactly. Older ones hold the path as
    given to train-head, relative to the folder it ran in: tried against the current folder, then
    against the checkpoint folder's parent and the checkpoint folder (a run folder moved as a whole).
    """
    if not recorded:
        return None
    path = Path(recorded)
    if path.is_absolute():
        return path
    candidates = [path]
    if checkpoint_path is not None:
        folder = Path(checkpoint_path)
        folder = folder if folder.is_dir() else folder.parent
        candidates += [folder.parent / path, folder / path]
    return next((c for c in candidates if c.is_file()), path)


def cross_dataset_overlap(meta: dict, scored_sha256, checkpoint_path=None) -> list[str]:
    """Cross-dataset: how many scored images are byte-identical to images of the head's train/val split.

    Read from the head's training feature file (head.json `feature_file`, see training_file_path) when
    it is still there; otherwise say that the overlap could not be checked.
    """
    from pipeline.features.read import read_meta

    source = training_file_path(meta.get("feature_file"), checkpoint_path)
    try:
        trained = read_meta(source) if source else None
    except (OSError, ValueError, KeyError):
        trained = None
    if trained is None:
        return [f"cross-dataset: the head's training feature file ({source or 'not recorded'}) cannot be read, "
                f"so images shared by both datasets cannot be found"]
    seen = set(trained["sha256"][np.isin(trained["split"].astype(str), ("train", "val"))].tolist())
    shared = int(sum(sha in seen for sha in scored_sha256))
    if not shared:
        return []
    return [f"cross-dataset: {shared} of the {len(scored_sha256)} scored images are byte-identical to images in "
            f"the train/val split of the head's training file {source}"]


def split_warnings(meta: dict, file_meta: dict, splits: np.ndarray, rows: np.ndarray, settings: dict) -> list[str]:
    """Reasons to doubt that the scored rows are unseen by the head.

    A checkpoint records rows_fingerprint, a hash of every row's path, age and
    split at training time. The same hash over the splits used here tells
    whether this evaluation uses the head's own split (then test rows are
    unseen). If it does not, and the head was trained on this file's own split,
    the scored rows that were in its train or val split are counted.
    """
    from pipeline.heads.data import rows_fingerprint

    trained = meta.get("rows_fingerprint")
    if trained is None:  # older or hand-made checkpoints: compare the feature files instead
        fp = meta.get("feature_fingerprint")
        if fp and fp != settings.get("fingerprint"):
            return [f"the head was trained on feature file {fp}, this one is {settings.get('fingerprint')}: "
                    f"if their splits differ, scored rows may be rows it trained on"]
        return []
    paths, ages = file_meta["path"], file_meta["age"]
    ours = rows_fingerprint(paths, ages, splits)
    if ours == trained:
        return []
    warnings = [f"the rows or splits differ from those the head was trained with (rows fingerprint {ours}, "
                f"head {trained}): scored rows may be rows it trained on"]
    if rows_fingerprint(paths, ages, file_meta["split"]) == trained:
        used = file_meta["split"][rows]
        n_train, n_val = int(np.sum(used == "train")), int(np.sum(used == "val"))
        if n_train or n_val:
            warnings.append(f"{n_train} of the {len(rows)} scored rows were in the head's train split "
                            f"and {n_val} in its val split")
    return warnings


@dataclass
class Evaluation:
    """Everything evaluate reports for one checkpoint on one split."""
    name: str
    checkpoint_path: str
    meta: dict
    split: str
    tta: bool
    metrics: dict
    paths: list = field(default_factory=list)      # per evaluated row
    y_true: np.ndarray | None = None
    probs: np.ndarray | None = None                # [N, C] after TTA (if any)
    ages_true: np.ndarray | None = None
    ages_pred: np.ndarray | None = None
    warnings: list = field(default_factory=list)
    skipped: list = field(default_factory=list)    # (path, reason) of rows of the split left out
    features: str = ""                             # the scored feature file
    dataset: str = ""                              # where its labels came from (labels.describe_label_source)
    domain: str = "in-domain"                      # in-domain (the head's own data) or cross-domain

    def summary(self) -> dict:
        """The JSON-ready record of this evaluation."""
        from pipeline.heads.checkpoint import calibration_temperature

        m = self.meta
        return {
            "checkpoint": self.checkpoint_path,
            "backbones": list(m["backbones"]),
            "weights": dict(m.get("weights", {})),
            "feature_kind": m.get("feature_kind"),
            "target": m.get("target", "group"),
            "class_names": list(m["class_names"]),
            "group_edges": list(m["group_edges"]),
            "best_epoch": m.get("best_epoch"),
            **({"members": list(m["members"])} if "members" in m else {}),
            # The probabilities below are softmax(scores / T); an ensemble's members each use their own T.
            "calibration_temperature": None if "members" in m else calibration_temperature(m),
            "split": self.split,
            "tta": self.tta,
            "features": self.features,
            "dataset": self.dataset,
            "domain": self.domain,
            **self.metrics,
            "warnings": list(self.warnings),
            "skipped": [list(row) for row in self.skipped],
        }


def evaluate_checkpoint(checkpoint, name: str, checkpoint_path, inputs: FeatureInputs, split: str,
                        split_file: Path | None = None, tta: bool = False) -> Evaluation:
    """Score one loaded checkpoint on one split of a feature file.

    Raises heads.model.HeadMismatch (a ValueError) if the checkpoint was trained on
    features from other backbones, weights or age groups than the file holds.
    """
    meta = checkpoint.meta
    checkpoint.check_compatible(inputs.settings)
    splits = inputs.splits(split_file)
    rows = np.arange(len(splits)) if split == "all" else np.flatnonzero(splits == split)
    if len(rows) == 0:
        source = f"split file {split_file}" if split_file is not None else f"feature file {inputs.path}"
        raise ValueError(f"no rows are in split {split!r} according to {source}")
    x = inputs.rows(list(meta["backbones"]), meta["feature_kind"], rows)
    if "feature_dim" in meta and x.shape[2] != int(meta["feature_dim"]):
        raise ValueError(f"{checkpoint_path} expects {meta['feature_dim']} features per row but "
                         f"{inputs.path} gives {x.shape[2]} for {'+'.join(meta['backbones'])} ({meta['feature_kind']})")
    # Rows whose features hold NaN or Inf would get NaN scores: leave them out, by name.
    finite = np.isfinite(x).all(axis=(1, 2))
    skipped = [(str(p), "features not finite (NaN or Inf) in the feature file")
               for p in inputs.meta["path"][rows[~finite]]]
    if not finite.all():
        rows, x = rows[finite], x[finite]
        if len(rows) == 0:
            raise ValueError(f"every row of split {split!r} in {inputs.path} has non-finite features")
    prob_views, age_views = head_outputs(checkpoint, x)
    if not np.isfinite(prob_views).all():  # checked before any output is written: no half-written folder
        bad = int((~np.isfinite(prob_views).all(axis=(1, 2))).sum())
        raise ValueError(f"the head gives probabilities that are not finite on {bad} row(s); its checkpoint "
                         f"{checkpoint_path} cannot be used")
    probs = combine_views(prob_views, tta)
    y_true = inputs.meta["group"][rows]
    outside = (y_true < 0) | (y_true >= len(meta["class_names"]))
    if outside.any():
        raise ValueError(f"{inputs.path}: meta/group holds {int(y_true[outside][0])}, outside the head's "
                         f"{len(meta['class_names'])} groups; the file is damaged")
    metrics = classification_metrics(y_true, probs, list(meta["class_names"]))
    ages_true = inputs.meta["age"][rows]
    ages_pred = None
    metrics["mae"] = None
    metrics["mean_age_error"] = None
    if age_views is not None:
        ages_pred = combine_views(age_views, tta)
        known = ages_true >= 0  # rows labelled with a group only (age -1) have no age to compare
        if known.any():
            am = age_metrics(ages_true[known], ages_pred[known])
            metrics["mae"], metrics["mean_age_error"] = am["mae"], am["mean_error"]

    in_domain = is_in_domain(meta, inputs)
    if in_domain:
        warnings = split_warnings(meta, inputs.meta, splits, rows, inputs.settings)
    else:  # another dataset: its splits say nothing about the head's; shared images do
        warnings = cross_dataset_overlap(meta, inputs.meta["sha256"][rows].tolist(), checkpoint_path)
    return Evaluation(name=name, checkpoint_path=str(checkpoint_path), meta=meta, split=split, tta=tta,
                      metrics=metrics, paths=list(inputs.meta["path"][rows]), y_true=y_true, probs=probs,
                      ages_true=ages_true, ages_pred=ages_pred, warnings=warnings, skipped=skipped,
                      features=str(inputs.path),
                      dataset=inputs.dataset, domain="in-domain" if in_domain else "cross-domain")


def ensemble_evaluation(members: list[Evaluation], name: str = "ensemble") -> Evaluation:
    """Score the mean of several heads' probabilities (after their TTA, if any) as one more head.

    Members must score the same rows with the same age groups (else ValueError);
    each may use its own backbones and feature kind. Ages are averaged when
    every member predicts one.
    """
    if len(members) < 2:
        raise ValueError("an ensemble needs at least two checkpoints")
    first = members[0]
    for ev in members[1:]:
        if list(ev.meta["class_names"]) != list(first.meta["class_names"]):
            raise ValueError(f"{ev.checkpoint_path} predicts groups {list(ev.meta['class_names'])}, "
                             f"{first.checkpoint_path} predicts {list(first.meta['class_names'])}")
        if ev.paths != first.paths:
            raise ValueError(f"{ev.checkpoint_path} and {first.checkpoint_path} were scored on different rows")
    probs = np.mean([ev.probs for ev in members], axis=0)
    metrics = classification_metrics(first.y_true, probs, list(first.meta["class_names"]))
    metrics["mae"] = metrics["mean_age_error"] = None
    ages_pred = None
    if all(ev.ages_pred is not None for ev in members):
        ages_pred = np.mean([ev.ages_pred for ev in members], axis=0)
        known = np.asarray(first.ages_true) >= 0  # as evaluate_checkpoint: group-only rows (age -1) have no age
        if known.any():
            am = age_metrics(np.asarray(first.ages_true)[known], ages_pred[known])
            metrics["mae"], metrics["mean_age_error"] = am["mae"], am["mean_error"]
    backbones = list(dict.fromkeys(b for ev in members for b in ev.meta["backbones"]))
    kinds = list(dict.fromkeys(str(ev.meta.get("feature_kind")) for ev in members))
    meta = {
        "backbones": backbones,
        # Members may use other weights for the same backbone: list each id once.
        "weights": {b: ", ".join(dict.fromkeys(str(ev.meta["weights"][b]) for ev in members
                                               if b in ev.meta.get("weights", {})))
                    for b in backbones},
        "feature_kind": "+".join(kinds),
        "target": "+".join(dict.fromkeys(ev.meta.get("target", "group") for ev in members)),
        "class_names": list(first.meta["class_names"]),
        "group_edges": list(first.meta["group_edges"]),
        "members": [ev.checkpoint_path for ev in members],
    }
    # The members' own warnings stand on their rows; repeating them here would print them twice.
    return Evaluation(name=name, checkpoint_path=" + ".join(ev.checkpoint_path for ev in members), meta=meta,
                      split=first.split, tta=first.tta, metrics=metrics, paths=list(first.paths),
                      y_true=first.y_true, probs=probs, ages_true=first.ages_true, ages_pred=ages_pred,
                      features=first.features, dataset=first.dataset,
                      domain="+".join(dict.fromkeys(ev.domain for ev in members)))
