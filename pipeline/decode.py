"""Turn image files into normalized tensors, two views each (plain and mirrored), for the frozen backbones.

Every image goes: decode to RGB uint8 (EXIF orientation applied) -> float -> resize to
IMAGE_SIZE x IMAGE_SIZE (bilinear, antialiased) -> /255 -> ImageNet mean/std. The float
conversion comes before the resize on every path, so no path rounds resized pixels to uint8.
16-bit PNGs become uint8 as round(v * 255 / 65535) on every path (DALI's own conversion).

Four decoders do this: DALI on GPU or CPU run the one graph built by `build_dali_pipeline`;
torch on GPU or CPU share `resize_normalize`. All four first read and judge each file with the
checks of `image_checks` (regular files only, whole JPEG/PNG up to its end marker, trailing bytes
dropped, the pixel limit `max_pixels`, libjpeg-turbo's "Corrupt JPEG data" verdict, PNG CRCs and
pixel data), so every path keeps and skips the same files, and nvJPEG, which reports no corrupt
data, gets only files the CPU check found sound. A file that passes the checks but still fails
to decode is reported in `DecodedBatch.failures` and the rest of its batch is kept. A file a
GPU decoder handed to the CPU is listed in `DecodedBatch.fallbacks` with the reason; when
nvJPEG cannot start at all, a RuntimeWarning says why and `TorchDecoder.nvjpeg_problem` holds it.

How close the paths are, after normalization (one 8-bit level is ~0.017 there):

* torch-cpu and dali-cpu: within 1e-4 on 1024 UTKFace files (tested on the CPU). When shrinking,
  DALI's filter repeats the edge pixels where torch renormalizes its cut kernel, so the outermost
  pixel or two can differ (2e-3 on a smooth 500x380 picture).
* dali-gpu: the same graph with nvJPEG, `jpeg_fancy_upsampling=True` so chroma is interpolated as
  libjpeg-turbo does. Not yet run on a GPU: its tolerance is unmeasured (`featurize --verify`).
* torch-gpu: torchvision creates its nvJPEG handle with the default flags, without chroma
  interpolation, so 4:2:0 JPEGs (all of UTKFace) differ from libjpeg-turbo at colour edges.
  Simulated on the CPU with libjpeg-turbo's own non-interpolating upsampler on 512 UTKFace
  files: after normalization max 0.58, mean 0.004, median per-file max 0.10 (up to 39 levels
  on a decoded pixel). Not yet run on a GPU. This path does NOT meet the one-level tolerance;
  use dali-gpu or the CPU paths where it matters.

CUDA streams (torch-gpu): torchvision allocates nvJPEG's outputs on the caller's current stream
but decodes on a pooled stream that does not wait for it, so a block the backbone freed with its
kernels still queued could be overwritten (torchvision PR #9606). This decoder therefore decodes
on its own stream, synchronized after every batch so nothing is ever queued on it when nvJPEG
allocates; the consumer stream waits on it and the views are `record_stream`ed to the consumer.
dali-gpu copies out of DALI's buffers on that stream too and waits for the copy, since the next
run reuses those buffers (a copy queued behind the backbone on the default stream would not be).

Measured on 256 UTKFace files (200x200 JPEG), batch 64, on a shared 2-core CPU under heavy
load: dali-cpu ~145 images/s (3.0-3.5 ms of CPU per image), torch-cpu 50-105 images/s
(4.6-6.5 ms).
"""

from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections import defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from pipeline.constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from pipeline.image_checks import (  # noqa: F401  (encoded_problem, exif_orientation: this module's API too)
    _JPEG_START,
    DEFAULT_MAX_PIXELS,
    ImageProblem,
    checked_header,
    encoded_problem,
    exif_orientation,
    parse_jpeg,
    read_image_file,
)

BACKENDS = ("auto", "dali", "torch")
DEVICES = ("auto", "cpu", "cuda")

_DALI_INPUT = "encoded"
_SPARE_BUFFERS = 2  # DaliDecoder.recycle: one batch being filled while the one before is computed


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


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: installed, but its native libraries do not load
        return False
    return True


def make_decoder(backend: str = "auto", device: str = "auto", batch_size: int = 64,
                 num_threads: int | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Decoder:
    """The decoder for `backend` on `device`; "auto" picks CUDA when present and DALI when installed.

    max_pixels: images with more pixels (width x height, from the header) are refused before
    decoding; None turns the limit off.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise ValueError(f"unknown decode device {device!r}; choose one of {', '.join(DEVICES)}")
    if batch_size < 1:
        raise ValueError(f"decode batch size must be at least 1, got {batch_size}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be at least 1 (or None for no limit), got {max_pixels}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("decode device 'cuda' asked for, but torch sees no CUDA GPU; use device 'cpu'")
    if backend == "dali" and not dali_available():
        raise RuntimeError("decode backend 'dali' needs NVIDIA DALI "
                           "(pip install nvidia-dali-cuda120); or use backend 'torch'")
    chosen_device = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available())
                                 else "cpu")
    threads = num_threads or usable_cpus()
    if backend == "dali" or (backend == "auto" and dali_available()):
        return DaliDecoder(chosen_device, batch_size, threads, max_pixels=max_pixels)
    return TorchDecoder(chosen_device, threads, max_pixels=max_pixels)


# ---------------------------------------------------------------- file checks, shared by every path


def read_checked(paths: Sequence[str | Path], max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 pool: ThreadPoolExecutor | None = None) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
    """(positions, image bytes) of the files worth decoding, and a failure reason by position for the rest.

    The bytes stop at the image's end marker: trailing data never reaches a decoder. With a
    pool, files are read and checked side by side (~0.25-0.35 ms each on UTKFace, two thirds of
    it libjpeg-turbo's strict pass), so slow reads and the checks overlap; whether simplejpeg
    lets them run truly in parallel (GIL) was not measurable on our loaded 2-core machine.
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


def _batch(paths: Sequence[str | Path], kept: list[int], views: torch.Tensor,
           reasons: dict[int, str], fallbacks: list[tuple[str, str]] | None = None) -> DecodedBatch:
    failures = [(str(paths[position]), reasons[position]) for position in sorted(reasons)]
    return DecodedBatch(views=views, kept=kept, failures=failures, fallbacks=fallbacks or [])


def _no_views(device: torch.device) -> torch.Tensor:
    return torch.empty((0, 2, 3, IMAGE_SIZE, IMAGE_SIZE), device=device)


def _concat(views: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """torch.cat, without its copy in the usual case of a single part (~80 MB for 64 images)."""
    if len(views) == 1:
        return views[0]
    return torch.cat(views) if views else _no_views(device)


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: honours container and taskset limits
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------- pixels for overlays and Grad-CAM


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
        decoded = _decode_on_cpu(data)
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


def jpeg_layout(data: np.ndarray) -> tuple[int, int]:
    """(colour components, EXIF orientation) from a JPEG's headers; (0, 1) when they do not parse.

    A few header bytes tell the torch GPU path which files nvJPEG may take, without a decode.
    """
    header = parse_jpeg(data)
    return (0, 1) if isinstance(header, str) else (header.components, header.orientation)


def nvjpeg_ready(data: np.ndarray) -> bool:
    """A three-component JPEG shown as stored: torchvision's nvJPEG path ignores EXIF and CMYK."""
    return data[:3].tobytes() == _JPEG_START and jpeg_layout(data) == (3, 1)


def _decode_on_cpu(data: np.ndarray) -> torch.Tensor | str:
    """uint8 CHW RGB with EXIF orientation applied, or why the file did not decode."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        return "cannot decode: " + _torchvision_reason(error)
    return to_uint8(image)


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """8-bit pixels from torchvision's uint8 or uint16 (16-bit PNG) output: round(v * 255 / 65535), as DALI does."""
    if image.dtype == torch.uint8:
        return image
    if image.dtype != torch.uint16:
        raise ValueError(f"expected uint8 or uint16 pixels, got {image.dtype}")
    return ((image.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


# torchvision prefixes "function, /path/source.cpp:line, "; the reader wants the rest, commas and all.
_TORCHVISION_PREFIX = re.compile(r"^\w+, \S+\.(?:cpp|cu|cc|c|h|hpp):\d+, ")


def _torchvision_reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return _TORCHVISION_PREFIX.sub("", text) or type(error).__name__


class DecodeStream:
    """A GPU decoder's own CUDA stream, and the hand-over of its finished views to the consumer's stream."""

    def __init__(self, device: torch.device, consumer: "torch.cuda.Stream | None" = None):
        self.stream = torch.cuda.Stream(device)  # ours alone: nothing else is ever queued on it
        self.consumer = consumer or torch.cuda.default_stream(device)

    def hand_over(self, views: torch.Tensor) -> None:
        # Block the decoding (prefetch) thread, not the consumer, until the batch is on the device;
        # the stream is then idle again when the next batch's outputs are allocated on it.
        self.stream.synchronize()
        self.consumer.wait_stream(self.stream)
        # The caching allocator must not hand these blocks back to our stream while the
        # consumer's kernels that read them are still queued.
        views.record_stream(self.consumer)


class TorchDecoder:
    """torchvision decoding (nvJPEG in batches on CUDA, libjpeg-turbo/libpng on CPU) plus `resize_normalize`.

    On CUDA the outputs are meant for `consumer_stream` (default: the device's default stream,
    the one the backbones run on); set it when the consumer runs on another stream.
    """

    def __init__(self, device: torch.device, num_threads: int, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 consumer_stream: "torch.cuda.Stream | None" = None):
        self.device = device
        self.name = "torch-gpu" if device.type == "cuda" else "torch-cpu"
        self.max_pixels = max_pixels
        # torchvision's CPU decoders release the GIL, so threads decode files side by side.
        self._pool = ThreadPoolExecutor(num_threads, thread_name_prefix="decode")
        self.nvjpeg_problem: str | None = None  # why nvJPEG cannot be used at all; None while it can
        self._streams = DecodeStream(device, consumer_stream) if device.type == "cuda" else None
        if self._streams:
            with torch.cuda.stream(self._streams.stream):
                self.nvjpeg_problem = self._probe_nvjpeg()
            self._streams.stream.synchronize()

    def decode(self, paths: Sequence[str | Path]) -> DecodedBatch:
        if self._streams is None:
            return self._decode(paths)
        with torch.cuda.stream(self._streams.stream):
            batch = self._decode(paths)
        self._streams.hand_over(batch.views)
        return batch

    def _decode(self, paths: Sequence[str | Path]) -> DecodedBatch:
        positions, encoded, reasons = read_checked(paths, self.max_pixels, self._pool)
        if self.device.type == "cuda":
            images, fallbacks = self._decode_with_nvjpeg(encoded, [str(paths[position]) for position in positions])
        else:
            images, fallbacks = [None] * len(encoded), []
        left_to_cpu = [index for index, image in enumerate(images) if image is None]
        for index, result in zip(left_to_cpu, self._pool.map(_decode_on_cpu, [encoded[i] for i in left_to_cpu])):
            if isinstance(result, str):
                reasons[positions[index]] = result
            elif self.device.type == "cuda":
                images[index] = result.pin_memory().to(self.device, non_blocking=True)
            else:
                images[index] = result
        decoded = [index for index, image in enumerate(images) if image is not None]
        failed = {str(paths[position]) for position in reasons}
        fallbacks = [(path, why) for path, why in fallbacks if path not in failed]
        if not decoded:
            return _batch(paths, [], _no_views(self.device), reasons, fallbacks)
        views = with_mirror(resize_normalize([images[index] for index in decoded]))
        return _batch(paths, [positions[index] for index in decoded], views, reasons, fallbacks)

    def _probe_nvjpeg(self) -> str | None:
        """Decode a tiny JPEG with nvJPEG once; why it cannot be used (warned about loudly), or None."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decode_jpeg([torch.from_numpy(_probe_jpeg())], mode=ImageReadMode.RGB, device=self.device)
        except Exception as error:  # noqa: BLE001 - whatever the cause, every JPEG goes to the CPU and says why
            problem = _torchvision_reason(error)
            warnings.warn(f"nvJPEG cannot be used on {self.device}: {problem}. Every JPEG is decoded on the "
                          f"CPU instead, and listed with this reason in the batch's fallbacks.",
                          RuntimeWarning, stacklevel=3)
            return problem
        return None

    def _decode_with_nvjpeg(self, encoded: list[np.ndarray], names: list[str]
                            ) -> tuple[list[torch.Tensor | None], list[tuple[str, str]]]:
        """GPU images for the files nvJPEG takes (None: left to the CPU), and (name, why) for its rejects.

        Only three-component JPEGs shown as stored go to nvJPEG (torchvision's nvJPEG path ignores
        EXIF and CMYK); the rest are the CPU's by routing, not fallbacks.
        """
        from torchvision.io import ImageReadMode, decode_jpeg

        images: list[torch.Tensor | None] = [None] * len(encoded)
        chosen = [index for index, data in enumerate(encoded) if nvjpeg_ready(data)]
        if not chosen:
            return images, []
        if self.nvjpeg_problem:
            return images, [(names[index], f"nvJPEG unusable: {self.nvjpeg_problem}") for index in chosen]

        def run(indices: list[int]) -> list[torch.Tensor]:
            return decode_jpeg([torch.from_numpy(encoded[index]) for index in indices],
                               mode=ImageReadMode.RGB, device=self.device)

        fallbacks = []
        try:
            decoded = run(chosen)
        except Exception:  # noqa: BLE001 - one rejected file fails the whole call: retry the files one by one
            if torch.cuda.is_available():  # let the failed call's kernels finish before its outputs are reused
                torch.cuda.synchronize(self.device)
            decoded = []
            for index in chosen:
                try:
                    decoded += run([index])
                except Exception as error:  # noqa: BLE001 - this file goes to the CPU, with the reason
                    decoded.append(None)
                    fallbacks.append((names[index], f"nvJPEG: {_torchvision_reason(error)}"))
        for index, image in zip(chosen, decoded):
            images[index] = image
        return images, fallbacks


def _probe_jpeg() -> np.ndarray:
    """A 16x16 colour JPEG that every decoder takes."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 120, 40)).save(buffer, "JPEG", quality=90)
    return np.frombuffer(bytearray(buffer.getvalue()), dtype=np.uint8)


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
        return dali_two_views(rgb)

    pipe = two_views()
    pipe.build()
    return pipe


def dali_device_id(device: torch.device) -> int | None:
    """DALI's device_id for a torch device: the GPU's index (the current one for a bare "cuda"), None on the CPU."""
    if device.type != "cuda":
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def dali_two_views(rgb):
    """Inside a DALI pipeline definition: uint8 HWC RGB -> plain and mirrored normalized views, stacked.

    Shared by the file decoder and dali_pixels (face crops), so both give the same tensors.
    """
    from nvidia.dali import fn, types

    # dtype=FLOAT: resize in float and keep the result unrounded.
    resized = fn.resize(rgb, resize_x=IMAGE_SIZE, resize_y=IMAGE_SIZE, interp_type=types.INTERP_LINEAR,
                        antialias=True, dtype=types.FLOAT)
    plain, mirror = (
        fn.crop_mirror_normalize(resized, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                 mean=[255.0 * m for m in IMAGENET_MEAN], std=[255.0 * s for s in IMAGENET_STD])
        for flip in (0, 1)
    )
    return fn.stack(plain, mirror)


def _dali_reason(error: Exception) -> str:
    """The line of a DALI error that names the cause, after its operator traceback."""
    lines = [line.strip() for line in str(error).splitlines()]
    after = lines[lines.index("encountered:") + 1:] if "encountered:" in lines else lines
    cause = next((line for line in after if line and "no longer valid" not in line), type(error).__name__)
    return f"cannot decode: DALI: {cause}"


class DaliDecoder:
    """One DALI pipeline, built once and fed each batch of file bytes through its external source.

    A file DALI rejects fails its whole batch. The batch is then run file by file through the
    same pipeline, which is rebuilt only when a known-good probe image fails too (DALI's message
    says "no longer valid" even when the pipeline still works, and on the CPU it does). A rebuild
    re-initialises the decoder and its buffers: on the CPU twin a build took 5-30 ms and the first
    run after it up to ~85 ms more than a warm run (8 UTKFace files, 2 heavily shared cores;
    benchmarks/decode_checks.py); on the GPU it is unmeasured. `rebuilds` counts them. The file
    checks of `image_checks` keep most bad files out of DALI in the first place.
    """

    def __init__(self, device: torch.device, batch_size: int, num_threads: int,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, consumer_stream: "torch.cuda.Stream | None" = None):
        self.device = device
        self.name = "dali-gpu" if device.type == "cuda" else "dali-cpu"
        self.max_pixels = max_pixels
        self.rebuilds = 0  # pipelines built after the first
        self._batch_size = batch_size
        self._num_threads = num_threads
        self._device_id = dali_device_id(device)
        self._streams = DecodeStream(device, consumer_stream) if device.type == "cuda" else None
        self._pipe = build_dali_pipeline(self._batch_size, self._num_threads, self._device_id)
        self._check_pool = ThreadPoolExecutor(num_threads, thread_name_prefix="check")
        # CPU output buffers handed back by recycle(), and the addresses of the latest ones decode() handed out
        # (addresses only: a buffer the caller never returns is freed as soon as the caller drops it).
        self._free_buffers: list[torch.Tensor] = []
        self._lent_addresses: deque[int] = deque(maxlen=2 * _SPARE_BUFFERS)
        self._buffers_lock = threading.Lock()

    def recycle(self, views: torch.Tensor) -> None:
        """Take back a batch's views that nothing reads any more: a later batch is written into the same memory.

        Only for a caller that holds no other reference to `views` or to tensors
        and arrays made from them without a copy (extract.run calls it once a
        batch's features are computed). Why: on the CPU, a fresh buffer for 64
        images (77 MB) is paged in on every batch: copying DALI's output into it
        cost ~0.58 ms per image against ~0.12 ms into a buffer used before, a
        third of the CPU decode's whole cost (UTKFace, 2-core CPU).
        """
        with self._buffers_lock:
            if (views.data_ptr() in self._lent_addresses and views.is_contiguous()
                    and len(self._free_buffers) < _SPARE_BUFFERS):
                self._lent_addresses.remove(views.data_ptr())
                self._free_buffers.append(views)

    def _output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A CPU tensor of `shape` for DALI's batch output: the first rows of a recycled buffer when one fits."""
        with self._buffers_lock:
            buffer = next((b for b in self._free_buffers if b.shape[1:] == shape[1:] and len(b) >= shape[0]), None)
            if buffer is None:
                out = torch.empty(shape, dtype=torch.float32)
            else:
                self._free_buffers.remove(buffer)
                out = buffer[: shape[0]]
            self._lent_addresses.append(out.data_ptr())
            return out

    def decode(self, paths: Sequence[str | Path]) -> DecodedBatch:
        positions, encoded, reasons = read_checked(paths, self.max_pixels, self._check_pool)
        views, kept = [], []
        # The graph takes at most batch_size samples per run.
        for start in range(0, len(encoded), self._batch_size):
            chunk_views, chunk_kept = self._decode_chunk(encoded[start: start + self._batch_size],
                                                         positions[start: start + self._batch_size], reasons)
            views.append(chunk_views)
            kept += chunk_kept
        if self._streams is None:
            return _batch(paths, kept, _concat(views, self.device), reasons)
        with torch.cuda.stream(self._streams.stream):
            all_views = _concat(views, self.device)
        self._streams.hand_over(all_views)
        return _batch(paths, kept, all_views, reasons)

    def _decode_chunk(self, encoded: list[np.ndarray], positions: list[int],
                      reasons: dict[int, str]) -> tuple[torch.Tensor, list[int]]:
        try:
            return self._run(encoded, recyclable=True), positions
        except Exception:  # noqa: BLE001 - DALI raises RuntimeError, but no error type may end the job
            self._ensure_usable()  # some file failed the whole batch: find it below
        views, kept = [], []
        for data, position in zip(encoded, positions):
            try:
                views.append(self._run([data]))
                kept.append(position)
            except Exception as error:  # noqa: BLE001 - this file is skipped with DALI's reason
                reasons[position] = _dali_reason(error)
                self._ensure_usable()
        return _concat(views, self.device), kept

    def _ensure_usable(self) -> None:
        """Rebuild the pipeline only if a known-good image no longer goes through it."""
        try:
            self._run([_probe_jpeg()])
        except Exception:  # noqa: BLE001 - broken pipeline, whatever DALI raises
            self._pipe = None  # let the old pipeline free its threads and buffers first
            self._pipe = build_dali_pipeline(self._batch_size, self._num_threads, self._device_id)
            self.rebuilds += 1

    def _run(self, encoded: list[np.ndarray], recyclable: bool = False) -> torch.Tensor:
        """The views of `encoded`; recyclable: in a buffer recycle() may take back (CPU; whole batches only)."""
        from nvidia.dali.plugin.pytorch import feed_ndarray

        (views,) = self._pipe.run(**{_DALI_INPUT: encoded})
        views = views.as_tensor()
        if self._streams is None:
            shape = tuple(views.shape())
            out = self._output(shape) if recyclable else torch.empty(shape, dtype=torch.float32)
            feed_ndarray(views, out)
            return out
        # Copy out of DALI's buffers on our stream, and wait for it here: the next run reuses
        # those buffers, and a copy queued behind the backbone's kernels would read the next batch.
        with torch.cuda.stream(self._streams.stream):
            out = torch.empty(views.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(views, out, cuda_stream=self._streams.stream)
        self._streams.stream.synchronize()
        return out
