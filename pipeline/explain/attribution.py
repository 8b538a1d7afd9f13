"""Numbers for where a saliency map looks: face focus and deletion faithfulness.

Pure functions on arrays, plus `deletion_curves`, which only needs a callable from images to probabilities.
Face focus is the share of a map's mass inside FACE_REGION, a fixed ellipse in normalized picture
coordinates that holds eyes, brows, nose, mouth and chin of UTKFace's aligned crops and leaves out hair,
ears, neck and background; its area share (~0.40) is the chance level. A fixed region is reproducible and
needs no detector, but fits aligned crops only. Deletion removes pixels (set to the ImageNet mean colour)
most-attended first and compares the area under the probability curve with that of a random map on the
same picture: gap = AUC(random) - AUC(map) > 0 for a faithful map. The random map is coarse-grid noise
upsampled like a Grad-CAM map, so both orders remove blobs of the same kind: a random pixel order is no
fair baseline, as scattered pixels wreck the whole picture at once. Ties are broken at random.
See benchmarks/RESULTS.md for how the ellipse was chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FaceRegion:
    """An ellipse in normalized coordinates (0..1 across the width and down the height)."""
    cx: float = 0.50
    cy: float = 0.52
    rx: float = 0.32
    ry: float = 0.40

    @property
    def area(self) -> float:
        return math.pi * self.rx * self.ry

    def mask(self, height: int, width: int) -> np.ndarray:
        """[height, width] bool: pixel centres inside the ellipse."""
        y = (np.arange(height) + 0.5) / height
        x = (np.arange(width) + 0.5) / width
        return ((x[None, :] - self.cx) / self.rx) ** 2 + ((y[:, None] - self.cy) / self.ry) ** 2 <= 1.0

    def describe(self) -> str:
        return (f"ellipse centred at ({self.cx:.2f}, {self.cy:.2f}) with semi-axes {self.rx:.2f} x {self.ry:.2f} "
                f"of the picture's width x height (area share {self.area:.3f})")


FACE_REGION = FaceRegion()


def face_focus(cam: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Share of map mass inside the mask: cam [..., H, W] (non-negative), mask [H, W] -> [...]; NaN if empty."""
    cam = np.asarray(cam, dtype=np.float64)
    if cam.shape[-2:] != mask.shape:
        raise ValueError(f"map {cam.shape[-2:]} and mask {mask.shape} differ in size")
    if (cam < 0).any():
        raise ValueError("face focus needs non-negative maps (Grad-CAM after ReLU)")
    total = cam.sum(axis=(-2, -1))
    inside = (cam * mask).sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def deletion_order(cam: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Flat pixel indices, highest map value first; equal values in random order."""
    flat = np.asarray(cam, dtype=np.float64).ravel()
    return np.lexsort((rng.random(flat.size), -flat))


def random_map(grid: tuple[int, int], height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """[height, width]: uniform random values on a coarse grid, upsampled bilinearly like a Grad-CAM map."""
    coarse = torch.from_numpy(rng.random(grid, dtype=np.float32))[None, None]
    return F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0, 0].numpy()


def fractions(steps: int) -> np.ndarray:
    """0, 1/steps, ..., 1."""
    return np.linspace(0.0, 1.0, steps + 1)


def curve_auc(probs: np.ndarray, steps_x: np.ndarray | None = None) -> np.ndarray:
    """Trapezoid area under probability curves [..., K] over x in [0, 1] (default: K equal steps)."""
    probs = np.asarray(probs, dtype=np.float64)
    x = fractions(probs.shape[-1] - 1) if steps_x is None else np.asarray(steps_x, np.float64)
    return ((probs[..., 1:] + probs[..., :-1]) * np.diff(x) / 2.0).sum(axis=-1)


def deleted_images(x: torch.Tensor, order: np.ndarray, counts: np.ndarray, fill: float = 0.0) -> torch.Tensor:
    """[K, C, H, W]: x [C, H, W] with the first counts[k] pixels of `order` set to `fill` in every channel."""
    c, h, w = x.shape
    rank = torch.empty(h * w, dtype=torch.long)
    rank[torch.from_numpy(np.ascontiguousarray(order, dtype=np.int64))] = torch.arange(h * w)
    rank = rank.view(1, 1, h, w).to(x.device)
    counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.long, device=x.device).view(-1, 1, 1, 1)
    removed = rank < counts_t  # [K, 1, H, W]
    return torch.where(removed, torch.as_tensor(fill, dtype=x.dtype, device=x.device), x.unsqueeze(0))


def deletion_curves(predict_proba: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                    orders: list[np.ndarray], target: np.ndarray, steps: int = 10,
                    intact: np.ndarray | None = None, emptied: np.ndarray | None = None,
                    batch_size: int = 32, fill: float = 0.0) -> np.ndarray:
    """Target-group probability as pixels are removed in each image's order.

    x [B, 3, H, W]; orders: B flat orders; target [B]. Returns [B, steps + 1].
    `intact` [B] (probability before any removal) and `emptied` [B] (all
    pixels removed) may be passed to save two passes: they do not depend on the order.
    """
    b, _, h, w = x.shape
    counts = np.round(fractions(steps) * h * w).astype(np.int64)
    inner = counts[1:-1]
    target = np.asarray(target)
    curves = np.zeros((b, steps + 1), dtype=np.float64)
    # Perturbed pictures are made one batch at a time, so memory does not grow with steps.
    jobs = [(i, k) for i in range(b) for k in range(len(inner))]
    for lo in range(0, len(jobs), batch_size):
        chunk = jobs[lo:lo + batch_size]
        images = torch.cat([deleted_images(x[i], orders[i], inner[k:k + 1], fill) for i, k in chunk])
        probs = predict_proba(images).detach().float().cpu().numpy()
        for (i, k), p in zip(chunk, probs):
            curves[i, k + 1] = p[target[i]]
    ends = []
    for value, blank in ((intact, False), (emptied, True)):
        if value is None:
            batch = torch.full_like(x, fill) if blank else x
            value = predict_proba(batch).detach().float().cpu().numpy()[np.arange(b), target]
        ends.append(np.asarray(value, dtype=np.float64))
    curves[:, 0], curves[:, -1] = ends
    return curves


# --------------------------------------------------------------------------- summaries


def _mean(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else None


def _sem(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None


def summarize(focus: np.ndarray, auc_map: np.ndarray, auc_random: np.ndarray, correct: np.ndarray) -> dict:
    """Per subset (all / correct / wrong): n, face focus mean, median, sem; AUCs and their gap."""
    out = {}
    for subset, rows in (("all", np.ones(len(correct), bool)), ("correct", correct), ("wrong", ~correct)):
        gap = np.asarray(auc_random)[rows] - np.asarray(auc_map)[rows]
        f = np.asarray(focus)[rows]
        finite = f[np.isfinite(f)]
        out[subset] = {
            "n": int(rows.sum()),
            "face_focus_mean": _mean(f),
            "face_focus_median": float(np.median(finite)) if len(finite) else None,
            "face_focus_sem": _sem(f),
            "empty_maps": int((~np.isfinite(f)).sum()),
            "deletion_auc": _mean(np.asarray(auc_map)[rows]),
            "random_auc": _mean(np.asarray(auc_random)[rows]),
            "auc_gap": _mean(gap),
            "auc_gap_sem": _sem(gap),
        }
    return out
