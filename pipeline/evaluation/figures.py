"""PNG figures for evaluate: confusion matrices, training curves, reliability diagram.

Figures are drawn with matplotlib's object interface on the Agg canvas (no
pyplot, so no global state and no display is ever needed).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.files import write_bytes_atomically

DPI = 120


def save_figure(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Write a Figure made without pyplot as PNG, creating the folder; the file is replaced whole (atomically)."""
    FigureCanvasAgg(fig)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=dpi, format="png")
    write_bytes_atomically(path, buffer.getvalue())
    return path


def confusion_figure(confusion, class_names: list[str], path: Path, title: str = "") -> Path:
    """Two panels: counts, and each row divided by its total (recall on the diagonal)."""
    counts = np.asarray(confusion, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        normalized = np.where(totals > 0, counts / np.maximum(totals, 1), np.nan)
    k = len(class_names)
    size = max(4.0, 0.9 * k + 2.0)
    fig = Figure(figsize=(2 * size + 1.5, size + 0.6), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((counts, "Counts", "{:d}"), (normalized, "Row-normalized (recall on diagonal)", "{:.2f}"))
    for ax, (values, subtitle, fmt) in zip(axes, panels):
        shown = np.nan_to_num(values.astype(np.float64), nan=0.0)
        vmax = shown.max() if shown.max() > 0 else 1.0
        image = ax.imshow(shown, cmap="Blues", vmin=0, vmax=vmax if values is counts else 1.0)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        for i in range(k):
            for j in range(k):
                v = values[i, j]
                text = "—" if isinstance(v, float) and np.isnan(v) else fmt.format(v.item())
                dark = shown[i, j] > 0.6 * (vmax if values is counts else 1.0)
                ax.text(j, i, text, ha="center", va="center", fontsize=10,
                        color="white" if dark else "black")
        ax.set_xticks(range(k), class_names, rotation=0)
        ax.set_yticks(range(k), class_names)
        ax.set_xlabel("predicted age group")
        ax.set_ylabel("true age group")
        ax.set_title(subtitle)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def _series(history: list[dict], key: str) -> tuple[list, list]:
    xs, ys = [], []
    for row in history:
        value = row.get(key)
        if value is not None and np.isfinite(value):
            xs.append(row.get("epoch", len(xs) + 1))
            ys.append(float(value))
    return xs, ys


def curves_figure(history: list[dict], best_epoch: int | None, path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch, train and val, with the kept (best-val) epoch marked."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        drawn = False
        for part, style in (("train", "-o"), ("val", "-s")):
            xs, ys = _series(history or [], f"{part}_{metric}")
            if xs:
                ax.plot(xs, ys, style, markersize=3, label=part)
                drawn = True
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1,
                       label=f"best epoch ({best_epoch})")
        if not drawn:
            ax.text(0.5, 0.5, "no training history in checkpoint", ha="center", va="center",
                    transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.set_title(label.capitalize())
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def reliability_figure(calibration: dict, path: Path, title: str = "") -> Path:
    """Accuracy per confidence bin as bars, the gap to the bin's mean confidence shaded, ECE in the title.

    calibration: scores.calibration_bins(...) output.
    """
    edges = np.asarray(calibration["edges"])
    lo, width = edges[:-1], np.diff(edges)
    count = np.asarray(calibration["count"])
    acc = np.array([np.nan if a is None else a for a in calibration["accuracy"]])
    conf = np.array([np.nan if c is None else c for c in calibration["confidence"]])
    filled = count > 0

    fig = Figure(figsize=(5.5, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    top.bar(lo[filled], acc[filled], width=width[filled], align="edge", color="tab:blue",
            edgecolor="black", linewidth=0.6, label="accuracy")
    # The gap: from the bar's top to the bin's mean confidence.
    # Hatched, unfilled, on top: readable whether the gap goes up (overconfident) or down into the bar.
    top.bar(lo[filled], conf[filled] - acc[filled], bottom=acc[filled], width=width[filled], align="edge",
            facecolor="none", edgecolor="tab:red", hatch="///", linewidth=0.8, zorder=3,
            label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize="small", framealpha=0.9)
    top.grid(alpha=0.3)
    top.set_title(f"{title + ': ' if title else ''}ECE = {100 * calibration['ece']:.2f}% "
                  f"({len(count)} bins)")
    bottom.bar(lo, count, width=width, align="edge", color="grey", edgecolor="black", linewidth=0.6)
    bottom.set_xlabel("confidence (largest group probability)")
    bottom.set_ylabel("images")
    bottom.grid(alpha=0.3)
    return save_figure(fig, path)
