"""Where the repository and the optional real data (UTKFace, ImageNet weights) are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"
REAL_IMAGES = SHARED / "data" / "utkface"
REAL_WEIGHTS = SHARED / "torch"


def real_data_reason() -> str | None:
    """Why the real-data tests cannot run here, or None when they can."""
    if not REAL_IMAGES.is_dir():
        return f"UTKFace not found at {REAL_IMAGES}"
    torch_home = os.environ.get("TORCH_HOME")
    if not torch_home or not (Path(torch_home) / "hub" / "checkpoints").is_dir():
        return "TORCH_HOME is not set to a folder with hub/checkpoints (ImageNet weights)"
    return None
