"""Export a frozen backbone to ONNX once, and keep the file in a cache keyed by everything that shapes it.

The exported graph is the whole `FrozenBackbone` forward with BatchNorm folded: its outputs are the module's
dict entries, named and ordered as `backbone.output_names`, with a dynamic batch axis. The cache file name
is a hash of the backbone, weights id, a digest of the (folded) weight tensors, the output names, the opset,
the exporter and the torch / onnx / onnxscript / onnxruntime versions, so changed weights (even under the
same id) or a library upgrade never reuse a stale graph. The record beside the graph (`<graph>.json`) holds
that key and the graph's sha256, checked whenever the graph is opened (`read_graph`): a graph replaced or
a record edited is exported again, never trusted. Files are written under a temporary name and renamed,
so a crash or two processes exporting at once never leave a half file. Only export needs `onnx`
and `onnxscript` (torch.onnx's exporter uses them); running a cached graph needs only `onnxruntime`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline.backbones.registry import FrozenBackbone, fuse_conv_bn
from pipeline.files import write_json_atomically

OPSET = 18
EXPORT_FORMAT = 2           # bump when the way we export changes, so old cache files are not reused
                            # (2: the record beside the graph holds its sha256)
INPUT_NAME = "views"
CACHE_ENV = "FROZEN_AGE_ONNX_CACHE"
EXPORTER = "torch.onnx.export(dynamo=True)"


class ExportUnavailable(RuntimeError):
    """The backbone cannot be exported here (exporter missing, export failed, cache not writable), with why."""


class CachedGraphMismatch(ValueError):
    """A cached graph whose bytes or record do not match each other or its name: it is not used."""


def default_cache_dir() -> Path:
    """$FROZEN_AGE_ONNX_CACHE, else $XDG_CACHE_HOME/frozen-age/onnx, else ~/.cache/frozen-age/onnx."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "frozen-age" / "onnx"


EXPORTER_PACKAGES = ("onnx", "onnxscript")


def _exporter_missing(err: Exception) -> ExportUnavailable:
    return ExportUnavailable(f"exporting to ONNX needs the onnx and onnxscript packages ({err}); "
                             f"pip install onnx onnxscript (needed for export only; running a graph needs onnxruntime)")


def exporter_versions() -> dict[str, str]:
    """Versions of the libraries that shape the exported file; raises ExportUnavailable when one is missing.

    Read from the installed packages' metadata, without importing them: importing
    onnx and onnxscript is slow, and a cached graph needs
    neither (`require_exporter` imports them when a graph is really exported).
    """
    found = {"torch": torch.__version__}
    for module in EXPORTER_PACKAGES:
        if module in sys.modules and sys.modules[module] is None:  # import blocked (Python's convention)
            raise _exporter_missing(ImportError(f"import of {module} is blocked"))
        try:
            found[module] = importlib.metadata.version(module)
        except importlib.metadata.PackageNotFoundError:
            try:  # installed without metadata (a source checkout on the path): ask the module itself
                found[module] = importlib.import_module(module).__version__
            except ImportError as err:
                raise _exporter_missing(err) from err
    return found


def require_exporter() -> None:
    """Import the exporter's packages, or raise ExportUnavailable saying what to install."""
    for module in EXPORTER_PACKAGES:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise _exporter_missing(err) from err


def folded(backbone: FrozenBackbone) -> FrozenBackbone:
    """The backbone with BatchNorm folded into the convs; a copy when it still has BatchNorm (the caller's stays)."""
    if any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules()):
        backbone = fuse_conv_bn(copy.deepcopy(backbone))
    return backbone


def weights_digest(backbone: nn.Module) -> str:
    """sha256 of every tensor in the state dict (names, dtypes, shapes and values), device and layout aside."""
    digest = hashlib.sha256()
    for name, tensor in backbone.state_dict().items():
        tensor = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def cache_key(backbone: FrozenBackbone, runtime_version: str, digest: str | None = None) -> dict:
    """Everything the exported file depends on. backbone: already folded (see `folded`)."""
    return {
        "format": EXPORT_FORMAT,
        "backbone": backbone.spec.name,
        "weights_id": backbone.weights_id,
        "weights_sha256": digest or weights_digest(backbone),
        "outputs": list(backbone.output_names),
        "opset": OPSET,
        "exporter": EXPORTER,
        "versions": {**exporter_versions(), "onnxruntime": runtime_version},
    }


def cached_path(key: dict, cache_dir: Path, suffix: str = ".onnx") -> Path:
    """<backbone>-<hash of the key><suffix> in the cache: the graph, or (engine_cache) a file keyed the same way."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{key['backbone']}-{name}{suffix}"


def exported_model(backbone: FrozenBackbone, runtime_version: str, cache_dir: Path | None = None,
                   log=print) -> tuple[Path, bool]:
    """(path of the backbone's ONNX file, whether it was exported now). Reuses the cached file when present."""
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    model = folded(backbone).to("cpu")
    digest = weights_digest(model)
    try:
        key = cache_key(model, runtime_version, digest)
    except ExportUnavailable:  # no exporter here: a graph exported earlier with these weights and versions still serves
        found = _cached_without_exporter(model, runtime_version, digest, cache_dir)
        if found is None:
            raise
        return found, False
    path = cached_path(key, cache_dir)
    if path.is_file():
        try:
            read_graph(path)
            return path, False
        except CachedGraphMismatch as err:
            log(f"{err}; exporting it again")
    require_exporter()
    log(f"exporting {key['backbone']} to ONNX (once; cached in {cache_dir}) ...")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportUnavailable(f"cannot create the ONNX cache folder {cache_dir}: {err.strerror or err}; "
                                f"set {CACHE_ENV} to a writable folder") from err
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        _export(model, partial)
        with open(partial, "rb+") as handle:
            os.fsync(handle.fileno())
        digest = graph_sha256(partial.read_bytes())
        os.replace(partial, path)
        write_json_atomically(record_path(path), {**key, GRAPH_DIGEST: digest})  # what the file was made from
    except OSError as err:
        raise ExportUnavailable(f"cannot write {path}: {err.strerror or err}; "
                                f"set {CACHE_ENV} to a writable folder") from err
    finally:
        partial.unlink(missing_ok=True)
    return path, True


def _cached_without_exporter(model: FrozenBackbone, runtime_version: str, digest: str, cache_dir: Path) -> Path | None:
    """A cached graph whose key matches in all but the exporter packages' versions (they are not installed)."""
    for sidecar in sorted(Path(cache_dir).glob(f"{model.spec.name}-*.json")):
        if sidecar.suffixes != [".json"]:  # engine_cache's verdicts and shortcuts (.checked.json, .source.json)
            continue
        try:
            key = export_key_of(json.loads(sidecar.read_text()))
        except (OSError, ValueError, AttributeError):
            continue
        versions = dict(key.get("versions", {}))
        wanted = {"format": EXPORT_FORMAT, "backbone": model.spec.name, "weights_id": model.weights_id,
                  "weights_sha256": digest, "outputs": list(model.output_names), "opset": OPSET, "exporter": EXPORTER}
        graph = sidecar.with_suffix(".onnx")
        if ({k: key.get(k) for k in wanted} == wanted and versions.get("torch") == torch.__version__
                and versions.get("onnxruntime") == runtime_version and graph.is_file()):
            try:
                read_graph(graph)
            except CachedGraphMismatch:
                continue
            return graph
    return None


GRAPH_DIGEST = "graph_sha256"   # the record's field holding the graph's sha256


def graph_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def record_path(graph: Path) -> Path:
    return Path(graph).with_suffix(".json")


def export_key_of(record: dict) -> dict:
    """The export key a graph's record holds (the record less the graph's digest)."""
    return {k: v for k, v in record.items() if k != GRAPH_DIGEST}


def read_graph(graph: Path) -> tuple[bytes, dict, str]:
    """(the graph's bytes, its export key, their sha256), when the record beside it vouches for exactly these bytes.

    The file name is a hash of the export key, and the record holds the key and the sha256 of the bytes
    exported under it: a graph copied over another name, a record edited or swapped, or bytes replaced
    all raise CachedGraphMismatch naming the file. The bytes returned are the ones hashed, so a session
    made from them runs what was checked.
    """
    graph = Path(graph)
    try:
        record = json.loads(record_path(graph).read_text())
    except (OSError, ValueError):
        raise CachedGraphMismatch(f"cached graph {graph} has no readable record beside it") from None
    if not isinstance(record, dict) or not isinstance(record.get(GRAPH_DIGEST), str):
        raise CachedGraphMismatch(f"cached graph {graph}: its record {record_path(graph).name} holds no graph digest "
                                  f"(made by an older version)")
    key = export_key_of(record)
    if cached_path(key, graph.parent) != graph:
        raise CachedGraphMismatch(f"cached graph {graph}: its record describes another graph (edited or swapped)")
    try:
        data = graph.read_bytes()
    except OSError as err:
        raise CachedGraphMismatch(f"cached graph {graph} cannot be read: {err.strerror or err}") from None
    digest = graph_sha256(data)
    if digest != record[GRAPH_DIGEST]:
        raise CachedGraphMismatch(f"cached graph {graph}: its bytes differ from the ones exported under this name "
                                  f"(sha256 {digest[:12]}..., recorded {record[GRAPH_DIGEST][:12]}...)")
    return data, key, digest


def _export(model: FrozenBackbone, path: Path) -> None:
    example = torch.zeros(2, 3, 224, 224)   # batch 2: a size-1 example would let the exporter fix the axis at 1
    transcript = io.StringIO()
    try:
        # The exporter prints its progress and warns about its own internals; keep both for the error message only.
        with contextlib.redirect_stdout(transcript), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model.eval(), (example,), str(path), input_names=[INPUT_NAME],
                              output_names=list(model.output_names), opset_version=OPSET, dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False)
    except ExportUnavailable:
        raise
    except ImportError as err:
        raise ExportUnavailable(f"the ONNX exporter cannot run: {err}") from err
    except Exception as err:  # the exporter raises many kinds; any of them means "no ONNX graph"
        last = transcript.getvalue().strip().splitlines()[-1:] or [""]
        raise ExportUnavailable(f"{model.spec.name}: torch.onnx.export failed: {type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''} {last[0]}".strip()) from err
