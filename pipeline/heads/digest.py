"""A content digest of a set of named tensors (a head's weights, a stored --pca fit)."""

from __future__ import annotations

import hashlib

import torch


def state_digest(state: dict) -> str:
    """sha256 of every tensor (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(state[name].shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()
