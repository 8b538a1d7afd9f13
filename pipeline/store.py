"""The HDF5 feature store: write finished batches safely, resume, merge shards, join backbones, read.

Layout of a feature file (see README, "Feature file layout"):

    /features/<backbone>  [N, 2, D]  pooled last-stage features; view 0 plain, 1 mirrored
    /stages/<backbone>    [N, 2, S]  pooled earlier-stage features, concatenated (attr stage_widths)
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

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

FORMAT = "utkface-age-features/1"
META_COLUMNS = ("path", "age", "gender", "race", "group", "split", "sha256")
_STR = h5py.string_dtype("utf-8")


class SettingsMismatch(ValueError):
    """A file or resume folder was made with other settings than the ones asked for."""


def fingerprint(settings: dict) -> str:
    """Stable short hash of the settings that determine the features."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_mismatch(found: dict, wanted: dict) -> str:
    keys = sorted(set(found) | set(wanted))
    lines = [f"  {k}: file has {found.get(k)!r}, this run wants {wanted.get(k)!r}"
             for k in keys if found.get(k) != wanted.get(k)]
    return "\n".join(lines)


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

    def __init__(self, out_path: Path, settings: dict):
        self.folder = Path(str(out_path) + ".parts")
        self.settings = settings
        manifest = self.folder / "settings.json"
        if manifest.exists():
            found = json.loads(manifest.read_text())
            if found != settings:
                raise SettingsMismatch(
                    f"{self.folder} holds an unfinished job with other settings:\n"
                    f"{describe_mismatch(found, settings)}\n"
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
        with tempfile.NamedTemporaryFile(dir=self.folder, suffix=".tmp", delete=False) as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
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
def _new_h5(out_path: Path):
    """An HDF5 file written under a temporary name, renamed into place only when complete (removed on failure)."""
    out_path = Path(out_path)
    tmp = out_path.with_name(out_path.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as h5:
            yield h5
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)


def _chunks(n: int, d: int) -> tuple[int, int, int] | None:
    """256-row chunks; an empty dataset (every image of a shard failed) cannot be chunked."""
    return (min(256, n), 2, d) if n else None


def _create_datasets(h5: h5py.File, n: int, widths: dict[str, tuple[int, int]], dtype: str) -> None:
    for name, (width, stages_width) in widths.items():
        for group, d in (("features", width), ("stages", stages_width)):
            h5.create_dataset(f"{group}/{name}", shape=(n, 2, d), dtype=dtype, chunks=_chunks(n, d))


def write_meta(h5: h5py.File, meta: dict[str, np.ndarray]) -> None:
    for column in META_COLUMNS:
        values = meta[column]
        if column in ("path", "split"):
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=object), dtype=_STR)
        elif column == "sha256":
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype="S64"))
        else:
            h5.create_dataset(f"meta/{column}", data=np.asarray(values, dtype=np.int16))


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


def assemble(out_path: Path, parts: PartsFolder, meta: dict[str, np.ndarray], widths: dict[str, tuple[int, int]],
             skipped: list[tuple[str, str]], settings: dict, extra_attrs: dict, dtype: str) -> dict:
    """Build the final HDF5 file from the finished batches, then rename it into place.

    meta holds one entry per record given to the job; rows that failed to
    decode are dropped here and added to the skip list.
    """
    kept_rows, failed = [], []
    for part in parts.parts():
        with np.load(part.path) as batch:
            kept_rows.append(batch["rows"])
            failed += list(zip(batch["failed_rows"].tolist(), batch["failed_reasons"].tolist()))
    kept = np.concatenate(kept_rows) if kept_rows else np.zeros(0, dtype=np.int64)
    skipped = list(skipped) + [(str(meta["path"][row]), reason) for row, reason in failed]

    with _new_h5(out_path) as h5:
        write_root_attrs(h5, settings, extra_attrs)
        write_meta(h5, {k: np.asarray(v)[kept] for k, v in meta.items()})
        write_skipped(h5, skipped)
        _create_datasets(h5, len(kept), widths, dtype)
        row = 0
        for part in parts.parts():  # stream: one batch in memory at a time
            with np.load(part.path) as batch:
                n = len(batch["rows"])
                for name in widths:
                    h5[f"features/{name}"][row:row + n] = batch[f"features_{name}"]
                    h5[f"stages/{name}"][row:row + n] = batch[f"stages_{name}"]
            row += n
    return {"written": int(len(kept)), "skipped": skipped}


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


def merge(shard_paths: list[Path], out_path: Path) -> dict:
    """Join shard files (from --shard i/n) into one file equal to a single run's."""
    shards = []
    for path in shard_paths:
        with h5py.File(path, "r") as h5:
            shards.append((path, json.loads(h5.attrs["settings"]), json.loads(h5.attrs["shard"])))
    settings = shards[0][1]
    for path, other, _ in shards[1:]:
        if other != settings:
            raise SettingsMismatch(f"{path} was made with other settings than {shards[0][0]}:\n"
                                   f"{describe_mismatch(other, settings)}")
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
        with _new_h5(out_path) as h5:
            extra = {k: v for k, v in sources[0].attrs.items() if k not in _ROOT_ATTRS + ("shard", "shard_rows")}
            write_root_attrs(h5, settings, {**extra, "shard": json.dumps({"index": 0, "count": 1}),
                                            "merged_from": json.dumps([str(p) for p, _, _ in shards])})
            write_meta(h5, {c: np.concatenate([read_column(s, c) for s in sources]) for c in META_COLUMNS})
            write_skipped(h5, [row for s in sources for row in read_skipped(s)])
            for group in ("features", "stages"):
                for name in sources[0][group]:
                    _copy_rows([s[f"{group}/{name}"] for s in sources], h5, f"{group}/{name}")
    finally:
        for s in sources:
            s.close()
    return {"written": total, "shards": len(shards)}


def join(paths: list[Path], out_path: Path) -> dict:
    """Put the backbones of several files over the same images into one file.

    Typical use: one featurize job per backbone (on different nodes), then one
    file that train-head can fuse. The files must hold the same rows with the
    same ages and splits, and agree on every setting except the backbones.
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
        if same(other) != same(first):
            raise SettingsMismatch(f"{path} was made with other settings than {paths[0]}:\n"
                                   f"{describe_mismatch(same(other), same(first))}")
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
        with _new_h5(out_path) as h5:
            # Where each backbone was computed (node, decoder, library versions) can differ per file.
            origins = [{"path": str(p), "fingerprint": s["fingerprint"],
                        **{k: _plain(src.attrs[k]) for k in ("versions", "data_dir", "decoder_device") if k in src.attrs}}
                       for p, s, src in zip(paths, settings, sources)]
            extra = {k: v for k, v in sources[0].attrs.items() if k not in _ROOT_ATTRS + ("versions", "decoder_device")}
            write_root_attrs(h5, joined, {**extra, "joined_from": origins})
            write_meta(h5, first_meta)
            write_skipped(h5, read_skipped(sources[0]))
            for source, s in zip(sources, settings):
                for name in s["backbones"]:
                    for group in ("features", "stages"):
                        _copy_rows([source[f"{group}/{name}"]], h5, f"{group}/{name}")
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
    if column in ("path", "split"):
        return np.asarray(data.asstr()[()], dtype=object)
    if column == "sha256":
        return data[()].astype(str)
    return data[()].astype(np.int64)


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


def read_settings(path) -> dict:
    with _open(path) as h5:
        settings = json.loads(h5.attrs["settings"])
        settings["fingerprint"] = str(h5.attrs["fingerprint"])
        return settings


def read_meta(path) -> dict[str, np.ndarray]:
    """Every per-row column as a numpy array (strings as object arrays)."""
    with _open(path) as h5:
        return {c: read_column(h5, c) for c in META_COLUMNS}


def read_features(path, backbone: str, kind: str = "last") -> np.ndarray:
    """[N, 2, D] float32 features of one backbone. kind: 'last', 'stages' or 'both' (concatenated)."""
    with _open(path) as h5:
        available = list(h5["features"])
        if backbone not in available:
            raise ValueError(f"{path} has no features for {backbone!r}; it has {', '.join(available)}")
        if kind == "last":
            return h5[f"features/{backbone}"][()].astype(np.float32)
        if kind == "stages":
            return h5[f"stages/{backbone}"][()].astype(np.float32)
        if kind == "both":
            return np.concatenate([h5[f"features/{backbone}"][()], h5[f"stages/{backbone}"][()]],
                                  axis=2).astype(np.float32)
        raise ValueError(f"kind must be last, stages or both, not {kind!r}")


def file_summary(path) -> dict:
    """What a feature file holds, for printing."""
    with _open(path) as h5:
        return {
            "rows": int(len(h5["meta/age"])),
            "skipped": int(len(h5["skipped/path"])),
            "backbones": {name: tuple(h5[f"features/{name}"].shape)
                          for name in json.loads(h5.attrs["settings"])["backbones"]},
            "fingerprint": str(h5.attrs["fingerprint"]),
            "bytes": Path(path).stat().st_size,
        }
