"""The HDF5 feature store: write finished batches safely, resume, merge shards, join backbones, read.

Layout of a feature file (see README, "Feature file layout"):

    /features/<backbone>  [N, 2, D]  pooled last-stage features; view 0 plain, 1 mirrored
    /stages/<backbone>    [N, 2, S]  pooled earlier-stage features, concatenated (attr stage_widths)
    /descriptors/<name>/<backbone>  [N, 2, W]  optional (featurize --descriptors): gem, grid, stage_grid
    /meta/{path, age, gender, race, group, split, sha256}  [N] one row per image
    /skipped/{path, reason}                                 files left out, and why
    attributes on / : settings (JSON), fingerprint, created, versions, shard, ...

While a job runs, each finished batch is written to its own small file in
`<out>.parts/` (written to a temporary name, fsynced, then renamed), so a
crash or kill -9 never loses a finished batch and never leaves a half-written
file. The HDF5 file is assembled from the parts at the end, again under a
temporary name that is renamed into place.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from . import provenance
from .descriptors import DESCRIPTORS, dataset_path, kind_outputs

FORMAT = "utkface-age-features/1"
META_COLUMNS = ("path", "age", "gender", "race", "group", "split", "sha256")   # every file has these
# Written only when a label source gives them (labels.py); files without them stay readable.
# subject [N] utf-8 ('' = none), box [N, 4] float32 x,y,w,h and eyes [N, 4] float32 (NaN = not given).
OPTIONAL_META_COLUMNS = ("subject", "box", "eyes")
_STR = h5py.string_dtype("utf-8")


class SettingsMismatch(ValueError):
    """A file or resume folder was made with other settings than the ones asked for."""


class NotEnoughSpace(ValueError):
    """The disk holding the output is (or would become) full; the message says how much space is needed."""


class OutputLocked(ValueError):
    """Another run is writing the same output."""


def _no_space(err: BaseException) -> bool:
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


def fingerprint(settings: dict) -> str:
    """Stable short hash of the settings that determine the features."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_mismatch(found: dict, wanted: dict) -> str:
    keys = sorted(set(found) | set(wanted))
    lines = [f"  {k}: file has {found.get(k)!r}, this run wants {wanted.get(k)!r}"
             for k in keys if found.get(k) != wanted.get(k)]
    return "\n".join(lines)


def settings_difference(found: dict, wanted: dict, allow_mixed: bool = False) -> str | None:
    """What differs between two settings (None when they agree); compute records are ignored with allow_mixed.

    A difference only in how the numbers were computed (device, precision,
    decoder, engine: provenance.py) says so and names --allow-mixed.
    """
    if allow_mixed:
        found, wanted = provenance.without_compute(found), provenance.without_compute(wanted)
    if found == wanted:
        return None
    text = describe_mismatch(found, wanted)
    if provenance.without_compute(found) == provenance.without_compute(wanted):
        text += ("\n  file computed with: " + provenance.describe_all(found)
                 + "\n  this one with:      " + provenance.describe_all(wanted)
                 + "\n  (" + provenance.MIX_HINT + ")")
    return text


def _atomic_dir_fsync(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- parts


@dataclass
class Part:
    start: int                 # first record index of the batch
    stop: int                  # one past the last
    path: Path


class PartsFolder:
    """Finished batches of an unfinished job, one .npz file each."""

    def __init__(self, out_path: Path, settings: dict, allow_mixed: bool = False):
        """allow_mixed: resume an unfinished job computed another way (its parts keep their own compute record)."""
        self.folder = Path(str(out_path) + ".parts")
        self.settings = settings
        manifest = self.folder / "settings.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())
            difference = settings_difference(found, settings, allow_mixed)
            if difference:
                raise SettingsMismatch(
                    f"{self.folder} holds an unfinished job with other settings:\n"
                    f"{difference}\n"
                    f"Rerun with the same settings to resume, or delete {self.folder} to start over."
                )
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            _write_atomic(manifest, json.dumps(settings, indent=1, sort_keys=True).encode())

    def parts(self) -> list[Part]:
        found = []
        for path in self.folder.glob("rows-*.npz"):
            start, stop = (int(x) for x in path.stem.split("-")[1:3])
            found.append(Part(start, stop, path))
        return sorted(found, key=lambda p: p.start)

    def records(self) -> list[dict]:
        """The distinct compute records of the finished batches (parts from before the record: the manifest's)."""
        found = []
        for part in self.parts():
            with np.load(part.path) as batch:
                found.append(provenance.part_record(batch, self.settings.get(provenance.COMPUTE_KEY)))
        return provenance.records({provenance.COMPUTE_KEY: provenance.combined(found)})

    def rows_done(self) -> int:
        """Records covered by finished batches, which always form a prefix."""
        done = 0
        for part in self.parts():
            if part.start != done:
                break
            done = part.stop
        return done

    def write(self, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
        """Save one finished batch. Only after the rename does it count as done."""
        final = self.folder / f"rows-{start:09d}-{stop:09d}.npz"
        needed = sum(np.asarray(a).nbytes for a in arrays.values()) + 4096  # the part's size, about
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as handle:
            try:
                # Each part carries how it was computed: a resumed job may have computed its rows another way.
                np.savez(handle, **arrays, compute=provenance.part_array(self.settings))
                handle.flush()
                os.fsync(handle.fileno())
            except BaseException as err:  # disk full, Ctrl-C: no half-written .tmp left behind
                try:
                    handle.close()  # now, so that the failing flush of a full disk cannot mask this error
                except OSError:
                    pass
                Path(handle.name).unlink(missing_ok=True)
                if _no_space(err):
                    raise NotEnoughSpace(f"no space left on the device while saving a batch to {self.folder} "
                                         f"(a batch needs about {needed / 2**20:.1f} MiB, "
                                         f"{shutil.disk_usage(self.folder).free / 2**20:.1f} MiB free now); "
                                         f"free some space and rerun the same command to resume") from err
                raise
        os.replace(handle.name, final)
        _atomic_dir_fsync(self.folder)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- writing


@contextmanager
def _new_h5(out_path: Path, reserve: int = 0):
    """An HDF5 file written under a temporary name, renamed into place only when complete (removed on failure).

    reserve: bytes the file will need about. They are set aside on the disk first (_reserve_space),
    so that a disk that fills up meanwhile fails there, cleanly, and not inside libhdf5: after a
    failed write, libhdf5 2.0 crashes the process when it closes the file (at the latest at exit).
    """
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    previous_hooks = _drop_h5_enospc_noise()  # a full disk is reported once below, not by every h5py object
    try:
        with h5py.File(tmp, "w") as h5:
            if reserve:
                _reserve_space(tmp, reserve)
            yield h5
        if reserve:
            os.truncate(tmp, tmp.stat().st_size)  # give back what was set aside and not used
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if _no_space(err):  # objects freed later would report it again: the filter stays
            needed = f"it needs about {reserve / 2**20:.1f} MiB, " if reserve else ""
            raise NotEnoughSpace(f"no space left on the device while writing {out_path} ({needed}"
                                 f"{shutil.disk_usage(out_path.parent).free / 2**20:.1f} MiB free now); "
                                 f"free some space and rerun the same command") from err
        sys.unraisablehook, sys.excepthook = previous_hooks
        raise
    sys.unraisablehook, sys.excepthook = previous_hooks
    os.replace(tmp, out_path)


_FALLOC_FL_KEEP_SIZE = 1   # linux/falloc.h: allocate blocks, keep the file's length


def _reserve_space(path: Path, size: int) -> None:
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


def _drop_h5_enospc_noise():
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


def _chunks(n: int, d: int) -> tuple[int, int, int] | None:
    """256-row chunks; an empty dataset (every image of a shard failed) cannot be chunked."""
    return (min(256, n), 2, d) if n else None


def _output_widths(widths) -> dict[str, dict[str, int]]:
    """{backbone: (width, stages_width)} or {backbone: {output: width}} -> the latter."""
    return {name: (dict(w) if isinstance(w, dict) else {"features": int(w[0]), "stages": int(w[1])})
            for name, w in widths.items()}


def _create_datasets(h5: h5py.File, n: int, widths: dict, dtype: str) -> None:
    """One [n, 2, width] dataset per backbone output (features, stages, then any descriptors)."""
    for name, outputs in _output_widths(widths).items():
        for output, d in outputs.items():
            h5.create_dataset(dataset_path(output, name), shape=(n, 2, d), dtype=dtype, chunks=_chunks(n, d))


def write_meta(h5: h5py.File, meta: dict[str, np.ndarray]) -> None:
    """The required META_COLUMNS, then any other per-row column in `meta` (optional ones such as
    subject, box, eyes): strings as utf-8, floats as float32, integers as int64."""
    for column in META_COLUMNS:
        values = meta[column]
        if column in ("path", "split"):
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=object), dtype=_STR)
        elif column == "sha256":
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype="S64"))
        else:
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=np.int16))
    for column in (c for c in meta if c not in META_COLUMNS):
        values = np.asarray(meta[column])
        if values.dtype.kind in "OUS":
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=object), dtype=_STR)
        elif values.dtype.kind == "f":
            h5.create_dataset(f"meta/{column}", data=values.astype(np.float32))
        else:
            h5.create_dataset(f"meta/{column}", data=values.astype(np.int64))


def write_skipped(h5: h5py.File, skipped: list[tuple[str, str]]) -> None:
    h5.create_dataset("skipped/path", data=np.asarray([s[0] for s in skipped], dtype=object), dtype=_STR)
    h5.create_dataset("skipped/reason", data=np.asarray([s[1] for s in skipped], dtype=object), dtype=_STR)


# Written from the settings by write_root_attrs; never copied over from another file.
_ROOT_ATTRS = ("format", "settings", "fingerprint", "backbones", "weights", "group_edges", "seed",
               "preprocessing", "created")


def write_root_attrs(h5: h5py.File, settings: dict, extra: dict) -> None:
    h5.attrs["format"] = FORMAT
    h5.attrs["settings"] = json.dumps(settings, sort_keys=True)
    h5.attrs["fingerprint"] = fingerprint(settings)
    # Plain attributes too, so h5ls -v and HDFView show them without JSON.
    h5.attrs["backbones"] = ",".join(settings["backbones"])
    h5.attrs["weights"] = json.dumps(settings["weights"], sort_keys=True)
    h5.attrs["group_edges"] = np.asarray(settings["group_edges"], dtype=np.int16)
    h5.attrs["seed"] = settings["seed"]
    h5.attrs["preprocessing"] = json.dumps(settings["preprocessing"], sort_keys=True)
    h5.attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    for key, value in extra.items():
        h5.attrs[key] = value if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True)


# Part arrays named row.<group>.<name> (extract.run: the face record of each kept image) become the
# dataset /<group>/<name> of the final file, one row per kept image, beside the features.
ROW_ARRAY_PREFIX = "row."
ROW_GROUPS = ("faces",)   # groups of such per-row arrays that merge and join carry over


def _write_row_arrays(h5: h5py.File, batch, row: int, total: int) -> None:
    """Copy a part's per-row arrays (ROW_ARRAY_PREFIX) into rows row.. of their datasets, creating them once."""
    for key in batch.files:
        if not key.startswith(ROW_ARRAY_PREFIX):
            continue
        path, values = key[len(ROW_ARRAY_PREFIX):].replace(".", "/"), batch[key]
        if values.dtype.kind in "OUS":
            values = np.asarray(values, dtype=object)
        if path not in h5:
            h5.create_dataset(path, shape=(total,) + values.shape[1:],
                              dtype=_STR if values.dtype == object else values.dtype)
        h5[path][row:row + len(values)] = values


def _copy_row_groups(sources: list[h5py.File], h5: h5py.File) -> None:
    """The ROW_GROUPS datasets of `sources`, their rows concatenated in order (small: a few numbers per row).

    Every dataset any source has is copied. A source without rows (a shard planned empty, or whose
    images all failed) has none and adds nothing; a source with rows that lacks one is an error.
    """
    for group in ROW_GROUPS:
        holding = [s for s in sources if group in s]
        if not holding:
            continue
        with_rows = [s for s in sources if len(s["meta/age"])]
        for name in dict.fromkeys(name for s in holding for name in s[group]):
            path = f"{group}/{name}"
            first = next(s[path] for s in holding if path in s)
            lacking = [s.filename for s in with_rows if path not in s]
            if lacking:
                raise ValueError(f"{lacking[0]} has no /{path} but {first.file.filename} has; these files were "
                                 f"not made the same way (e.g. --faces), so their rows cannot be put together")
            string = h5py.check_string_dtype(first.dtype) is not None
            parts = [s[path].asstr()[()] if string else s[path][()] for s in with_rows]
            values = (np.concatenate([np.asarray(p, dtype=object) if string else p for p in parts]) if parts
                      else np.zeros((0,) + first.shape[1:], dtype=object if string else first.dtype))
            h5.create_dataset(path, data=values, dtype=_STR if string else first.dtype)
        h5[group].attrs.update(dict(holding[0][group].attrs))


def read_row_group(path, group: str = "faces") -> dict[str, np.ndarray]:
    """The per-row arrays of one ROW_GROUPS group ({} when the file has none), strings as str."""
    with _open(path) as h5:
        if group not in h5:
            return {}
        return {name: (data.asstr()[()] if h5py.check_string_dtype(data.dtype) is not None else data[()])
                for name, data in h5[group].items()}


def assemble(out_path: Path, parts: PartsFolder, meta: dict[str, np.ndarray], widths: dict[str, tuple[int, int]],
             skipped: list[tuple[str, str]], settings: dict, extra_attrs: dict, dtype: str,
             allow_mixed: bool = False) -> dict:
    """Build the final HDF5 file from the finished batches, then rename it into place.

    meta holds one entry per record given to the job; rows that failed to
    decode are dropped here and added to the skip list. Batches computed in
    different ways (their compute records differ: a resume on another engine,
    device or decoder) are refused (SettingsMismatch) unless allow_mixed.
    """
    kept_rows, failed, fallbacks, ranges = [], [], [], []
    for part in parts.parts():
        with np.load(part.path) as batch:
            kept_rows.append(batch["rows"])
            failed += list(zip(batch["failed_rows"].tolist(), batch["failed_reasons"].tolist()))
            if "fallback_paths" in batch.files:  # files a GPU decoder handed to the CPU (extract.run)
                fallbacks += list(zip(batch["fallback_paths"].tolist(), batch["fallback_reasons"].tolist()))
            start = sum(len(r) for r in kept_rows[:-1])  # rows of the final file, after dropping failures
            provenance.add_range(ranges, start, start + len(batch["rows"]),
                                 provenance.part_record(batch, settings.get(provenance.COMPUTE_KEY)),
                                 list(settings["backbones"]))
    distinct = provenance.combined([provenance.range_record(r) for r in ranges])
    if isinstance(distinct, list) and not allow_mixed:
        raise SettingsMismatch(mixed_parts_message(parts.folder, distinct))
    kept = np.concatenate(kept_rows) if kept_rows else np.zeros(0, dtype=np.int64)
    skipped = list(skipped) + [(str(meta["path"][row]), reason) for row, reason in failed]
    # The file's compute is what its parts record: one record, or every distinct one when a resume mixed them.
    settings = provenance.with_combined(settings, [provenance.range_record(r) for r in ranges]
                                        or provenance.records(settings))
    fallback_summary = provenance.fallback_summary(fallbacks)
    extra_attrs = {**extra_attrs, "compute_ranges": ranges, "decoder_fallbacks": fallback_summary}
    # The file holds what the parts hold (plus metadata): check before writing, so a full disk is one message.
    needed = sum(p.path.stat().st_size for p in parts.parts()) + 2**20
    check_space(out_path, needed, f"; the finished batches in {parts.folder} are kept")

    with _new_h5(out_path, reserve=needed) as h5:
        write_root_attrs(h5, settings, extra_attrs)
        write_meta(h5, {k: np.asarray(v)[kept] for k, v in meta.items()})
        write_skipped(h5, skipped)
        _create_datasets(h5, len(kept), widths, dtype)
        row = 0
        for part in parts.parts():  # stream: one batch in memory at a time
            with np.load(part.path) as batch:
                n = len(batch["rows"])
                for name, outputs in _output_widths(widths).items():
                    for output in outputs:  # part arrays are named <output>_<backbone> (extract._compute_batch)
                        h5[dataset_path(output, name)][row:row + n] = batch[f"{output}_{name}"]
                _write_row_arrays(h5, batch, row, len(kept))
            row += n
    return {"written": int(len(kept)), "skipped": skipped, "settings": settings, "compute_ranges": ranges,
            "fallbacks": fallback_summary}


def mixed_parts_message(folder: Path, records: list[dict]) -> str:
    """Why batches computed in different ways are not put into one file (without --allow-mixed)."""
    return (f"the finished batches in {folder} were computed in different ways: "
            + " + ".join(provenance.describe(r) for r in records)
            + f"; {provenance.MIX_HINT}, or delete {folder} to compute every batch again")


def write_feature_file(out_path: Path, settings: dict, meta: dict[str, np.ndarray],
                       features: dict[str, np.ndarray], stages: dict[str, np.ndarray],
                       skipped: list[tuple[str, str]] = (), extra_attrs: dict | None = None) -> None:
    """Write a whole feature file from in-memory arrays (small files, tests, tools)."""
    with _new_h5(out_path) as h5:
        write_root_attrs(h5, settings, extra_attrs or {})
        write_meta(h5, meta)
        write_skipped(h5, list(skipped))
        n = len(meta["age"])
        widths = {name: (features[name].shape[2], stages[name].shape[2]) for name in features}
        _create_datasets(h5, n, widths, settings.get("dtype", "float16"))
        for name in features:
            h5[f"features/{name}"][...] = features[name]
            h5[f"stages/{name}"][...] = stages[name]


def merge(shard_paths: list[Path], out_path: Path, allow_mixed: bool = False) -> dict:
    """Join shard files (from --shard i/n) into one file equal to a single run's.

    Shards computed differently (device, precision, decoder, engine) are refused
    unless allow_mixed; the merged file then keeps every shard's row ranges.
    """
    shards = []
    for path in shard_paths:
        with h5py.File(path, "r") as h5:
            shards.append((path, _settings_of(h5, path), json.loads(h5.attrs["shard"])))
    settings = shards[0][1]
    for path, other, _ in shards[1:]:
        difference = settings_difference(other, settings, allow_mixed)
        if difference:
            raise SettingsMismatch(f"{path} was made with other settings than {shards[0][0]}:\n{difference}")
    shards.sort(key=lambda s: s[2]["index"])
    count = shards[0][2]["count"]
    if any(s[2]["count"] != count for s in shards):
        raise ValueError("these files come from runs split into different numbers of shards: "
                         + ", ".join(f"{p} ({s['index']}/{s['count']})" for p, _, s in shards))
    indices = [s[2]["index"] for s in shards]
    if indices != list(range(count)):
        missing = sorted(set(range(count)) - set(indices))
        raise ValueError(f"merge needs all {count} shards; missing {missing}, got {indices}")

    sources = [h5py.File(p, "r") for p, _, _ in shards]
    try:
        total = sum(len(s["meta/age"]) for s in sources)
        with _new_h5(out_path, reserve=sum(Path(p).stat().st_size for p, _, _ in shards) + 2**20) as h5:
            # How each shard was computed, row range by row range (and not only shard 0's decoder).
            ranges = provenance.stacked_ranges([(provenance.read_ranges(s.attrs, st, len(s["meta/age"])),
                                                 len(s["meta/age"])) for s, (_, st, _) in zip(sources, shards)])
            settings = provenance.with_combined(settings, [provenance.range_record(r) for r in ranges])
            per_source = ("shard", "shard_rows", "compute_ranges", "decoder_fallbacks", "decoder_device")
            extra = {k: v for k, v in sources[0].attrs.items() if k not in _ROOT_ATTRS + per_source}
            write_root_attrs(h5, settings, {
                **extra, "shard": json.dumps({"index": 0, "count": 1}),
                "merged_from": json.dumps([str(p) for p, _, _ in shards]), "compute_ranges": ranges,
                "decoder_device": ",".join(dict.fromkeys(str(_plain(s.attrs.get("decoder_device", "")))
                                                         for s in sources)),
                "decoder_fallbacks": provenance.merged_fallbacks(
                    [_plain(s.attrs["decoder_fallbacks"]) for s in sources if "decoder_fallbacks" in s.attrs])})
            write_meta(h5, {c: np.concatenate([read_column(s, c) for s in sources]) for c in meta_columns(sources[0])})
            write_skipped(h5, [row for s in sources for row in read_skipped(s)])
            for name in sources[0]["features"]:
                for path in _backbone_datasets(sources[0], name):
                    _copy_rows([s[path] for s in sources], h5, path)
            _copy_row_groups(sources, h5)
    finally:
        for s in sources:
            s.close()
    return {"written": total, "shards": len(shards)}


def join(paths: list[Path], out_path: Path, allow_mixed: bool = False) -> dict:
    """Put the backbones of several files over the same images into one file.

    Typical use: one featurize job per backbone (on different nodes), then one
    file that train-head can fuse. The files must hold the same rows with the
    same ages and splits, and agree on every setting except the backbones; files
    computed differently (provenance.py) only with allow_mixed.
    """
    if len(paths) < 2:
        raise ValueError("join needs at least two feature files")
    settings = [read_settings(p) for p in paths]
    metas = [read_meta(p) for p in paths]
    first, first_meta = settings[0], metas[0]

    def same(s: dict) -> dict:  # the settings that must agree
        return {k: v for k, v in s.items() if k not in ("backbones", "weights", "fingerprint")}

    backbones: list[str] = []
    for path, other, meta in zip(paths, settings, metas):
        difference = settings_difference(same(other), same(first), allow_mixed)
        if difference:
            raise SettingsMismatch(f"{path} was made with other settings than {paths[0]}:\n{difference}")
        for column in META_COLUMNS:
            if len(meta[column]) != len(first_meta[column]) or np.any(meta[column] != first_meta[column]):
                raise ValueError(f"{path} and {paths[0]} do not hold the same images in the same order "
                                 f"(meta/{column} differs); join needs files featurized from the same data")
        twice = [b for b in other["backbones"] if b in backbones]
        if twice:
            raise ValueError(f"{path} holds {', '.join(twice)}, which an earlier file already has")
        backbones += other["backbones"]

    joined = {**same(first), "backbones": backbones,
              "weights": {name: s["weights"][name] for s in settings for name in s["backbones"]}}
    sources = [h5py.File(p, "r") for p in paths]
    try:
        with _new_h5(out_path, reserve=sum(Path(p).stat().st_size for p in paths) + 2**20) as h5:
            # Where each backbone was computed (node, decoder, library versions) can differ per file.
            origins = [{"path": str(p), "fingerprint": s["fingerprint"],
                        **{k: _plain(src.attrs[k]) for k in ("versions", "data_dir", "decoder_device") if k in src.attrs}}
                       for p, s, src in zip(paths, settings, sources)]
            # Same rows, other backbones: every source's ranges hold, side by side.
            ranges = [r for s, src in zip(settings, sources)
                      for r in provenance.read_ranges(src.attrs, s, len(src["meta/age"]))]
            joined = provenance.with_combined(joined, [provenance.range_record(r) for r in ranges])
            per_source = ("versions", "decoder_device", "compute_ranges", "decoder_fallbacks")
            extra = {k: v for k, v in sources[0].attrs.items() if k not in _ROOT_ATTRS + per_source}
            write_root_attrs(h5, joined, {**extra, "joined_from": origins, "compute_ranges": ranges,
                                          "decoder_fallbacks": provenance.merged_fallbacks(
                                              [_plain(src.attrs["decoder_fallbacks"]) for src in sources
                                               if "decoder_fallbacks" in src.attrs])})
            write_meta(h5, first_meta)
            write_skipped(h5, read_skipped(sources[0]))
            for source, s in zip(sources, settings):
                for name in s["backbones"]:
                    for path in _backbone_datasets(source, name):
                        _copy_rows([source[path]], h5, path)
            _copy_row_groups(sources[:1], h5)  # same rows in every source
    finally:
        for source in sources:
            source.close()
    return {"written": len(first_meta["age"]), "backbones": backbones}


def _plain(value):
    """An HDF5 attribute as JSON-ready Python (JSON strings decoded)."""
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value.tolist() if hasattr(value, "tolist") else value


def _backbone_datasets(h5: h5py.File, backbone: str) -> list[str]:
    """Paths of every dataset a file holds for one backbone: features, stages, then its descriptors."""
    paths = [f"features/{backbone}", f"stages/{backbone}"]
    return paths + [dataset_path(d, backbone) for d in DESCRIPTORS if dataset_path(d, backbone) in h5]


def _copy_rows(sources: list[h5py.Dataset], h5: h5py.File, name: str) -> None:
    """One new dataset holding the rows of `sources` in order (attributes from the first), copied in blocks."""
    first = sources[0]
    total = sum(len(src) for src in sources)
    out = h5.create_dataset(name, shape=(total,) + first.shape[1:], dtype=first.dtype,
                            chunks=_chunks(total, first.shape[2]))
    out.attrs.update(dict(first.attrs))
    row = 0
    for src in sources:
        for lo in range(0, len(src), 4096):  # bounded memory on big files
            block = src[lo:lo + 4096]
            out[row:row + len(block)] = block
            row += len(block)


# --------------------------------------------------------------------------- reading


def read_column(h5: h5py.File, column: str) -> np.ndarray:
    data = h5[f"meta/{column}"]
    if column in ("path", "split") or h5py.check_string_dtype(data.dtype) is not None and column != "sha256":
        return np.asarray(data.asstr()[()], dtype=object)
    if column == "sha256":
        return data[()].astype(str)
    if data.dtype.kind == "f":
        return data[()].astype(np.float32)
    return data[()].astype(np.int64)


def meta_columns(h5: h5py.File) -> list[str]:
    """The per-row columns a file holds: the required ones, then the optional ones it has, in name order."""
    return list(META_COLUMNS) + sorted(c for c in h5["meta"] if c not in META_COLUMNS)


def read_skipped(h5: h5py.File) -> list[tuple[str, str]]:
    paths = h5["skipped/path"].asstr()[()]
    reasons = h5["skipped/reason"].asstr()[()]
    return list(zip(paths.tolist(), reasons.tolist()))


def _open(path) -> h5py.File:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature file {path} does not exist")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file: {err}") from err
    if h5.attrs.get("format") != FORMAT:
        h5.close()
        raise ValueError(f"{path} is not a feature file made by featurize (format attribute missing)")
    return h5


def _settings_of(h5: h5py.File, path) -> dict:
    """The settings attribute as a dict; a damaged one is a ValueError naming the file."""
    try:
        settings = json.loads(h5.attrs["settings"])
    except KeyError:
        raise ValueError(f"{path} is damaged: it has no 'settings' attribute") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is damaged: its 'settings' attribute is not JSON ({err})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is damaged: its 'settings' attribute is not a JSON object")
    return settings


def read_settings(path) -> dict:
    with _open(path) as h5:
        settings = _settings_of(h5, path)
        settings["fingerprint"] = str(h5.attrs.get("fingerprint", ""))
        return settings


def read_meta(path) -> dict[str, np.ndarray]:
    """Every per-row column as a numpy array (strings as object arrays)."""
    with _open(path) as h5:
        missing = [c for c in META_COLUMNS if f"meta/{c}" not in h5]
        if missing:
            raise ValueError(f"{path} is damaged: it lacks {', '.join('meta/' + c for c in missing)}")
        return {c: read_column(h5, c) for c in meta_columns(h5)}


def read_features(path, backbone: str, kind: str = "last") -> np.ndarray:
    """[N, 2, D] float32 features of one backbone.

    kind: 'last', 'stages', 'both' (last + stages), a descriptor ('gem', 'grid',
    'stage_grid'), or several joined with '+' (e.g. 'both+grid'), concatenated in that order.
    """
    outputs = kind_outputs(kind)
    with _open(path) as h5:
        available = list(h5["features"])
        if backbone not in available:
            raise ValueError(f"{path} has no features for {backbone!r}; it has {', '.join(available)}")
        missing = [o for o in outputs if dataset_path(o, backbone) not in h5]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} descriptor for {backbone}; featurize with "
                             f"--descriptors {','.join(missing)} to compute it")
        arrays = [h5[dataset_path(o, backbone)] for o in outputs]
        n = arrays[0].shape[0]
        rows = len(h5["meta/age"]) if "meta/age" in h5 else n
        short = [(a.name, a.shape[0]) for a in arrays if a.shape[0] != rows]
        if short:  # a damaged or hand-edited file: rows would be matched to the wrong images
            raise ValueError(f"{path} is damaged: {short[0][0]} has {short[0][1]} rows but meta has {rows}")
        out = np.empty((n, 2, sum(a.shape[2] for a in arrays)), dtype=np.float32)
        column = 0
        for array in arrays:  # straight into the float32 result: no float16 concatenated copy in between
            width = array.shape[2]
            for lo in range(0, n, 4096):
                out[lo:lo + 4096, :, column:column + width] = array[lo:lo + 4096]
            column += width
        return out


def file_summary(path) -> dict:
    """What a feature file holds, for printing."""
    with _open(path) as h5:
        return {
            "rows": int(len(h5["meta/age"])),
            "skipped": int(len(h5["skipped/path"])),
            "backbones": {name: tuple(h5[f"features/{name}"].shape)
                          for name in _settings_of(h5, path).get("backbones", [])},
            "fingerprint": str(h5.attrs["fingerprint"]),
            "bytes": Path(path).stat().st_size,
        }
