"""Pick a decoder: DALI or torchvision, on the GPU or the CPU.

Every decoder reads files through the checks of images/checks.py, then makes two normalized views the same
way: RGB with EXIF orientation -> float -> bilinear resize to IMAGE_SIZE (antialiased when shrinking) ->
ImageNet mean/std. After normalization torch-cpu and dali-cpu agree within 1e-4 (the tests check this);
dali-gpu interpolates chroma as libjpeg-turbo does, while torch-gpu's nvJPEG does not, so torch-gpu can
differ from the CPU paths by more than one 8-bit level at colour edges (features/verify.py's tolerances).
"""

from __future__ import annotations

import torch

from pipeline.images.checks import (
    DEFAULT_MAX_PIXELS,
)
from pipeline.images.dali_decoder import DaliDecoder, dali_available
from pipeline.images.torch_decoder import TorchDecoder
from pipeline.images.views import Decoder, usable_cpus

BACKENDS = ("auto", "dali", "torch")


DEVICES = ("auto", "cpu", "cuda")


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
