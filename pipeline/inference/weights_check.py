"""The backbone weights file a head needs, checked by content before it is used.

A head's features are only reproduced by the very weights it was trained on. torchvision finds its weights
by file name (TORCH_HOME/hub/checkpoints/<name>) and checks a download, but not a file already there, so
another file under that name would go unnoticed. A head whose head.json records `weights_sha256`
({backbone: sha256 of the file}, as the shipped models do) has the file checked here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.files import file_sha256


class WeightsFileMismatch(ValueError):
    """The weights file under the expected name is not the one the head was trained with."""


def weights_file_path(backbone: str, weights_id: str) -> Path | None:
    """Where torchvision keeps the file of a weights enum (e.g. IMAGENET1K_V1); None for other ids."""
    import torch.hub

    from pipeline.backbones.registry import get_spec

    members = get_spec(backbone).weights_enum.__members__
    if weights_id not in members:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(members[weights_id].url).name


def check_weights_files(meta: dict, label: str = "this head") -> list[str]:
    """Raise WeightsFileMismatch (one line) when a recorded weights file differs from the file there.

    Returns the backbones whose file is not there yet (torchvision will download it; check again after)."""
    absent = []
    for backbone, expected in (meta.get("weights_sha256") or {}).items():
        path = weights_file_path(backbone, str(meta["weights"][backbone]))
        if path is None:
            continue
        if not path.is_file():
            absent.append(backbone)
            continue
        found = file_sha256(path)
        if found != expected:
            raise WeightsFileMismatch(
                f"{path} is not the {backbone} weights file {label} was trained with (sha256 {found[:16]}..., "
                f"expected {expected[:16]}...); put torchvision's own file there, or point TORCH_HOME elsewhere")
    return absent
