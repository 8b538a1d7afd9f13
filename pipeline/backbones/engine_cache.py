"""What a later run may skip on the ONNX Runtime engine: the check of a cached graph, and building PyTorch at all.

Two small JSON files live beside a cached graph (onnx_export.py):
  <graph>.checked.json           the verdict that the graph passed the check against PyTorch
                                 (engines.verified_onnx_backbone); trusted only for the same graph bytes,
                                 ONNX Runtime version, CPU model and tolerance, else the check runs again.
                                 It also names the weights' source the graph was checked against.
  <backbone>-<hash>.source.json  the shortcut from the weights' source (checkpoint sha256 or weights file
                                 id) to that graph, so a run opens it without building PyTorch; its key also
                                 holds the library versions, the outputs and a digest of the forward's code.
A shortcut is followed only when the graph's own record (onnx_export.read_graph: name, export key, bytes)
describes this backbone, weights id, outputs and versions, and its verdict names the same weights' source;
an edited shortcut therefore cannot point a run at another checked graph.
Both are written under a temporary name and renamed; an unreadable or mismatching file counts as absent,
and a read-only cache only loses the saving.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from pathlib import Path

from pipeline.files import file_sha256

VERDICT_SUFFIX = ".checked.json"   # beside the cached graph: it passed the check against PyTorch
VERDICT_FORMAT = 2                 # bump when the check itself changes, so older verdicts are not trusted
SHORTCUT_SUFFIX = ".source.json"
SHORTCUT_FORMAT = 2


def cpu_name() -> str:
    """The CPU's model name (Linux), else the platform's machine type."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine() or "unknown"


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _write_json(path: Path, value: dict) -> None:
    """Written atomically; a cache folder that is not writable only loses the saving."""
    from pipeline.files import write_json_atomically

    try:
        write_json_atomically(path, value)
    except OSError:
        pass


# ----------------------------------------------------------------------------- verdicts


def verdict_path(graph: Path) -> Path:
    return Path(graph).with_suffix(VERDICT_SUFFIX)


def verdict_key(graph: Path, runtime_version: str, tolerance: float, graph_sha256: str | None = None) -> dict:
    """What a stored verdict must match to be trusted: the graph's bytes, the runtime, the CPU and the check.

    The graph's file name already encodes its export key (backbone, weights
    digest, outputs, opset, library versions, see onnx_export.cache_key); the
    file's sha256 guards against a graph replaced or damaged under that name.
    The CPU is in it because ONNX Runtime picks its kernels per instruction set,
    so a cache folder shared between machines is checked again on each kind.
    graph_sha256: the digest onnx_export.read_graph computed of the bytes opened (hashed here when not given).
    """
    return {"format": VERDICT_FORMAT, "graph": Path(graph).name, "graph_sha256": graph_sha256 or file_sha256(graph),
            "onnxruntime": runtime_version, "cpu": cpu_name(), "tolerance": tolerance}


def recorded_verdict(graph: Path, key: dict) -> dict | None:
    """The stored verdict of `graph` when it was made for exactly `key`, else None."""
    verdict = _read_json(verdict_path(graph))
    return verdict if verdict is not None and verdict.get("key") == key else None


def record_verdict(graph: Path, key: dict, difference: float, views: int, source: str | None = None) -> None:
    """source: the weights' source (weights_source) the graph was checked against, when known."""
    _write_json(verdict_path(graph), {"key": key, "max_abs_difference": difference, "views": views,
                                      "weights_source": source,
                                      "checked": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


# ----------------------------------------------------------------------------- shortcuts


def weights_source(name: str, weights_id: str) -> str | None:
    """Where the backbone's weights come from, as content, without building it; None when not on disk yet.

    Random init ("none") is seeded and the same in every process of one torch
    version; a weights file's id already holds a digest of its bytes
    (registry.weights_file_id); an ImageNet enum member is the checkpoint file
    torchvision loads from TORCH_HOME, hashed once and remembered (weights_hash.py;
    far cheaper than building and folding the model).
    """
    if weights_id == "none" or weights_id.startswith("file:"):
        return weights_id
    from pipeline.backbones.registry import get_spec

    if weights_id not in get_spec(name).weights_enum.__members__:
        return None
    from pipeline.backbones.weights_hash import checkpoint_path, remembered_sha256

    checkpoint = checkpoint_path(name, weights_id)
    return f"{weights_id}:sha256={remembered_sha256(checkpoint)}" if checkpoint.is_file() else None


def forward_code_digest() -> str:
    """sha256 of the modules whose code shapes a backbone's exported forward pass (a code change is a new key)."""
    from pipeline.backbones import descriptors, onnx_export
    from pipeline.backbones import registry as backbones

    digest = hashlib.sha256()
    for module in (backbones, descriptors, onnx_export):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def shortcut_key(name: str, weights_id: str, outputs: list[str], runtime_version: str) -> dict | None:
    """Everything the graph of this backbone depends on, known without building it; None when not all is known."""
    from pipeline.backbones.onnx_export import (
        EXPORT_FORMAT,
        EXPORTER,
        OPSET,
        ExportUnavailable,
        exporter_versions,
    )

    source = weights_source(name, weights_id)
    if source is None:
        return None
    try:
        versions = exporter_versions()
    except ExportUnavailable:   # no exporter: the full path knows how to find a graph exported earlier
        return None
    return {"format": SHORTCUT_FORMAT, "export_format": EXPORT_FORMAT, "backbone": name, "weights_id": weights_id,
            "weights_source": source, "outputs": list(outputs), "opset": OPSET, "exporter": EXPORTER,
            "versions": {**versions, "onnxruntime": runtime_version}, "code": forward_code_digest()}


def shortcut_path(key: dict, cache_dir: Path) -> Path:
    from pipeline.backbones.onnx_export import cached_path

    return cached_path(key, cache_dir, SHORTCUT_SUFFIX)


def remembered_graph(key: dict, cache_dir: Path) -> Path | None:
    """The graph a shortcut with exactly this key points to, when that file is still there."""
    shortcut = _read_json(shortcut_path(key, cache_dir))
    if shortcut is None or shortcut.get("key") != key or not isinstance(shortcut.get("graph"), str):
        return None
    graph = Path(cache_dir) / Path(shortcut["graph"]).name
    return graph if graph.is_file() else None


def graph_fits_shortcut(export_key: dict, key: dict) -> bool:
    """Whether a graph's export key (from its own record) is the graph the shortcut key asks for."""
    return (export_key.get("format") == key.get("export_format")
            and all(export_key.get(k) == key.get(k) for k in ("backbone", "weights_id", "outputs", "opset",
                                                               "exporter", "versions")))


def remember_graph(key: dict, cache_dir: Path, graph: Path) -> None:
    _write_json(shortcut_path(key, cache_dir), {"key": key, "graph": Path(graph).name})
