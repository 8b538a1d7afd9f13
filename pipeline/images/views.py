"""One image to its two normalized views (plain and mirrored), and the batch record every decoder returns."""

from __future__ import annotations

import io
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from pipeline.images.checks import (
    DEFAULT_MAX_PIXELS,
    ImageProblem,
    checked_header,
    read_image_file,
)


@dataclass
class DecodedBatch:
    views: torch.Tensor  # [B_ok, 2, 3, S, S] float32 on the decoder's device; [:, 0] plain, [:, 1] mirrored
    kept: list[int]  # positions in the input list that decoded fine, in order
    failures: list[tuple[str, str]]  # (path as given, human-readable reason)
    # (path as given, why) for kept files a GPU decoder could not take and handed to the CPU decoder
    fallbacks: list[tuple[str, str]] = field(default_factory=list)


class Decoder(Protocol):
    name: str  # "dali-gpu" | "dali-cpu" | "torch-gpu" | "torch-cpu"
    device: torch.device

    def decode(self, paths: Sequence[str | Path]) -> DecodedBatch: ...


def read_checked(paths: Sequence[str | Path], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 pool: ThreadPoolExecutor | None = None) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
    """(positions, image bytes) of the files worth decoding, and a failure reason by position for the rest.

    The bytes stop at the image's end marker: trailing data never reaches a decoder. With a
    pool, files are read and checked side by side, so slow reads and the checks overlap.
    """
    checked = (pool.map if pool else map)(lambda path: _read_one(path, max_pixels), paths)
    positions, encoded, reasons = [], [], {}
    for position, result in enumerate(checked):
        if isinstance(result, str):
            reasons[position] = result
        else:
            positions.append(position)
            encoded.append(result)
    return positions, encoded, reasons


def _read_one(path: str | Path, max_pixels: int | None) -> np.ndarray | str:
    """A file's image bytes, or why it will not be decoded."""
    try:
        data = read_image_file(path)
    except ImageProblem as problem:
        return problem.reason
    except OSError as error:
        return f"cannot read: {error.strerror or error}"
    header = checked_header(data, max_pixels)
    return f"cannot decode: {header}" if isinstance(header, str) else data[: header.end]


def batch_result(paths: Sequence[str | Path], kept: list[int], views: torch.Tensor,
           reasons: dict[int, str], fallbacks: list[tuple[str, str]] | None = None) -> DecodedBatch:
    failures = [(str(paths[position]), reasons[position]) for position in sorted(reasons)]
    return DecodedBatch(views=views, kept=kept, failures=failures, fallbacks=fallbacks or [])


def no_views(device: torch.device) -> torch.Tensor:
    return torch.empty((0, 2, 3, IMAGE_SIZE, IMAGE_SIZE), device=device)


def concat_views(views: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat, without its copy in the usual case of a single part (~80 MB for 64 images)."""
    if len(views) == 1:
        return views[0]
    return torch.cat(views) if views else no_views(device)


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: honours container and taskset limits
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_rgb(path: str | Path, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB, EXIF orientation applied: the picture as a viewer shows it.

    The decoders' file checks come first (ImageProblem names the file and the reason), and a
    16-bit PNG is scaled to 8 bits as the decoders do it (PIL would clip 16-bit gray at 255).
    """
    try:
        data = read_image_file(path)
    except OSError as error:
        raise ImageProblem(path, f"cannot read: {error.strerror or error}") from error
    header = checked_header(data, max_pixels)
    if isinstance(header, str):
        raise ImageProblem(path, f"cannot decode: {header}")
    data = data[: header.end]
    if header.bit_depth == 16:
        decoded = decode_on_cpu(data)
        if isinstance(decoded, str):
            raise ImageProblem(path, decoded)
        return decoded.permute(1, 2, 0).numpy()
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return np.array(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # the last: max_pixels above PIL's own
        raise ImageProblem(path, f"cannot decode: {error}") from error


def preprocess_rgb(images: list[np.ndarray] | torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """[B, 3, S, S] plain views from uint8 RGB pixels (HxWx3 arrays, or one [B, H, W, 3] tensor).

    The torch decoders' math, so Grad-CAM inputs match the cached features.
    """
    if isinstance(images, torch.Tensor):
        pixels = list(images)
    else:
        pixels = [torch.from_numpy(np.ascontiguousarray(image)) for image in images]
    for image in pixels:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"expected HxWx3 uint8 RGB pixels, got {tuple(image.shape)} {image.dtype}")
    if not pixels:
        return torch.empty((0, 3, IMAGE_SIZE, IMAGE_SIZE), device=device)
    return resize_normalize([image.to(device).permute(2, 0, 1) for image in pixels]).contiguous()


def resize_normalize(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, 3, S, S] float32 from uint8 CHW RGB images of any sizes, all on one device.

    The result is stored channels-last: torch's bilinear kernel runs faster on CPU that
    way, and decoders hand out CHW views of HWC buffers, so stacking them as HWC copies plainly.
    """
    device = images[0].device
    out = torch.empty((len(images), 3, IMAGE_SIZE, IMAGE_SIZE), device=device, memory_format=torch.channels_last)
    by_size = defaultdict(list)
    for index, image in enumerate(images):
        by_size[tuple(image.shape[-2:])].append(index)
    for (height, width), indices in by_size.items():
        pixels = torch.stack([images[index].permute(1, 2, 0) for index in indices]).permute(0, 3, 1, 2).float()
        # Antialiasing changes nothing when enlarging, and torch's antialiased kernel is
        # slower on CPU, so ask for it only when shrinking (UTKFace's 200 px enlarge).
        shrinking = height > IMAGE_SIZE or width > IMAGE_SIZE
        out[indices] = F.interpolate(pixels, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                     align_corners=False, antialias=shrinking)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return out.mul_(1.0 / (255.0 * std)).sub_(mean / std)


def with_mirror(plain: torch.Tensor) -> torch.Tensor:
    """[B, 2, 3, S, S] contiguous: each plain view followed by its mirror image (flipped along the width)."""
    views = torch.empty((len(plain), 2, *plain.shape[1:]), device=plain.device)
    views[:, 0] = plain
    views[:, 1] = plain.flip(-1)
    return views


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """8-bit pixels from torchvision's uint8 or uint16 (16-bit PNG) output: round(v * 255 / 65535), as DALI does."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype != torch.uint16:
        raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")
    return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def probe_jpeg() -> np.ndarray:
    """A 16x16 colour JPEG that every decoder takes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 40)).save(buffer, "JPEG", quality=90)
    return np.frombuffer(bytearray(buffer.getvalue()), dtype=np.uint8)


def decode_on_cpu(data: np.ndarray) -> torch.Tensor | str:
    """uint8 CHW RGB with EXIF orientation applied, or why the file did not decode."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        return "cannot decode: " + torchvision_reason(error)
    return to_uint8(image)


# torchvision prefixes "function, /path/source.cpp:line, "; the reader wants the rest, commas and all.
TORCHVISION_PREFIX = re.compile(r"^\w+, \S+\.(?:cpp|cu|cc|c|h|hpp):\d+, ")


def torchvision_reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return TORCHVISION_PREFIX.sub("", text) or type(error).__name__
