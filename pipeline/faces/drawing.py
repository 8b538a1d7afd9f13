"""Draw the faces found in a picture: boxes and labels."""

from __future__ import annotations

from typing import Sequence

import numpy as np

# Written into every annotated copy (PNG "Software" text), so predict knows its own copies and never labels them.
ANNOTATED_MARK = "frozen-age predict: annotated copy"


def label_font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def annotate_faces(rgb: np.ndarray, boxes: Sequence[Sequence[float]], labels: Sequence[str]) -> np.ndarray:
    """HxWx3 uint8: the picture with each face's box drawn and its label written above it (predict --faces)."""
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(canvas)
    height, width = rgb.shape[:2]
    line = max(2, round(max(height, width) / 300))
    for (x0, y0, x1, y1), label in zip(boxes, labels):
        size = max(10, round((y1 - y0) / 6))
        font = label_font(size)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 40, 40), width=line)
        left, top, right, bottom = draw.textbbox((x0, y0), label, font=font)
        ty = y0 - (bottom - top) - 2 * line if y0 - (bottom - top) - 2 * line >= 0 else y1 + line
        draw.rectangle([x0, ty, x0 + (right - left) + 2 * line, ty + (bottom - top) + 2 * line], fill=(255, 40, 40))
        draw.text((x0 + line, ty + line - (top - y0)), label, fill=(255, 255, 255), font=font)
    return np.asarray(canvas)


def save_annotated(path, rgb: np.ndarray) -> None:
    """Save an annotated picture as PNG, marked (ANNOTATED_MARK) as predict's own output."""
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Software", ANNOTATED_MARK)
    Image.fromarray(rgb).save(path, pnginfo=info)
