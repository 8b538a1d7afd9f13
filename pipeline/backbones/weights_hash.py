"""The sha256 of a backbone's weights file, hashed once and remembered by path, size and times.

A feature file's fingerprint holds it (features/extract.py), so a checkpoint replaced under the same
name in TORCH_HOME gives another fingerprint. Hashing a 100 MB checkpoint on every run would cost a
fraction of a second each time; the memo (`weights-sha256.json` in the ONNX cache folder, and a dict
in this process) keeps the digest while the file's path, size, mtime, ctime and inode stay the same.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pipeline.files import file_sha256, write_json_atomically

MEMO_FILE = "weights-sha256.json"
_in_process: dict[str, tuple[list, str]] = {}


def _stamp(path: Path) -> list:
    stat = os.stat(path)
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _memo_path() -> Path:
    from pipeline.backbones.onnx_export import default_cache_dir

    return default_cache_dir() / MEMO_FILE


def remembered_sha256(path: Path) -> str:
    """sha256 of the file at `path`, from the memo while the file is unchanged, else hashed now and remembered."""
    path = Path(path).resolve()
    stamp, name = _stamp(path), str(path)
    known = _in_process.get(name)
    if known and known[0] == stamp:
        return known[1]
    memo_path = _memo_path()
    try:
        memo = json.loads(memo_path.read_text())
        memo = memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):
        memo = {}
    entry = memo.get(name)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
        digest = entry["sha256"]
    else:
        digest = file_sha256(path)
        if _stamp(path) == stamp:   # not changed while it was read
            memo[name] = {"stamp": stamp, "sha256": digest}
            try:
                memo_path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomically(memo_path, memo)
            except OSError:
                pass   # a read-only cache only loses the saving
    _in_process[name] = (stamp, digest)
    return digest


def checkpoint_path(name: str, weights_id: str) -> Path | None:
    """The file torchvision loads an ImageNet weights member from (TORCH_HOME/hub/checkpoints), None for others."""
    from pipeline.backbones.registry import get_spec

    member = get_spec(name).weights_enum.__members__.get(weights_id)
    if member is None:
        return None
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(member.url).name


def weights_sha256(name: str, weights) -> str:
    """sha256 of the bytes a backbone's weights come from: "none" for random init (seeded), the state-dict
    file's, or the ImageNet checkpoint's (fetched first, as building the model would, when it is not on disk)."""
    from pipeline.backbones.registry import (
        WeightsUnavailable,
        get_spec,
        is_weights_file,
        resolve_weights_id,
        weights_help,
    )

    weights_id = resolve_weights_id(name, weights)
    if weights_id == "none":
        return "none"
    if is_weights_file(weights):
        return remembered_sha256(Path(weights))
    checkpoint = checkpoint_path(name, weights_id)
    if not checkpoint.is_file():
        member = get_spec(name).weights_enum[weights_id]
        try:
            member.get_state_dict(progress=False)   # downloads into TORCH_HOME, as create_backbone would
        except Exception as err:  # offline, blocked download
            raise WeightsUnavailable(weights_help(name, member, err)) from err
    return remembered_sha256(checkpoint)


class WeightsFileMismatch(ValueError):
    """The weights file under the expected name is not the one a head was trained with."""


def check_weights_files(meta: dict, label: str = "this head") -> list[str]:
    """Raise WeightsFileMismatch (one line) when a head's recorded `weights_sha256` ({backbone: sha256}) differs
    from the ImageNet checkpoint now in TORCH_HOME: torchvision finds its weights by file name and does not check
    a file already there, so another file under that name would go unnoticed.

    Returns the backbones whose file is not there yet (torchvision will download it; check again after)."""
    absent = []
    for backbone, expected in (meta.get("weights_sha256") or {}).items():
        path = checkpoint_path(backbone, str(meta["weights"][backbone]))
        if path is None or expected == "none":
            continue
        if not path.is_file():
            absent.append(backbone)
            continue
        found = remembered_sha256(path)
        if found != expected:
            raise WeightsFileMismatch(
                f"{path} is not the {backbone} weights file {label} was trained with (sha256 {found[:16]}..., "
                f"expected {expected[:16]}...); put torchvision's own file there, or point TORCH_HOME elsewhere")
    return absent
