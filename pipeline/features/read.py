"""Read a feature file: its settings, its metadata columns, its features and a summary."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.backbones.descriptors import dataset_path, kind_outputs
from pipeline.features.layout import FORMAT, META_COLUMNS
from pipeline.features.settings import fingerprint
from pipeline.files import input_problem

META_DIGEST_ATTR = "sha256"   # on the meta group: JSON {column: sha256 of its values}, written with them


def read_row_group(path, group: str = "faces") -> dict[str, np.ndarray]:
    """The per-row arrays of one ROW_GROUPS group ({} when the file has none), strings as str."""
    with _open(path) as h5:
        if group not in h5:
            return {}
        return {name: (data.asstr()[()] if h5py.check_string_dtype(data.dtype) is not None else data[()])
                for name, data in h5[group].items()}


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


def meta_digests(h5: h5py.File) -> dict[str, str]:
    """{column: sha256 of its values as read_column gives them}: what writer.write_meta stores beside the columns."""
    found = {}
    for column in meta_columns(h5):
        values = read_column(h5, column)
        digest = hashlib.sha256(f"{values.shape}".encode())
        if values.dtype == object or values.dtype.kind in "US":
            for value in values.reshape(-1):
                data = str(value).encode("utf-8", "surrogatepass")
                digest.update(len(data).to_bytes(8, "little") + data)
        else:
            digest.update(np.ascontiguousarray(values).tobytes())
        found[column] = digest.hexdigest()
    return found


def meta_problem(h5: h5py.File) -> str | None:
    """Which meta columns differ from the digests written with them (None when all agree, or the file has none)."""
    stored = h5["meta"].attrs.get(META_DIGEST_ATTR) if "meta" in h5 else None
    if stored is None:
        return None   # files written before the digest existed
    try:
        stored = json.loads(stored)
    except ValueError:
        return "its meta digest attribute is not JSON"
    now = meta_digests(h5)
    changed = sorted(c for c in set(stored) | set(now) if stored.get(c) != now.get(c))
    if not changed:
        return None
    return (f"{', '.join('meta/' + c for c in changed)} changed after the file was written "
            f"(the sha256 stored with the columns no longer matches)")


def check_meta(h5: h5py.File, path) -> None:
    problem = meta_problem(h5)
    if problem:
        raise ValueError(f"{path} is damaged: {problem}; featurize it again")


def read_skipped(h5: h5py.File) -> list[tuple[str, str]]:
    paths = h5["skipped/path"].asstr()[()]
    reasons = h5["skipped/reason"].asstr()[()]
    return list(zip(paths.tolist(), reasons.tolist()))


def _open(path) -> h5py.File:
    path = Path(path)
    problem = input_problem(path)
    if problem:
        raise FileNotFoundError(f"feature file {path} {problem}")
    try:
        h5 = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path} is not a readable HDF5 file: {err}") from err
    if h5.attrs.get("format") != FORMAT:
        h5.close()
        raise ValueError(f"{path} is not a feature file made by featurize (format attribute missing)")
    return h5


def settings_of(h5: h5py.File, path) -> dict:
    """The settings attribute as a dict; a damaged one is a ValueError naming the file."""
    try:
        settings = json.loads(h5.attrs["settings"])
    except KeyError:
        raise ValueError(f"{path} is damaged: it has no 'settings' attribute") from None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path} is damaged: its 'settings' attribute is not JSON ({err})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{path} is damaged: its 'settings' attribute is not a JSON object")
    stored = h5.attrs.get("fingerprint")
    stored = stored.decode() if isinstance(stored, bytes) else stored
    if stored is not None and fingerprint(settings) != str(stored):  # every file's fingerprint is of its settings
        raise ValueError(f"{path} is damaged: its 'settings' attribute was changed after the file was written "
                         f"(it no longer matches the fingerprint {stored}); featurize it again")
    return settings


def read_settings(path) -> dict:
    with _open(path) as h5:
        settings = settings_of(h5, path)
        settings["fingerprint"] = str(h5.attrs.get("fingerprint", ""))
        return settings


def read_meta(path) -> dict[str, np.ndarray]:
    """Every per-row column as a numpy array (strings as object arrays)."""
    with _open(path) as h5:
        missing = [c for c in META_COLUMNS if f"meta/{c}" not in h5]
        if missing:
            raise ValueError(f"{path} is damaged: it lacks {', '.join('meta/' + c for c in missing)}")
        check_meta(h5, path)
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
                          for name in settings_of(h5, path).get("backbones", [])},
            "fingerprint": str(h5.attrs["fingerprint"]),
            "bytes": Path(path).stat().st_size,
        }
