"""Evaluation numbers, and scoring a trained head on the cached features.

The metric functions are pure: arrays in, a dict of plain Python numbers out
(JSON-ready; a value that is undefined, such as the precision of a group that
is never predicted, is None, never NaN). They use scikit-learn's definitions:

- accuracy, balanced accuracy (mean per-group recall over the groups present
  in y_true), macro-F1 (over the groups in y_true or y_pred);
- per-group precision / recall / F1 / support;
- off-by-one accuracy: share of rows with |predicted group - true group| <= 1,
  which counts a neighbouring age group as right (groups are ordered);
- expected calibration error (ECE) with 15 equal-width confidence bins:
  confidence = the largest class probability; bin b holds the rows with
  confidence in (b/15, (b+1)/15] (bin 0 also takes confidence 0);
  ECE = sum over bins of (rows in bin / all rows) * |accuracy(bin) - mean confidence(bin)|;
- MAE in years, for heads that regress age.

The prediction is the argmax of the probabilities (the first group on a tie).
With test-time augmentation (TTA) the probabilities of the plain and the
mirrored view are averaged before anything is computed; both views are
already in the feature file, so TTA costs one more head pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    precision_recall_fscore_support,
)

from .labels import describe_label_source

N_BINS = 15


# --------------------------------------------------------------------------- pure metrics


def _none_if_nan(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def predictions(y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(predicted group, confidence) of each row of [N, C] probabilities."""
    y_prob = np.asarray(y_prob, dtype=np.float64)
    return y_prob.argmax(axis=1), y_prob.max(axis=1)


def off_by_one_accuracy(y_true, y_pred) -> float:
    """Share of rows whose predicted group is the true one or a neighbour."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(np.abs(y_pred.astype(np.int64) - y_true.astype(np.int64)) <= 1))


def calibration_bins(y_true, y_prob, n_bins: int = N_BINS) -> dict:
    """Per-bin row count, accuracy and mean confidence (None for empty bins), plus ECE.

    Bins are equal-width on confidence: (b/n, (b+1)/n], bin 0 closed at 0.
    """
    y_true = np.asarray(y_true)
    y_pred, conf = predictions(y_prob)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True: a confidence exactly on an edge belongs to the bin below it.
    which = np.digitize(conf, edges[1:-1], right=True)
    correct = (y_pred == y_true).astype(np.float64)
    count, accuracy, confidence = [], [], []
    ece = 0.0
    for b in range(n_bins):
        inside = which == b
        n = int(inside.sum())
        count.append(n)
        if n == 0:
            accuracy.append(None)
            confidence.append(None)
            continue
        acc_b, conf_b = float(correct[inside].mean()), float(conf[inside].mean())
        accuracy.append(acc_b)
        confidence.append(conf_b)
        ece += n / len(y_true) * abs(acc_b - conf_b)
    return {"edges": edges.tolist(), "count": count, "accuracy": accuracy, "confidence": confidence,
            "ece": float(ece)}


def expected_calibration_error(y_true, y_prob, n_bins: int = N_BINS) -> float:
    return calibration_bins(y_true, y_prob, n_bins)["ece"]


def classification_metrics(y_true, y_prob, class_names: list[str], n_bins: int = N_BINS) -> dict:
    """Every group-level number for one set of predictions. y_prob: [N, C] probabilities."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_prob = np.asarray(y_prob, dtype=np.float64)
    n_classes = len(class_names)
    if y_prob.ndim != 2 or y_prob.shape[1] != n_classes:
        raise ValueError(f"probabilities have shape {y_prob.shape}; expected [N, {n_classes}]")
    if len(y_true) != len(y_prob):
        raise ValueError(f"{len(y_true)} labels but {len(y_prob)} rows of probabilities")
    if len(y_true) == 0:
        raise ValueError("no rows to evaluate")
    y_pred, _ = predictions(y_prob)
    labels = list(range(n_classes))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=np.nan)
    bins = calibration_bins(y_true, y_prob, n_bins)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        "off_by_one": off_by_one_accuracy(y_true, y_pred),
        "ece": bins["ece"],
        "per_group": {
            name: {"precision": _none_if_nan(precision[i]), "recall": _none_if_nan(recall[i]),
                   "f1": _none_if_nan(f1[i]), "support": int(support[i])}
            for i, name in enumerate(class_names)
        },
        "confusion": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "calibration": bins,
    }


def age_metrics(age_true, age_pred) -> dict:
    """MAE in years (and the mean signed error, which shows a bias toward young or old)."""
    age_true = np.asarray(age_true, dtype=np.float64)
    age_pred = np.asarray(age_pred, dtype=np.float64)
    return {"mae": float(mean_absolute_error(age_true, age_pred)),
            "mean_error": float(np.mean(age_pred - age_true))}


def combine_views(per_view, tta: bool) -> np.ndarray:
    """[N, 2, ...] per-view values -> [N, ...]: the plain view, or with TTA the mean of both views."""
    per_view = np.asarray(per_view)
    if per_view.ndim < 2 or per_view.shape[1] != 2:
        raise ValueError(f"expected [N, 2, ...] (plain, mirrored), got shape {per_view.shape}")
    return per_view.mean(axis=1) if tta else per_view[:, 0]


# --------------------------------------------------------------------------- scoring a checkpoint


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


def calibration_summary(head, features, groups, batch_size: int = 8192) -> dict:
    """ECE and NLL of a head's probabilities on [N, D] raw features, before and after its temperature scaling.

    For train-head's summary: the validation split, on which the temperature was fitted.
    """
    import torch

    from .calibration import negative_log_likelihood

    before, after = [], []
    head = head.eval()
    with torch.no_grad():
        for lo in range(0, len(features), batch_size):
            chunk = features[lo:lo + batch_size].float().cpu()
            before.append(head.uncalibrated(chunk).double())
            after.append(head(chunk).double())
    groups = torch.as_tensor(groups).long().cpu()
    summary = {"temperature": float(head.calibration_temperature)}
    for name, scores in (("before", torch.cat(before)), ("after", torch.cat(after))):
        summary[f"val_ece_{name}"] = expected_calibration_error(groups.numpy(), torch.log_softmax(scores, 1).exp().numpy())
        summary[f"val_nll_{name}"] = negative_log_likelihood(scores, groups)
    return summary


class FeatureInputs:
    """Head inputs from one feature file, shared by the checkpoints of one run.

    Features are read once per (backbone, kind) and only the scored rows are kept.
    """

    def __init__(self, feature_file: Path):
        from .store import read_meta, read_settings

        self.path = Path(feature_file)
        self.settings = read_settings(self.path)
        self.meta = read_meta(self.path)
        self.dataset = describe_label_source(self.settings)
        self._cache: dict[tuple, np.ndarray] = {}

    def splits(self, split_file: Path | None = None) -> np.ndarray:
        """Each row's split: the file's own, or the split file's ('' where it does not list the row)."""
        from .heads import effective_splits

        return effective_splits(self.path, split_file)

    def rows(self, backbones: list[str], kind: str, rows: np.ndarray) -> np.ndarray:
        """[len(rows), 2, D_total]: per backbone in order, its features of `kind`, concatenated.

        The layout of heads.load_features, which training uses.
        """
        from .store import read_features

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
    from .heads import rows_fingerprint

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
    from .store import read_meta

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
    from .heads import rows_fingerprint

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
    dataset: str = ""                              # where its labels came from (dataset_description)
    domain: str = "in-domain"                      # in-domain (the head's own data) or cross-domain

    def summary(self) -> dict:
        """The JSON-ready record of this evaluation."""
        from .heads import calibration_temperature

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

    Raises heads.HeadMismatch (a ValueError) if the checkpoint was trained on
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
    probs = combine_views(prob_views, tta)
    y_true = inputs.meta["group"][rows]
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


# --------------------------------------------------------------------------- comparison table


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def paper_accuracy(meta: dict) -> float | None:
    """The paper's test accuracy for a comparable head: one backbone, last-stage features, default groups."""
    from .constants import DEFAULT_GROUP_EDGES, PAPER_TEST_ACCURACY

    if len(meta["backbones"]) != 1 or list(meta["group_edges"]) != list(DEFAULT_GROUP_EDGES) or "members" in meta:
        return None
    return PAPER_TEST_ACCURACY.get(meta["backbones"][0])


COLUMNS = ("checkpoint", "backbones", "features", "split", "data", "domain", "n", "accuracy %", "paper accuracy %",
           "balanced acc %", "macro-F1 %", "off-by-one %", "ECE %", "MAE (years)")


def table_rows(evaluations: list[Evaluation]) -> list[list[str]]:
    rows = []
    for ev in evaluations:
        m, s = ev.metrics, ev.meta
        paper = paper_accuracy(s)
        rows.append([
            ev.name, "+".join(s["backbones"]), str(s.get("feature_kind")), ev.split + (" +TTA" if ev.tta else ""),
            Path(ev.features).name if ev.features else "—", ev.domain, str(m["n"]), _pct(m["accuracy"]), _pct(paper), _pct(m["balanced_accuracy"]), _pct(m["macro_f1"]),
            _pct(m["off_by_one"]), _pct(m["ece"]), "—" if m["mae"] is None else f"{m['mae']:.2f}",
        ])
    return rows


def comparison_markdown(evaluations: list[Evaluation], feature_file, split_source: str) -> str:
    """The Markdown comparison table across checkpoints, with the paper's Table 1 beside ours.

    feature_file: one path, or several (cross-dataset evaluation: each row names its file in `data`
    and says whether it is the head's own data, in-domain, or another data set, cross-domain).
    """
    files = [feature_file] if isinstance(feature_file, (str, Path)) else list(feature_file)
    datasets = {}
    for ev in evaluations:
        datasets.setdefault(ev.features, ev.dataset)
    lines = ["# Age-group evaluation", ""]
    if len(files) == 1:
        lines.append(f"Features: `{files[0]}`; rows: {split_source}.")
    else:
        lines.append(f"Rows: {split_source}. Feature files (column `data`):")
        lines += [f"- `{f}`: {datasets.get(str(f), '')}" for f in files]
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(evaluations)]
    lines += [
        "",
        "Paper accuracy: Table 1 of the paper (frozen backbone, last-stage features, 4 groups, its own random "
        "70/15/15 test split), shown for single-backbone heads on the default groups, else —.",
        f"ECE: {N_BINS} equal-width confidence bins. Off-by-one: predicted group is the true one or a neighbour. "
        "Balanced acc: mean per-group recall. +TTA: plain and mirrored views' probabilities averaged.",
        "Domain: in-domain = the head's own training data (same feature file, or the same rows, labels and "
        "splits); cross-domain = another data set.",
        "",
    ]
    for ev in evaluations:
        for warning in ev.warnings:
            lines.append(f"- Warning ({ev.name}): {warning}")
    return "\n".join(lines).rstrip() + "\n"


def terminal_table(evaluations: list[Evaluation]) -> str:
    """A compact fixed-width table for the terminal."""
    cols = ("checkpoint", "split", "data", "n", "acc%", "paper%", "bal%", "F1%", "±1%", "ECE%", "MAE")
    picks = (0, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13)
    rows = [[row[i] for i in picks] for row in table_rows(evaluations)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])
