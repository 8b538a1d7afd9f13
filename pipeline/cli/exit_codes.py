"""The one exit-code rule of every command (featurize, train-head, evaluate, predict, explain, explain --report).

    0  everything asked for was done
    1  failure: nothing (or nothing usable) was produced; the message says why
    2  usage error (click's own code for bad options)
    3  finished, but some inputs were skipped; each one's reason is printed

Scripts can tell "all good" from "look at the skipped list" without parsing text.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path

import click

OK = 0
FAILED = 1
USAGE = 2
SKIPPED = 3


def finish(skipped: int) -> None:
    """End a command that finished: exit 3 when `skipped` inputs were left out, else return (exit 0)."""
    if skipped:
        sys.exit(SKIPPED)


def output_error(path, err: OSError) -> click.ClickException:
    """One line for an output that cannot be written (read-only folder, disk full, ...), naming the path."""
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied (read-only folder?); choose another output"
    elif err.errno == errno.ENOSPC:
        why = "no space left on the device"
    else:
        why = err.strerror or str(err)
    where = path if path is not None else err.filename
    return click.ClickException(f"cannot write {where}: {why}")


def require_writable(path) -> None:
    """Fail early, with one line, when `path` (an output file, or an output folder) cannot be written.

    Probes the folder the output goes in (or, if that does not exist yet, the nearest
    ancestor that mkdir would create it in) with a file that is removed at once.
    """
    folder = Path(path)
    if not folder.is_dir():  # a file to write (maybe one that exists already), or a folder still to be made
        folder = folder.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise click.ClickException(f"cannot write {path}: {folder} is not a folder")
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as err:
        raise output_error(path, err) from None
    probe.unlink()
