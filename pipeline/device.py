"""`--device auto|cpu|cuda` -> torch.device, for every command."""

from __future__ import annotations

import torch


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when torch sees a GPU, else the CPU. Asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)
