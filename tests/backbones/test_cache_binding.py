"""The export cache is bound to content: a graph is opened only when its record vouches for its bytes, an edited
shortcut cannot point a run at another checked graph, and a weights file is hashed once per change."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.backbones import engine_cache, onnx_export, weights_hash
from pipeline.backbones.registry import create_backbone, get_spec, output_widths, resolve_weights_id
from pipeline.features.extract import BackboneRunner
from pipeline.images.decoders import make_decoder

CPU = torch.device("cpu")


def quiet(*_):
    pass


def views_of(files) -> torch.Tensor:
    return make_decoder("torch", "cpu").decode([str(f) for f in files]).views


@pytest.mark.slow
def test_an_edited_shortcut_cannot_point_a_run_at_another_checked_graph(utk_folder, calibrated_mobilenet):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: no ONNX export here")
    files = sorted(utk_folder.iterdir())[:2]
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    right = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=quiet)
    other = BackboneRunner(["mobilenet_v2"], {"mobilenet_v2": None}, CPU, engine="onnxruntime", probe_files=files,
                           log=quiet)   # random init: another graph, checked once too
    right_graph, other_graph = right.models["mobilenet_v2"].path, other.models["mobilenet_v2"].path
    assert right_graph != other_graph

    outputs = list(output_widths(get_spec("mobilenet_v2")))
    key = engine_cache.shortcut_key("mobilenet_v2", resolve_weights_id("mobilenet_v2", weights["mobilenet_v2"]),
                                    outputs, ort.__version__)
    shortcut = engine_cache.shortcut_path(key, onnx_export.default_cache_dir())
    stored = json.loads(shortcut.read_text())
    assert stored["graph"] == right_graph.name
    shortcut.write_text(json.dumps({**stored, "graph": other_graph.name}))   # one field edited

    again = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=quiet)
    assert again.models["mobilenet_v2"].path == right_graph
    views = views_of(files)
    np.testing.assert_array_equal(again(views)["mobilenet_v2"]["features"], right(views)["mobilenet_v2"]["features"])

    # The verdict of the random-init graph, relabelled as made for these weights, is not trusted either.
    verdict = json.loads(engine_cache.verdict_path(other_graph).read_text())
    assert verdict["weights_source"] == "none"
    shortcut.write_text(json.dumps({**stored, "graph": other_graph.name}))
    engine_cache.verdict_path(other_graph).write_text(json.dumps({**verdict, "weights_source": key["weights_source"]}))
    onnx_export.record_path(other_graph).write_text(json.dumps({
        **json.loads(onnx_export.record_path(other_graph).read_text()), "weights_id": key["weights_id"]}))
    third = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=quiet)
    assert third.models["mobilenet_v2"].path == right_graph


@pytest.mark.slow
def test_a_cached_graph_whose_bytes_differ_from_its_record_is_exported_again(calibrated_mobilenet, tmp_path):
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: no ONNX export here")
    backbone = create_backbone("mobilenet_v2", str(calibrated_mobilenet))
    path, _ = onnx_export.exported_model(backbone, ort.__version__, tmp_path, log=quiet)
    good = path.read_bytes()
    data, key, digest = onnx_export.read_graph(path)
    assert data == good and key["backbone"] == "mobilenet_v2" and len(digest) == 64

    damaged = bytearray(good)
    damaged[len(damaged) // 2] ^= 0xFF   # one byte of a weight: still a loadable graph, other numbers
    path.write_bytes(bytes(damaged))
    with pytest.raises(onnx_export.CachedGraphMismatch, match="bytes differ"):
        onnx_export.read_graph(path)
    lines = []
    again, exported = onnx_export.exported_model(backbone, ort.__version__, tmp_path, log=lines.append)
    assert again == path and exported and any("exporting it again" in line for line in lines)
    assert onnx_export.read_graph(path)[2] == digest

    # A graph with no digest in its record (made by an older version) is not trusted.
    record = json.loads(onnx_export.record_path(path).read_text())
    onnx_export.record_path(path).write_text(json.dumps(onnx_export.export_key_of(record)))
    with pytest.raises(onnx_export.CachedGraphMismatch, match="older version"):
        onnx_export.read_graph(path)


def test_a_weights_file_is_hashed_once_and_again_when_it_changes(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_export.CACHE_ENV, str(tmp_path / "cache"))
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"one" * 1000)
    hashed = []
    real = weights_hash.file_sha256
    monkeypatch.setattr(weights_hash, "file_sha256", lambda p: hashed.append(p) or real(p))
    first = weights_hash.remembered_sha256(weights)
    assert weights_hash.remembered_sha256(weights) == first and len(hashed) == 1
    weights_hash._in_process.clear()   # a new process: the memo on disk serves
    assert weights_hash.remembered_sha256(weights) == first and len(hashed) == 1
    assert (tmp_path / "cache" / weights_hash.MEMO_FILE).is_file()

    stat = os.stat(weights)
    weights.write_bytes(b"two" * 1000)   # same size; mtime forced back: the ctime and inode still tell
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights_hash.remembered_sha256(weights) != first and len(hashed) == 2
