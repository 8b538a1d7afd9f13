"""Write a feature file: datasets, metadata, skip list and row groups, assembled from finished parts."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from pipeline.backbones.descriptors import dataset_path
from pipeline.features import provenance
from pipeline.features.layout import (
    FORMAT,
    META_COLUMNS,
    ROW_ARRAY_PREFIX,
    ROW_GROUPS,
    STR_DTYPE,
)
from pipeline.features.parts import PartsFolder
from pipeline.features.safe_io import (
    NotEnoughSpace,
    check_space,
    drop_h5_enospc_noise,
    is_no_space,
    reserve_space,
)
from pipeline.features.read import META_DIGEST_ATTR, meta_digests
from pipeline.features.settings import SettingsMismatch, fingerprint


@contextmanager
def new_h5(out_path: Path, reserve: int = 0):
    """An HDF5 file written under a temporary name, renamed into place only when complete (removed on failure).

    reserve: bytes the file will need about. They are set aside on the disk first (reserve_space),
    so that a disk that fills up meanwhile fails there, cleanly, and not inside libhdf5: after a
    failed write, libhdf5 2.0 crashes the process when it closes the file (at the latest at exit).
    """
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    previous_hooks = drop_h5_enospc_noise()  # a full disk is reported once below, not by every h5py object
    try:
        with h5py.File(tmp, "w") as h5:
            if reserve:
                reserve_space(tmp, reserve)
            yield h5
        if reserve:
            os.truncate(tmp, tmp.stat().st_size)  # give back what was set aside and not used
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_no_space(err):  # objects freed later would report it again: the filter stays
            needed = f"it needs about {reserve / 2**20:.1f} MiB, " if reserve else ""
            raise NotEnoughSpace(f"no space left on the device while writing {out_path} ({needed}"
                                 f"{shutil.disk_usage(out_path.parent).free / 2**20:.1f} MiB free now); "
                                 f"free some space and rerun the same command") from err
        sys.unraisablehook, sys.excepthook = previous_hooks
        raise
    sys.unraisablehook, sys.excepthook = previous_hooks
    os.replace(tmp, out_path)


def row_chunks(n: int, d: int) -> tuple[int, int, int] | None:
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
            h5.create_dataset(dataset_path(output, name), shape=(n, 2, d), dtype=dtype, chunks=row_chunks(n, d))


def write_meta(h5: h5py.File, meta: dict[str, np.ndarray]) -> None:
    """The required META_COLUMNS, then any other per-row column in `meta` (optional ones such as
    subject, box, eyes): strings as utf-8, floats as float32, integers as int64."""
    for column in META_COLUMNS:
        values = meta[column]
        if column in ("path", "split"):
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=object), dtype=STR_DTYPE)
        elif column == "sha256":
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype="S64"))
        else:
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=np.int16))
    for column in (c for c in meta if c not in META_COLUMNS):
        values = np.asarray(meta[column])
        if values.dtype.kind in "OUS":
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=object), dtype=STR_DTYPE)
        elif values.dtype.kind == "f":
            h5.create_dataset(f"meta/{column}", data=values.astype(np.float32))
        else:
            h5.create_dataset(f"meta/{column}", data=values.astype(np.int64))
    # Digests of the columns as read back: read_meta, merge and verify refuse a file whose labels were edited.
    h5["meta"].attrs[META_DIGEST_ATTR] = json.dumps(meta_digests(h5), sort_keys=True)


def write_skipped(h5: h5py.File, skipped: list[tuple[str, str]]) -> None:
    h5.create_dataset("skipped/path", data=np.asarray([s[0] for s in skipped], dtype=object), dtype=STR_DTYPE)
    h5.create_dataset("skipped/reason", data=np.asarray([s[1] for s in skipped], dtype=object), dtype=STR_DTYPE)


# Written from the settings by write_root_attrs; never copied over from another file.
ROOT_ATTRS = ("format", "settings", "fingerprint", "backbones", "weights", "group_edges", "seed",
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
                              dtype=STR_DTYPE if values.dtype == object else values.dtype)
        h5[path][row:row + len(values)] = values


def copy_row_groups(sources: list[h5py.File], h5: h5py.File) -> None:
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
            h5.create_dataset(path, data=values, dtype=STR_DTYPE if string else first.dtype)
        h5[group].attrs.update(dict(holding[0][group].attrs))


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
            for name, outputs in _output_widths(widths).items():
                for output, width in outputs.items():
                    found = batch[f"{output}_{name}"].shape if f"{output}_{name}" in batch.files else None
                    if found is None or found[1:] != (2, width):
                        raise SettingsMismatch(f"{part.path} holds {output} of {name} "
                                               f"{'missing' if found is None else f'{found[-1]} wide'}, not {width}: "
                                               f"made by another graph or version; delete {parts.folder} to "
                                               f"compute every batch again")
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

    with new_h5(out_path, reserve=needed) as h5:
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
    with new_h5(out_path) as h5:
        write_root_attrs(h5, settings, extra_attrs or {})
        write_meta(h5, meta)
        write_skipped(h5, list(skipped))
        n = len(meta["age"])
        widths = {name: (features[name].shape[2], stages[name].shape[2]) for name in features}
        _create_datasets(h5, n, widths, settings.get("dtype", "float16"))
        for name in features:
            h5[f"features/{name}"][...] = features[name]
            h5[f"stages/{name}"][...] = stages[name]
