"""Turn image files into normalized tensors, two views each (plain and mirrored), for the frozen backbones.

Every image goes: decode to RGB uint8 (EXIF orientation applied) -> float -> resize to
IMAGE_SIZE x IMAGE_SIZE (bilinear, antialiased) -> /255 -> ImageNet mean/std. The float
conversion comes before the resize on every path, so no path rounds resized pixels to uint8.

Four decoders do this: DALI on GPU or CPU run the one graph built by `build_dali_pipeline`;
torch on GPU or CPU share `resize_normalize`. All four first apply the same file checks
(`encoded_problem`), so every path keeps and skips the same files:

* only JPEG and PNG are accepted, the formats every path decodes;
* a JPEG must end with its end-of-image marker FF D9 and a PNG with its IEND chunk, give or
  take up to 1 KiB of zero padding. libjpeg-turbo itself only warns on a file cut short and
  fills the rest grey; torchvision, PIL and DALI's CPU decoder turn that warning into an error,
  the GPU decoders are not known to, so a missing end marker counts as truncation on every path.

A file that passes the checks but still fails to decode is reported in `DecodedBatch.failures`
and the rest of its batch is kept.

Measured on 256 UTKFace files (200x200 JPEG), batch 64, on a shared 2-core CPU under heavy
load: dali-cpu ~145 images/s (3.0-3.5 ms of CPU per image), torch-cpu 50-105 images/s
(4.6-6.5 ms). dali-cpu and torch-cpu agree within 1e-4 after normalization on 1024 UTKFace
files. When shrinking, DALI's filter repeats the edge pixels where torch renormalizes its cut
kernel, so the outermost pixel or two can differ (2e-3 on a smooth 500x380 picture).
"""

from __future__ import annotations

import os
import struct
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD

BACKENDS = ("auto", "dali", "torch")
DEVICES = ("auto", "cpu", "cuda")

_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
_PNG_START = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its fixed CRC
_PADDING_ALLOWED = 1024  # zero bytes tolerated after the end marker; every decoder ignores them
# Start-of-frame markers hold the component count; C4, C8 and CC share the range but are not frames.
_FRAME_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_EXIF_ORIENTATION_TAG = 0x0112
_DALI_INPUT = "encoded"


@dataclass
class DecodedBatch:
    views: torch.Tensor  # [B_ok, 2, 3, S, S] float32 on the decoder's device; [:, 0] plain, [:, 1] mirrored
    kept: list[int]  # positions in the input list that decoded fine, in order
    failures: list[tuple[str, str]]  # (path as given, human-readable reason)


class Decoder(Protocol):
    name: str  # "dali-gpu" | "dali-cpu" | "torch-gpu" | "torch-cpu"
    device: torch.device

    def decode(self, paths: Sequence[str | Path]) -> DecodedBatch: ...


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: installed, but its native libraries do not load
        return False
    return True


def make_decoder(backend: str = "auto", device: str = "auto", batch_size: int = 64,
                 num_threads: int | None = None) -> Decoder:
    """The decoder for `backend` on `device`; "auto" picks CUDA when present and DALI when installed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown decode device {device!r}; choose one of {', '.join(DEVICES)}")
    if batch_size < 1:
        raise ValueError(f"decode batch size must be at least 1, got {batch_size}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("decode device 'cuda' asked for, but torch sees no CUDA GPU; use device 'cpu'")
    if backend == "dali" and not dali_available():
        raise RuntimeError("decode backend 'dali' needs NVIDIA DALI "
                           "(pip install nvidia-dali-cuda120); or use backend 'torch'")
    chosen_device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                                 else "cpu")
    threads = num_threads or _usable_cpus()
    if backend == "dali" or (backend == "auto" and dali_available()):
        return DaliDecoder(chosen_device, batch_size, threads)
    return TorchDecoder(chosen_device, threads)


# ---------------------------------------------------------------- file checks, shared by every path


def encoded_problem(data: np.ndarray) -> str | None:
    """Why these file bytes will not be decoded, or None when they look like a whole JPEG or PNG."""
    if data.size == 0:
        return "empty file"
    head = data[: len(_PNG_START)].tobytes()
    tail = data[-_PADDING_ALLOWED:].tobytes().rstrip(b"\x00")
    if head.startswith(_JPEG_START):
        return None if tail.endswith(_JPEG_END) else "truncated JPEG (no end-of-image marker)"
    if head.startswith(_PNG_START):
        return None if tail.endswith(_PNG_END) else "truncated PNG (no IEND chunk)"
    return "not a JPEG or PNG image"


def read_checked(paths: Sequence[str | Path]) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
    """(positions, file bytes) of the files worth decoding, and a failure reason by position for the rest."""
    positions, encoded, reasons = [], [], {}
    for position, path in enumerate(paths):
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError as error:
            reasons[position] = f"cannot read: {error.strerror or error}"
            continue
        problem = encoded_problem(data)
        if problem:
            reasons[position] = f"cannot decode: {problem}"
        else:
            positions.append(position)
            encoded.append(data)
    return positions, encoded, reasons


def _batch(paths: Sequence[str | Path], kept: list[int], views: torch.Tensor,
           reasons: dict[int, str]) -> DecodedBatch:
    failures = [(str(paths[position]), reasons[position]) for position in sorted(reasons)]
    return DecodedBatch(views=views, kept=kept, failures=failures)


def _no_views(device: torch.device) -> torch.Tensor:
    return torch.empty((0, 2, 3, IMAGE_SIZE, IMAGE_SIZE), device=device)


def _concat(views: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat, without its copy in the usual case of a single part (~80 MB for 64 images)."""
    if len(views) == 1:
        return views[0]
    return torch.cat(views) if views else _no_views(device)


def _usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: honours container and taskset limits
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------- pixels for overlays and Grad-CAM


def load_rgb(path: str | Path) -> np.ndarray:
    """HxWx3 uint8 RGB, EXIF orientation applied: the picture as a viewer shows it."""
    with Image.open(path) as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"))


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


# ---------------------------------------------------------------- torch paths


def resize_normalize(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, 3, S, S] float32 from uint8 CHW RGB images of any sizes, all on one device.

    The result is stored channels-last: torch's bilinear kernel runs ~2.5x faster on CPU that
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
        # 2.5x slower on CPU, so ask for it only when shrinking (UTKFace's 200 px enlarge).
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


def exif_orientation(tiff: bytes) -> int:
    """The Orientation tag of an EXIF block (1 when absent, 0 when the block is unreadable)."""
    byte_order = {b"II": "<", b"MM": ">"}.get(tiff[:2])
    if byte_order is None:
        return 0
    try:
        (first_directory,) = struct.unpack_from(byte_order + "I", tiff, 4)
        (entries,) = struct.unpack_from(byte_order + "H", tiff, first_directory)
        for entry in range(first_directory + 2, first_directory + 2 + 12 * entries, 12):
            tag, _type, _count, value = struct.unpack_from(byte_order + "HHIH", tiff, entry)
            if tag == _EXIF_ORIENTATION_TAG:
                return value
    except struct.error:
        return 0
    return 1


def jpeg_layout(data: np.ndarray) -> tuple[int, int]:
    """(colour components, EXIF orientation) from the marker segments ahead of a JPEG's frame header.

    A few header bytes tell the torch GPU path which files nvJPEG may take, without a decode.
    Components is 0 when no frame header was found.
    """
    buffer = memoryview(data)
    components, orientation, position = 0, 1, 2
    while position + 4 <= len(buffer) and buffer[position] == 0xFF:
        marker = buffer[position + 1]
        if marker == 0xFF:  # fill byte ahead of a marker
            position += 1
            continue
        length = int.from_bytes(buffer[position + 2: position + 4], "big")
        segment = buffer[position + 4: position + 2 + length]
        if marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            orientation = exif_orientation(bytes(segment[6:]))
        elif marker in _FRAME_MARKERS:
            components = segment[5] if len(segment) > 5 else 0
            break
        position += 2 + length
    return components, orientation


def nvjpeg_ready(data: np.ndarray) -> bool:
    """A three-component JPEG shown as stored: torchvision's nvJPEG path ignores EXIF and CMYK."""
    return data[:3].tobytes() == _JPEG_START and jpeg_layout(data) == (3, 1)


def _decode_on_cpu(data: np.ndarray) -> torch.Tensor | str:
    """uint8 CHW RGB with EXIF orientation applied, or why the file did not decode."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        return decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        # torchvision prefixes "function, source.cpp:line, "; the reader wants the rest.
        return "cannot decode: " + str(error).splitlines()[0].split(", ")[-1]


class TorchDecoder:
    """torchvision decoding (nvJPEG in batches on CUDA, libjpeg-turbo/libpng on CPU) plus `resize_normalize`."""

    def __init__(self, device: torch.device, num_threads: int):
        self.device = device
        self.name = "torch-gpu" if device.type == "cuda" else "torch-cpu"
        # torchvision's CPU decoders release the GIL, so threads decode files side by side.
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="decode")

    def decode(self, paths: Sequence[str | Path]) -> DecodedBatch:
        positions, encoded, reasons = read_checked(paths)
        images = self._decode_with_nvjpeg(encoded) if self.device.type == "cuda" else [None] * len(encoded)
        left_to_cpu = [index for index, image in enumerate(images) if image is None]
        for index, result in zip(left_to_cpu, self._pool.map(_decode_on_cpu, [encoded[i] for i in left_to_cpu])):
            if isinstance(result, str):
                reasons[positions[index]] = result
            elif self.device.type == "cuda":
                images[index] = result.pin_memory().to(self.device, non_blocking=True)
            else:
                images[index] = result
        decoded = [index for index, image in enumerate(images) if image is not None]
        if not decoded:
            return _batch(paths, [], _no_views(self.device), reasons)
        views = with_mirror(resize_normalize([images[index] for index in decoded]))
        return _batch(paths, [positions[index] for index in decoded], views, reasons)

    def _decode_with_nvjpeg(self, encoded: list[np.ndarray]) -> list[torch.Tensor | None]:
        """GPU images for the files nvJPEG can take in one batch; None marks those left to the CPU."""
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[torch.Tensor | None] = [None] * len(encoded)
        chosen = [index for index, data in enumerate(encoded) if nvjpeg_ready(data)]
        if not chosen:
            return images
        try:
            decoded = decode_jpeg([torch.from_numpy(encoded[index]) for index in chosen],
                                  mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError:
            # One bad file fails the whole nvJPEG batch; the CPU decoder then judges each file alone.
            return images
        for index, image in zip(chosen, decoded):
            images[index] = image
        return images


# ---------------------------------------------------------------- DALI paths


def build_dali_pipeline(batch_size: int, num_threads: int, device_id: int | None):
    """The two-view DALI graph: on the GPU (nvJPEG) when device_id is given, else every op on the CPU.

    One output, [B, 2, 3, S, S] float32. Inputs come through the external source named
    "encoded", one uint8 array of file bytes per image; a batch may hold fewer than batch_size.
    """
    from nvidia.dali import fn, pipeline_def, types

    # prefetch_queue_depth=1: each run consumes exactly the batch fed to it (deeper queues wait for more).
    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
    def two_views():
        encoded = fn.external_source(name=_DALI_INPUT, dtype=types.UINT8, ndim=1)
        # Fancy (smooth) chroma upsampling, as libjpeg-turbo's default in torchvision and PIL.
        rgb = fn.decoders.image(encoded, device="cpu" if device_id is None else "mixed", output_type=types.RGB,
                                adjust_orientation=True, jpeg_fancy_upsampling=True)
        # dtype=FLOAT: resize in float and keep the result unrounded.
        resized = fn.resize(rgb, resize_x=IMAGE_SIZE, resize_y=IMAGE_SIZE, interp_type=types.INTERP_LINEAR,
                            antialias=True, dtype=types.FLOAT)
        plain, mirror = (
            fn.crop_mirror_normalize(resized, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                     mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])
            for flip in (0, 1)
        )
        return fn.stack(plain, mirror)

    pipe = two_views()
    pipe.build()
    return pipe


def _dali_reason(error: RuntimeError) -> str:
    """The line of a DALI error that names the cause, after its operator traceback."""
    lines = [line.strip() for line in str(error).splitlines()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    cause = next((line for line in after if line and "no longer valid" not in line), "decoder error")
    return f"cannot decode: DALI: {cause}"


class DaliDecoder:
    """One DALI pipeline, built once and fed each batch of file bytes through its external source."""

    def __init__(self, device: torch.device, batch_size: int, num_threads: int):
        self.device = device
        self.name = "dali-gpu" if device.type == "cuda" else "dali-cpu"
        self._batch_size = batch_size
        self._num_threads = num_threads
        if device.type == "cuda":
            self._device_id = device.index if device.index is not None else torch.cuda.current_device()
        else:
            self._device_id = None
        self._pipe = None
        self._rebuild()

    def decode(self, paths: Sequence[str | Path]) -> DecodedBatch:
        positions, encoded, reasons = read_checked(paths)
        views, kept = [], []
        # The graph takes at most batch_size samples per run.
        for start in range(0, len(encoded), self._batch_size):
            chunk_views, chunk_kept = self._decode_chunk(encoded[start: start + self._batch_size],
                                                         positions[start: start + self._batch_size], reasons)
            views.append(chunk_views)
            kept += chunk_kept
        return _batch(paths, kept, _concat(views, self.device), reasons)

    def _decode_chunk(self, encoded: list[np.ndarray], positions: list[int],
                      reasons: dict[int, str]) -> tuple[torch.Tensor, list[int]]:
        try:
            return self._run(encoded), positions
        except RuntimeError:
            # One bad sample fails DALI's whole batch and leaves the pipeline "no longer valid":
            # rebuild it (milliseconds) and run the files one at a time through the same graph.
            self._rebuild()
        views, kept = [], []
        for data, position in zip(encoded, positions):
            try:
                views.append(self._run([data]))
                kept.append(position)
            except RuntimeError as error:
                reasons[position] = _dali_reason(error)
                self._rebuild()
        return _concat(views, self.device), kept

    def _run(self, encoded: list[np.ndarray]) -> torch.Tensor:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        (views,) = self._pipe.run(**{_DALI_INPUT: encoded})
        views = views.as_tensor()
        out = torch.empty(views.shape(), dtype=torch.float32, device=self.device)
        # Copy out of DALI's buffers, which the next run reuses; on CUDA, on torch's stream.
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(views, out, cuda_stream=stream)
        return out

    def _rebuild(self) -> None:
        self._pipe = None  # let the old pipeline free its threads and buffers first
        self._pipe = build_dali_pipeline(self._batch_size, self._num_threads, self._device_id)
