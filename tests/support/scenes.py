"""Scenes for face tests and benchmarks/faces.py: aligned face crops pasted into larger pictures.

The paste transform is known exactly, so a detector + aligner can be checked:
the aligned crop it cuts out should map back onto the pasted crop.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.faces.detect import crop_to_picture, paste_back


def background(height: int, width: int, seed: int) -> np.ndarray:
    """A face-free picture: smooth colour gradients, a few blurred blocks and discs, sensor-like noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([rows / height * rng.uniform(40, 160) + cols / width * rng.uniform(0, 80) + rng.uniform(0, 60)
                     for _ in range(3)], axis=-1)
    picture = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    for _ in range(rng.integers(3, 8)):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        w, h = rng.uniform(20, width / 3), rng.uniform(20, height / 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.rectangle if rng.random() < 0.6 else draw.ellipse)([x, y, x + w, y + h], fill=colour)
    picture = picture.filter(ImageFilter.GaussianBlur(2))
    noisy = np.asarray(picture, np.float32) + rng.normal(0, 4, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def paste(scene: np.ndarray, crop: np.ndarray, centre: tuple[float, float], side: float,
          angle_degrees: float) -> np.ndarray:
    """Paste `crop` into `scene` (in place) as a square of `side` pixels centred at `centre`, turned by
    `angle_degrees` (clockwise on screen, as image y points down). Returns the [2, 3] crop->scene map of the
    original crop's coordinates."""
    size = crop.shape[0]
    angle = math.radians(angle_degrees)
    # Shrink (antialiased) to about the pasted size first, so small pastes do not alias.
    pasted_size = max(8, int(round(side)))
    resized = np.asarray(Image.fromarray(crop).resize((pasted_size, pasted_size), Image.Resampling.BILINEAR,
                                                      reducing_gap=None))
    values, inside = paste_back(scene, resized.astype(np.float32), crop_to_picture(np.asarray(centre), side, angle,
                                                                                     pasted_size))
    scene[inside] = np.clip(values[inside], 0, 255).round().astype(np.uint8)
    return crop_to_picture(np.asarray(centre, np.float64), side, angle, size)


def crop_geometry(to_picture: np.ndarray, size: int) -> tuple[np.ndarray, float, float]:
    """(centre (x, y), side, angle in degrees) of a crop->picture map."""
    centre = to_picture[:, :2] @ np.array([size / 2, size / 2]) + to_picture[:, 2]
    scale = math.hypot(to_picture[0, 0], to_picture[1, 0])
    return centre, scale * size, math.degrees(math.atan2(to_picture[1, 0], to_picture[0, 0]))
