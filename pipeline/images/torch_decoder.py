"""The torchvision decoder (nvJPEG on the GPU, libjpeg-turbo on the CPU)."""

from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.images.checks import (
    _JPEG_START,
    DEFAULT_MAX_PIXELS,
    parse_jpeg,
)
from pipeline.images.views import (
    DecodedBatch,
    batch_result,
    decode_on_cpu,
    no_views,
    probe_jpeg,
    read_checked,
    resize_normalize,
    torchvision_reason,
    with_mirror,
)


def jpeg_layout(data: np.ndarray) -> tuple[int, int]:
    """(colour components, EXIF orientation) from a JPEG's headers; (0, 1) when they do not parse.

    A few header bytes tell the torch GPU path which files nvJPEG may take, without a decode.
    """
    header = parse_jpeg(data)
    return (0, 1) if isinstance(header, str) else (header.components, header.orientation)


def nvjpeg_ready(data: np.ndarray) -> bool:
    """A three-component JPEG shown as stored: torchvision's nvJPEG path ignores EXIF and CMYK."""
    return data[:3].tobytes() == _JPEG_START and jpeg_layout(data) == (3, 1)


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
        for index, result in zip(left_to_cpu, self._pool.map(decode_on_cpu, [encoded[i] for i in left_to_cpu])):
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
            return batch_result(paths, [], no_views(self.device), reasons, fallbacks)
        views = with_mirror(resize_normalize([images[index] for index in decoded]))
        return batch_result(paths, [positions[index] for index in decoded], views, reasons, fallbacks)

    def _probe_nvjpeg(self) -> str | None:
        """Decode a tiny JPEG with nvJPEG once; why it cannot be used (warned about loudly), or None."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            decode_jpeg([torch.from_numpy(probe_jpeg())], mode=ImageReadMode.RGB, device=self.device)
        except Exception as error:  # noqa: BLE001 - whatever the cause, every JPEG goes to the CPU and says why
            problem = torchvision_reason(error)
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
                    fallbacks.append((names[index], f"nvJPEG: {torchvision_reason(error)}"))
        for index, image in zip(chosen, decoded):
            images[index] = image
        return images, fallbacks
