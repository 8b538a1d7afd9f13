"""Safe output: one writer per file (a lock), disk space reserved before writing, and ENOSPC reported in one line."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path


class NotEnoughSpace(ValueError):
    """The disk holding the output is (or would become) full; the message says how much space is needed."""


class OutputLocked(ValueError):
    """Another run is writing the same output."""


def is_no_space(err: BaseException) -> bool:
    """ENOSPC, also when HDF5 reports it only in its message."""
    return isinstance(err, OSError) and (err.errno == errno.ENOSPC or "No space left" in str(err))


@contextmanager
def output_lock(out_path: Path):
    """Hold `<out>.lock` (fcntl.flock, with our pid inside) while a job writes `out` and its parts folder.

    A second job on the same output fails at once with OutputLocked naming the holder's pid,
    instead of the two renaming each other's temporary files away. The kernel drops the lock
    when the process dies, so a killed job never leaves a stale lock.
    """
    lock_path = Path(str(out_path) + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise OutputLocked(f"another featurize run (pid {holder}) is writing {out_path}; wait for it to "
                               f"finish or choose another -o (lock file {lock_path})") from None
        try:  # the holder may have removed the file just before we locked it: then lock the new one
            current = os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


_FALLOC_FL_KEEP_SIZE = 1   # linux/falloc.h: allocate blocks, keep the file's length


def reserve_space(path: Path, size: int) -> None:
    """Allocate `size` bytes of disk to `path` now, without changing its length (Linux fallocate(2)).

    A full disk raises OSError(ENOSPC) here, before libhdf5 writes anything big. Where fallocate
    does not exist (other systems) or the file system does not support it, nothing is reserved.
    """
    import ctypes

    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    handle = os.open(path, os.O_RDWR)
    try:
        if fallocate(handle, _FALLOC_FL_KEEP_SIZE, 0, int(size)) != 0:
            code = ctypes.get_errno()
            if code in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    finally:
        os.close(handle)


def drop_h5_enospc_noise():
    """Make sys.unraisablehook and sys.excepthook drop h5py's tracebacks about ENOSPC; returns the old pair.

    When the disk fills up, every h5py object freed afterwards prints a traceback (Cython
    prints it through both hooks) for the same error, a dozen for one file; _new_h5
    reports it once, as NotEnoughSpace. Every other error still reaches the old hooks.
    """
    unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook

    def unraisable(info):
        if "errno = 28" not in str(info.exc_value):
            unraisable_hook(info)

    def excepthook(kind, value, traceback):
        if not (kind is RuntimeError and "errno = 28" in str(value)):
            except_hook(kind, value, traceback)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    return unraisable_hook, except_hook


def check_space(out_path: Path, needed: int, keep_note: str = "") -> None:
    """Refuse to start writing `needed` bytes next to out_path when the disk has less free (NotEnoughSpace)."""
    folder = Path(out_path).resolve().parent
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise NotEnoughSpace(f"not enough space to write {out_path}: it needs about {needed / 2**20:.1f} MiB "
                             f"in {folder}, and {free / 2**20:.1f} MiB are free. Free some space and rerun "
                             f"the same command{keep_note}")
