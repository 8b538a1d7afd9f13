"""Pure metrics on predictions: accuracy, balanced accuracy, off-by-one, calibration, age errors."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    precision_recall_fscore_support,
)

from pipeline.heads.calibration import N_BINS, calibration_bins, predictions


def _none_if_nan(x) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def off_by_one_accuracy(y_true, y_pred) -> float:
    """Share of rows whose predicted group is the true one or a neighbour."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(np.abs(y_pred.astype(np.int64) - y_true.astype(np.int64)) <= 1))


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
