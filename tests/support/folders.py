"""Folders of UTKFace-named pictures made by the test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def face_like(seed: int, size: int = 200) -> np.ndarray:
    """A smooth random picture: a bright ellipse on a gradient, varied by seed."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    base = np.stack([rows, cols, (rows + cols) / 2], axis=-1) * rng.uniform(40, 120, size=3)
    cy, cx = rng.uniform(0.4, 0.6, size=2)
    face = ((rows - cy) / 0.35) ** 2 + ((cols - cx) / 0.28) ** 2 < 1
    base[face] += rng.uniform(80, 140, size=3)
    base += rng.normal(0, 6, size=base.shape)
    return np.clip(base, 0, 255).astype(np.uint8)


def write_utk_folder(folder: Path, ages, start_seed: int = 0) -> list[Path]:
    """JPEGs named like UTKFace crops, one per age, with distinct pictures."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, age in enumerate(ages):
        path = folder / f"{age}_{i % 2}_{i % 5}_20170109{i:09d}.jpg.chip.jpg"
        Image.fromarray(face_like(start_seed + i)).save(path, quality=92)
        paths.append(path)
    return paths
