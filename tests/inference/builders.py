"""Heads and pictures for the inference and predict tests: random heads over a random-init MobileNetV2
(weights 'none', the same in every process), framed as a detect or an aligned head, and real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

EDGES = [25, 50, 75, 116]


def save_head(folder: Path, framing: str = "detect", seed: int = 3, target: str = "group", extra: dict | None = None):
    """A head over MobileNetV2's pooled features (random-init backbone), confident enough to vary by face."""
    from pipeline.backbones.registry import get_spec
    from pipeline.constants import group_names
    from pipeline.faces.detect import make_face_mode
    from pipeline.heads.checkpoint import save_checkpoint
    from pipeline.heads.model import AgeHead

    width = get_spec("mobilenet_v2").feature_width
    torch.manual_seed(seed)
    head = AgeHead(width, (16,), 0.0, EDGES, target)
    with torch.no_grad():
        head.mlp[-1].weight.mul_(40.0)
        if target == "age":
            head.age_shift.fill_(40.0)
            head.age_scale.fill_(20.0)
    meta = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "none"}, "feature_kind": "last",
            "group_edges": EDGES, "class_names": group_names(EDGES), "target": target,
            "feature_fingerprint": "test", "preprocessing": {}, "feature_dim": width, "hidden": [16],
            "config": {}, "history": [], "best_epoch": 1, **(extra or {})}
    if framing == "detect":
        meta["faces"] = make_face_mode("detect").settings()
    return save_checkpoint(folder, head, meta)


def write_photos(folder: Path) -> dict[str, Path]:
    """A real portrait (skimage's astronaut) and a cat (skimage's chelsea), saved as JPEGs."""
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    paths = {"portrait": folder / "astronaut.jpg", "cat": folder / "cat.jpg"}
    Image.fromarray(data.astronaut()).save(paths["portrait"], quality=92)
    Image.fromarray(data.chelsea()).save(paths["cat"], quality=92)
    return paths


def head_probabilities(head_dir: Path, crops: list[np.ndarray]) -> np.ndarray:
    """The head applied to its backbone's pooled features of face crops (plain view): what predict must give."""
    from pipeline.backbones.registry import create_backbone
    from pipeline.faces.crops import crops_to_views
    from pipeline.heads.checkpoint import load_checkpoint

    ckpt = load_checkpoint(head_dir)
    backbone = create_backbone("mobilenet_v2", None)
    views = crops_to_views(crops)
    with torch.no_grad():
        features = backbone(views[:, 0])["features"]
        return torch.softmax(ckpt.head(features), 1).numpy()
