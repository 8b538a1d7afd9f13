"""Small file helpers shared by every stage: content hashes and atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_kind(mode: int) -> str:
    kinds = [(stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")]
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write under a temporary name and rename: a reader sees the old file or the new one, never half of one,
    and after a crash the new one is complete (fsync before the rename). The temporary name is unique per
    process, so two processes writing the same file do not mix their bytes."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError:
        partial.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, value) -> None:
    write_bytes_atomically(path, json.dumps(value, indent=1, sort_keys=True).encode())


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value):
    """A value safe to put in a CSV cell: text that a spreadsheet would run as a formula (it starts with
    =, +, -, @, a tab or a carriage return) gets a leading apostrophe, the usual escape. Numbers pass as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def input_problem(path) -> str | None:
    """Why `path` cannot be read as an input file, as the end of a sentence ("does not exist",
    "is a FIFO, not a file"), or None for a plain file. Follows symbolic links, and says so."""
    link = os.path.islink(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "is a broken symbolic link" if link else "does not exist"
    except OSError as err:
        return f"cannot be read ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return None
    return f"is {file_kind(mode)}{' (through a symbolic link)' if link else ''}, not a file"


class OutputConflict(ValueError):
    """Writing an output there would replace or mix with one of the command's inputs or another kind of artifact."""


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
HEAD_FILES = ("head.json", "head.safetensors")


def artifact_kind(path) -> str | None:
    """"a feature file" (any HDF5 file), "a head checkpoint" (its folder or one of its two files), or None."""
    path = Path(path)
    if path.is_dir():
        return "a head checkpoint" if all((path / name).is_file() for name in HEAD_FILES) else None
    if path.name in HEAD_FILES and all((path.parent / name).is_file() for name in HEAD_FILES):
        return "a head checkpoint"
    try:
        with open(path, "rb") as handle:
            return "a feature file" if handle.read(8) == HDF5_SIGNATURE else None
    except OSError:
        return None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(os.path.abspath(a)) == Path(os.path.abspath(b))


def _inside(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def check_output(out, inputs=(), own_kind: str | None = None, folder: bool = False) -> None:
    """Raise OutputConflict, naming both paths, when writing `out` would replace or mix with an input or artifact.

    Refused: `out` is one of `inputs` (also through a link); a `folder` output inside an input folder (a rerun
    would read the outputs back as inputs); `out` is a feature file or head checkpoint other than `own_kind`
    (the command's own earlier output of the same kind may be replaced).
    """
    out = Path(out)
    for source in map(Path, inputs):
        if out.exists() and source.exists() and _same(out, source):
            raise OutputConflict(f"{out} is one of this command's inputs; writing there would replace it. "
                                 f"Choose another output")
        if folder and source.is_dir() and _inside(out, source):
            raise OutputConflict(f"the output folder {out} is inside the input folder {source}, so a rerun would "
                                 f"read the outputs back as inputs. Choose a folder outside it")
    if out.exists():
        kind = artifact_kind(out)
        if kind is not None and kind != own_kind:
            raise OutputConflict(f"{out} is {kind}; writing this command's output there would replace it. "
                                 f"Choose another output")
        if folder and not out.is_dir():
            raise OutputConflict(f"{out} exists and is not a folder. Choose a new or existing folder")
