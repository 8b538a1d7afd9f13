"""Post-hoc temperature scaling: one scalar T > 0 that makes a trained head's group probabilities honest.

Guo et al. (2017): the probabilities become softmax(scores / T), with T fitted
on the validation split by minimizing the negative log-likelihood of the true
groups. Dividing by a positive T never changes the argmax, so accuracy stays
where it was and only the confidence (ECE, NLL) moves. A class-weighted loss
makes the rare groups' probabilities overconfident; a T fitted on validation
undoes most of that.

The NLL is convex in beta = 1/T (cross-entropy is convex in the logits, and the
logits are linear in beta), so its derivative is non-decreasing in beta and a
bisection on it finds the one minimum, deterministically, without a step size.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

METHODS = ("off", "temperature")
T_RANGE = (1e-2, 1e2)   # a temperature outside this range means the scores are broken, not miscalibrated
MIN_CALIBRATION_ROWS = 50   # fewer validation rows fit a temperature to noise (one row: ECE 37% -> 49%)


class CalibrationWarning(UserWarning):
    """A temperature was fitted on too few validation rows to be trusted."""


def negative_log_likelihood(scores: torch.Tensor, groups: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean NLL of the true groups under softmax(scores / temperature); scores [n, C], groups [n]."""
    logp = torch.log_softmax(scores.double() / temperature, dim=1)
    return float(-logp.gather(1, groups.long().view(-1, 1)).mean())


def _nll_slope(scores: torch.Tensor, groups: torch.Tensor, beta: float) -> float:
    """d NLL / d beta at beta = 1/T: the mean of E_p[score] - score of the true group."""
    p = torch.softmax(scores * beta, dim=1)
    return float(((p * scores).sum(1) - scores.gather(1, groups.view(-1, 1)).squeeze(1)).mean())


def fit_temperature(scores: torch.Tensor, groups: torch.Tensor, iterations: int = 64) -> float:
    """The T in T_RANGE that minimizes the NLL of softmax(scores / T) against groups (scores [n, C], groups [n]).

    Scores that carry no information about the groups (equal for every class) give T = 1.
    A minimum beyond the range ends at its edge.
    """
    if scores.dim() != 2 or scores.shape[0] != groups.shape[0] or scores.shape[0] == 0:
        raise ValueError(f"need scores [n, C] and groups [n] with n > 0, got {list(scores.shape)} and "
                         f"{list(groups.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores hold values that are not finite; cannot fit a temperature")
    if scores.shape[0] < MIN_CALIBRATION_ROWS:
        warnings.warn(f"the calibration temperature is fitted on only {scores.shape[0]} validation row(s) (fewer "
                      f"than {MIN_CALIBRATION_ROWS}): it can make the probabilities worse, not better; use a larger "
                      f"validation split, or --calibrate off", CalibrationWarning, stacklevel=2)
    scores, groups = scores.detach().double().cpu(), groups.detach().long().cpu()
    log_lo, log_hi = math.log(1 / T_RANGE[1]), math.log(1 / T_RANGE[0])   # in log beta
    slope_lo, slope_hi = _nll_slope(scores, groups, math.exp(log_lo)), _nll_slope(scores, groups, math.exp(log_hi))
    if slope_lo >= 0 and slope_hi <= 0:   # the slope never changes sign: the NLL is flat, any T is as good
        return 1.0
    if slope_lo >= 0:                    # the NLL grows from the smallest beta on: the largest T
        return T_RANGE[1]
    if slope_hi <= 0:                    # still falling at the largest beta: the smallest T
        return T_RANGE[0]
    for _ in range(iterations):          # 64 halvings of a log-range of 9.2: below float64 resolution
        middle = 0.5 * (log_lo + log_hi)
        if _nll_slope(scores, groups, math.exp(middle)) < 0:
            log_lo = middle
        else:
            log_hi = middle
    return 1.0 / math.exp(0.5 * (log_lo + log_hi))


def calibration_summary(head, features, groups, batch_size: int = 8192) -> dict:
    """ECE and NLL of a head's probabilities on [N, D] raw features, before and after its temperature scaling.

    For train-head's summary: the validation split, on which the temperature was fitted.
    """
    import torch

    from pipeline.heads.calibration import negative_log_likelihood

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


N_BINS = 15


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


def predictions(y_prob) -> tuple[np.ndarray, np.ndarray]:
    """(predicted group, confidence) of each row of [N, C] probabilities."""
    y_prob = np.asarray(y_prob, dtype=np.float64)
    return y_prob.argmax(axis=1), y_prob.max(axis=1)
