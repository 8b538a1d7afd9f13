"""predict's outputs kept apart from its inputs: -o is never a picture, feature file or head it reads, and
annotated copies never land in (or get read back from) a folder of pictures to label."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from pipeline.inference.records import OUTPUT_SUFFIXES

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HEAD_FILES = ("head.json", "head.safetensors")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def out_problem(out: Path, inputs: Sequence[Path], checkpoints: Sequence[Path]) -> str | None:
    """Why `out` cannot be predict's -o (one line), or None: a wrong suffix, one of the inputs, a head's file
    or a feature file."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        return (f"-o {out}: write .csv, .json or .jsonl (one record per picture), not {out.suffix or 'a file with '}"
                f"{'' if out.suffix else 'no suffix'}")
    if out.is_dir():
        return f"-o {out} is a folder; give a file ending .csv, .json or .jsonl"
    target = out.resolve()
    if any(target == Path(item).resolve() for item in inputs):
        return f"-o {out} is one of the pictures to label; choose another file"
    for checkpoint in checkpoints:
        folder = Path(checkpoint).resolve()
        folder = folder if folder.is_dir() else folder.parent
        if target.parent == folder and target.name in HEAD_FILES:
            return f"-o {out} is a file of the head {checkpoint}; choose another file"
    if out.is_file():
        with out.open("rb") as handle:
            start = handle.read(8)
        if start == HDF5_SIGNATURE:
            return f"-o {out} is a feature file (HDF5); choose another file"
        if out.name == "head.json" and _is_head_meta(out):
            return f"-o {out} is a head's head.json; choose another file"
    return None


def _is_head_meta(path: Path) -> bool:
    try:
        return str(json.loads(path.read_text()).get("format", "")).startswith("utkface-age-head")
    except (OSError, ValueError, AttributeError):
        return False


def annotated_problem(annotated_dir: Path, inputs: Sequence[Path]) -> str | None:
    """One line when the annotated copies would be written inside a folder of pictures to label."""
    target = annotated_dir.resolve()
    for item in inputs:
        folder = Path(item).resolve()
        if folder.is_dir() and _inside(target, folder):
            return (f"the annotated pictures would go to {annotated_dir}, inside the input folder {item}, and be "
                    f"labelled on the next run; choose --annotated-dir outside it")
    return None


def is_annotated_copy(path: Path) -> bool:
    """Whether `path` is an annotated copy predict wrote (a PNG carrying faces.drawing.ANNOTATED_MARK)."""
    if path.suffix.lower() != ".png":
        return False
    from PIL import Image

    from pipeline.faces.drawing import ANNOTATED_MARK

    try:
        with Image.open(path) as image:  # text chunks before the pixels: read with the header
            return image.text.get("Software") == ANNOTATED_MARK
    except (OSError, ValueError):
        return False  # unreadable: left to the decoder, which says why


def drop_own_outputs(files: list[Path], annotated_dir: Path | None) -> tuple[list[Path], int]:
    """(files less predict's own annotated copies, how many were dropped): those inside `annotated_dir`,
    and those marked as annotated copies wherever they are, so a copy is never labelled as a photo."""
    target = None if annotated_dir is None else annotated_dir.resolve()
    kept = [f for f in files if not (target is not None and _inside(f.resolve(), target)) and not is_annotated_copy(f)]
    return kept, len(files) - len(kept)
