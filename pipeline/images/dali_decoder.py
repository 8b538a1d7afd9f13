"""The NVIDIA DALI decoder: one graph for the GPU and the CPU."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from pipeline.images.checks import (
    DEFAULT_MAX_PIXELS,
)
from pipeline.images.torch_decoder import DecodeStream
from pipeline.images.views import (
    DecodedBatch,
    batch_result,
    concat_views,
    probe_jpeg,
    read_checked,
)

_DALI_INPUT = "encoded"


_SPARE_BUFFERS = 2  # DaliDecoder.recycle: one batch being filled while the one before is computed


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except (ImportError, OSError):  # OSError: installed, but its native libraries do not load
        return False
    return True


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
    re-initialises the decoder and its buffers and costs time (benchmarks/decode_checks.py);
    `rebuilds` counts them. The file checks of images/checks.py keep most bad files out of DALI
    in the first place.
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
        images (77 MB) is paged in on every batch, which makes copying DALI's
        output into it several times slower than into a buffer used before.
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
            return batch_result(paths, kept, concat_views(views, self.device), reasons)
        with torch.cuda.stream(self._streams.stream):
            all_views = concat_views(views, self.device)
        self._streams.hand_over(all_views)
        return batch_result(paths, kept, all_views, reasons)

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
        return concat_views(views, self.device), kept

    def _ensure_usable(self) -> None:
        """Rebuild the pipeline only if a known-good image no longer goes through it."""
        try:
            self._run([probe_jpeg()])
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
