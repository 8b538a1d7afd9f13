"""Pictures of maps: a map blended over its image, a titled overlay PNG, and the grid figure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cam import upsample


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


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


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
        draw.text((2, 2 + i * (size + 3)), line, fill=(0, 0, 0), font=_font(size))
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

    from .figures import save_figure

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


def annotate_faces(rgb: np.ndarray, boxes: Sequence[Sequence[float]], labels: Sequence[str]) -> np.ndarray:
    """HxWx3 uint8: the picture with each face's box drawn and its label written above it (predict --faces)."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(canvas)
    height, width = rgb.shape[:2]
    line = max(2, round(max(height, width) / 300))
    for (x0, y0, x1, y1), label in zip(boxes, labels):
        size = max(10, round((y1 - y0) / 6))
        font = _font(size)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=line)
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        ty = y0 - (bottom - top) - 2 * line if y0 - (bottom - top) - 2 * line >= 0 else y1 + line
        draw.rectangle([x0, ty, x0 + (right - left) + 2 * line, ty + (bottom - top) + 2 * line], fill=(255, 40, 40))
        draw.text((x0 + line, ty + line - (top - y0)), label, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)
