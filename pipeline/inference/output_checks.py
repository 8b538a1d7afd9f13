"""predict's outputs kept apart from its inputs: -o is never a picture, feature file or head it reads, and
annotated copies never land in (or get read back from) a folder of pictures to label."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from pipeline.files import OutputConflict, check_output
from pipeline.inference.records import OUTPUT_SUFFIXES


def out_problem(out: Path, inputs: Sequence[Path], checkpoints: Sequence[Path]) -> str | None:
    """Why `out` cannot be predict's -o (one line), or None: a wrong suffix, a folder, one of the inputs,
    a head's file or a feature file."""
    if out.suffix.lower() not in OUTPUT_SUFFIXES:
        return (f"-o {out}: write .csv, .json or .jsonl (one record per picture), not {out.suffix or 'a file with '}"
                f"{'' if out.suffix else 'no suffix'}")
    if out.is_dir():
        return f"-o {out} is a folder; give a file ending .csv, .json or .jsonl"
    try:
        check_output(out, [*inputs, *checkpoints])
    except OutputConflict as err:
        return f"-o {err}"
    return None


def annotated_problem(annotated_dir: Path, inputs: Sequence[Path]) -> str | None:
    """One line when the annotated copies would be written inside a folder of pictures to label."""
    try:
        check_output(annotated_dir, inputs, folder=True)
    except OutputConflict as err:
        return f"{err} (--annotated-dir)"
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
    kept = [f for f in files if not (target is not None and (target == f.resolve() or target in f.resolve().parents))
            and not is_annotated_copy(f)]
    return kept, len(files) - len(kept)
