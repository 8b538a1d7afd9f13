"""Small writers of test images, good and bad, for any test that reads image files.

Each writer takes a target path and returns it, so a test can build a folder of
odd inputs in a few lines. Pixel arrays are HxWx3 uint8 RGB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# How PIL must transpose the upright picture so that a viewer applying the
# EXIF orientation shows it upright again (the inverse of exif_transpose).
_STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}
EXIF_ORIENTATION_TAG = 0x0112


def asymmetric_rgb(height: int = 120, width: int = 90) -> np.ndarray:
    """Smooth gradients plus a red block in the top-left corner: no flip or turn of it looks the same."""
    rows, cols = np.mgrid[0:height, 0:width]
    rgb = np.stack(
        [cols * 255 // max(width - 1, 1), rows * 255 // max(height - 1, 1), (rows + cols) * 127 // (height + width)],
        axis=-1,
    ).astype(np.uint8)
    rgb[: height // 4, : width // 4] = (255, 0, 0)
    return rgb


def solid_rgb(colour: tuple[int, int, int], height: int = 64, width: int = 48) -> np.ndarray:
    return np.full((height, width, 3), colour, dtype=np.uint8)


def jpeg_bytes(rgb: np.ndarray, mode: str = "RGB", quality: int = 95) -> bytes:
    """Encode in memory; mode 'L' gives a grayscale JPEG, 'CMYK' an Adobe CMYK JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def write_jpeg(path: Path, rgb: np.ndarray, mode: str = "RGB", quality: int = 95) -> Path:
    path.write_bytes(jpeg_bytes(rgb, mode, quality))
    return path


def write_png(path: Path, rgb: np.ndarray, mode: str = "RGB") -> Path:
    """mode 'RGBA' adds an opaque alpha channel; 'P' stores a 256-colour palette image (no dithering)."""
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        image.putalpha(255)
    elif mode == "P":
        image = image.quantize(256, dither=Image.Dither.NONE)
    elif mode != "RGB":
        image = image.convert(mode)
    image.save(path, "PNG")
    return path


def write_exif_rotated_jpeg(path: Path, upright_rgb: np.ndarray, orientation: int, quality: int = 95) -> Path:
    """Store the pixels turned so that applying the EXIF `orientation` (2..8) gives `upright_rgb` back."""
    stored = Image.fromarray(upright_rgb).transpose(_STORE_FOR_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    stored.save(path, "JPEG", quality=quality, exif=exif.tobytes())
    return path


def truncate_file(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut a file short in place, as an interrupted copy or download leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def write_truncated_jpeg(path: Path, rgb: np.ndarray, keep_fraction: float = 0.6) -> Path:
    return truncate_file(write_jpeg(path, rgb), keep_fraction)


def write_corrupt_jpeg(path: Path, rgb: np.ndarray) -> Path:
    """Start and end markers intact, the headers between them zeroed: only a real decode finds out."""
    data = bytearray(jpeg_bytes(rgb))
    middle = len(data) // 2
    data[3:middle] = bytes(middle - 3)
    path.write_bytes(bytes(data))
    return path


def write_garbage(path: Path, size: int = 2048, seed: int = 0) -> Path:
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes())
    return path


def write_empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_text(path: Path, text: str = "not an image at all\n") -> Path:
    """A text file, whatever its name says."""
    path.write_text(text)
    return path
