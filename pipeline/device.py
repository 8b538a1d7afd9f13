"""Where and how the backbones compute: `--device auto|cpu|cuda` and one precision setting for every command.

featurize, predict and explain all run the backbones inside `compute_precision`, so one image gets the
same features from all three on the same device:
    float32            plain float32; on CUDA with TF32 switched off, so it is real float32
    float16-autocast   torch.autocast float16 (the CUDA default: tensor cores, half the memory traffic)
    bfloat16-autocast  torch.autocast bfloat16
`auto` means float32 on the CPU (autocast there changes features beyond float rounding and is not faster
on CPUs without AMX) and float16-autocast on CUDA. TF32 is switched off inside the block on CUDA, whatever
the caller set globally, so the few float32 ops left under autocast give the same numbers in all three
commands, and a float32 run means float32.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

PRECISIONS = ("float32", "float16-autocast", "bfloat16-autocast")
_CHOICES = {"auto": None, "float32": "float32", "float16": "float16-autocast", "bfloat16": "bfloat16-autocast",
            **{p: p for p in PRECISIONS}}
_AUTOCAST_DTYPES = {"float16-autocast": torch.float16, "bfloat16-autocast": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """auto: CUDA when torch sees a GPU, else the CPU. Asking for CUDA without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    return torch.device(device)


def resolve_precision(device: torch.device | str, precision: str = "auto") -> str:
    """The precision name (one of PRECISIONS) that `precision` means on `device`."""
    if precision not in _CHOICES:
        raise ValueError(f"unknown precision {precision!r}; choose auto, float32, float16 or bfloat16")
    chosen = _CHOICES[precision]
    if chosen is None:
        return "float16-autocast" if torch.device(device).type == "cuda" else "float32"
    return chosen


@contextmanager
def compute_precision(device: torch.device | str, precision: str = "auto"):
    """Run the block in `precision` (see the module docstring) on `device`; yields the resolved name."""
    device = torch.device(device)
    name = resolve_precision(device, precision)
    tf32 = None
    if device.type == "cuda":
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    try:
        dtype = _AUTOCAST_DTYPES.get(name)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            yield name
    finally:
        if tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
