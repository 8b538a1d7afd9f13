"""Pictures of maps: a map blended over its image, a titled overlay PNG, and the grid figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.explain.cam import upsample
from pipeline.faces.drawing import label_font


def resize_map(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """One map [h, w] -> [height, width], bilinear."""
    return upsample(torch.from_numpy(np.asarray(cam, np.float32))[None], (height, width))[0].numpy()


def overlay_rgb(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8: the picture blended with the map (jet colours, scaled to its own maximum)."""
    from matplotlib import colormaps

    cam = np.asarray(cam, np.float32)
    if cam.shape != rgb.shape[:2]:
        cam = resize_map(cam, *rgb.shape[:2])
    top = float(cam.max())
    scaled = cam / top if top > 0 else np.zeros_like(cam)
    colours = colormaps["jet"](np.clip(scaled, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb.astype(np.float32) + alpha * colours, 0, 255).round().astype(np.uint8)


def title_band_height(width: int, lines: int) -> int:
    return lines * (max(10, width // 18) + 3) + 4


def save_overlay(path: Path, rgb: np.ndarray, cam: np.ndarray, title_lines: Sequence[str]) -> Path:
    """PNG of W x (band + H): a title band above the overlay, which keeps the picture's own size.

    The title also goes into the PNG's "Title" text field.
    """
    return save_titled(path, overlay_rgb(rgb, cam), title_lines)


def overlay_in_region(rgb: np.ndarray, cam: np.ndarray, inside: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8: the map blended over the picture only where `inside` is true (a face's crop pasted back),
    scaled to its maximum there; the rest of the picture is left as it is."""
    cam = np.where(inside, np.asarray(cam, np.float32), 0.0)
    blended = overlay_rgb(rgb, cam, alpha)
    return np.where(inside[..., None], blended, rgb)


def save_titled(path: Path, picture: np.ndarray, title_lines: Sequence[str]) -> Path:
    """PNG of W x (band + H): a title band above an HxWx3 uint8 picture (also in the PNG's "Title" field)."""
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    height, width = picture.shape[:2]
    band = title_band_height(width, len(title_lines))
    canvas = Image.new("RGB", (width, band + height), (255, 255, 255))
    canvas.paste(Image.fromarray(np.ascontiguousarray(picture)), (0, band))
    draw = ImageDraw.Draw(canvas)
    size = max(10, width // 18)
    for i, line in enumerate(title_lines):
        draw.text((2, 2 + i * (size + 3)), line, fill=(0, 0, 0), font=label_font(size))
    info = PngInfo()
    info.add_text("Title", " | ".join(title_lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, "PNG", pnginfo=info)
    return path


@dataclass
class GridCell:
    overlay: np.ndarray   # HxWx3 uint8
    caption: str


def save_grid(path: Path, originals: list[np.ndarray], names: list[str], columns: list[str],
              cells: list[list[GridCell]]) -> Path:
    """Rows are images, the first column the picture, then one overlay per backbone (the paper's Figure 4)."""
    from matplotlib.figure import Figure

    from pipeline.evaluation.figures import save_figure

    rows, cols = len(originals), len(columns) + 1
    fig = Figure(figsize=(2.2 * cols, 2.3 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(originals[r])
        axes[r][0].set_ylabel(names[r][:28], fontsize=7)
        for c in range(cols - 1):
            axes[r][c + 1].imshow(cells[r][c].overlay)
            axes[r][c + 1].set_xlabel(cells[r][c].caption, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=9)
    for c, column in enumerate(columns):
        axes[0][c + 1].set_title(column, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=100)
