"""Combine feature files: merge shards of one job, or join per-backbone files of the same images."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.backbones.descriptors import DESCRIPTORS, dataset_path
from pipeline.features import provenance
from pipeline.features.layout import META_COLUMNS
from pipeline.features.read import (
    check_meta,
    meta_columns,
    read_column,
    read_meta,
    read_settings,
    read_skipped,
    settings_of,
)
from pipeline.features.settings import WEIGHTS_SHA256, SettingsMismatch, settings_difference
from pipeline.files import check_output
from pipeline.features.writer import (
    ROOT_ATTRS,
    copy_row_groups,
    new_h5,
    row_chunks,
    write_meta,
    write_root_attrs,
    write_skipped,
)


def merge(shard_paths: list[Path], out_path: Path, allow_mixed: bool = False) -> dict:
    """Join shard files (from --shard i/n) into one file equal to a single run's.

    Shards computed differently (device, precision, decoder, engine) are refused
    unless allow_mixed; the merged file then keeps every shard's row ranges.
    """
    check_output(out_path, shard_paths, own_kind="a feature file")  # never over one of its shards
    shards = []
    for path in shard_paths:
        with h5py.File(path, "r") as h5:
            check_meta(h5, path)
            shards.append((path, settings_of(h5, path), json.loads(h5.attrs["shard"])))
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
        with new_h5(out_path, reserve=sum(Path(p).stat().st_size for p, _, _ in shards) + 2**20) as h5:
            # How each shard was computed, row range by row range (and not only shard 0's decoder).
            ranges = provenance.stacked_ranges([(provenance.read_ranges(s.attrs, st, len(s["meta/age"])),
                                                 len(s["meta/age"])) for s, (_, st, _) in zip(sources, shards)])
            settings = provenance.with_combined(settings, [provenance.range_record(r) for r in ranges])
            per_source = ("shard", "shard_rows", "compute_ranges", "decoder_fallbacks", "decoder_device")
            extra = {k: v for k, v in sources[0].attrs.items() if k not in ROOT_ATTRS + per_source}
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
            copy_row_groups(sources, h5)
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
    check_output(out_path, paths, own_kind="a feature file")  # never over one of the files it joins
    settings = [read_settings(p) for p in paths]
    metas = [read_meta(p) for p in paths]
    first, first_meta = settings[0], metas[0]

    def same(s: dict) -> dict:  # the settings that must agree
        return {k: v for k, v in s.items() if k not in ("backbones", "weights", WEIGHTS_SHA256, "fingerprint")}

    bound = [WEIGHTS_SHA256 in s for s in settings]
    if any(bound) and not all(bound):
        older = paths[bound.index(False)]
        raise SettingsMismatch(f"{older} records no sha256 of its weights (made by an older version) while "
                               f"{paths[bound.index(True)]} does; featurize {older} again to join them")

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
    if all(bound):
        joined[WEIGHTS_SHA256] = {name: s[WEIGHTS_SHA256][name] for s in settings for name in s["backbones"]}
    sources = [h5py.File(p, "r") for p in paths]
    try:
        with new_h5(out_path, reserve=sum(Path(p).stat().st_size for p in paths) + 2**20) as h5:
            # Where each backbone was computed (node, decoder, library versions) can differ per file.
            origins = [{"path": str(p), "fingerprint": s["fingerprint"],
                        **{k: _plain(src.attrs[k]) for k in ("versions", "data_dir", "decoder_device") if k in src.attrs}}
                       for p, s, src in zip(paths, settings, sources)]
            # Same rows, other backbones: every source's ranges hold, side by side.
            ranges = [r for s, src in zip(settings, sources)
                      for r in provenance.read_ranges(src.attrs, s, len(src["meta/age"]))]
            joined = provenance.with_combined(joined, [provenance.range_record(r) for r in ranges])
            per_source = ("versions", "decoder_device", "compute_ranges", "decoder_fallbacks")
            extra = {k: v for k, v in sources[0].attrs.items() if k not in ROOT_ATTRS + per_source}
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
            copy_row_groups(sources[:1], h5)  # same rows in every source
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
                            chunks=row_chunks(total, first.shape[2]))
    out.attrs.update(dict(first.attrs))
    row = 0
    for src in sources:
        for lo in range(0, len(src), 4096):  # bounded memory on big files
            block = src[lo:lo + 4096]
            out[row:row + len(block)] = block
            row += len(block)
