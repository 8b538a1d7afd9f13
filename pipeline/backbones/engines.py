"""Which library runs the frozen backbones' forward pass: PyTorch, or ONNX Runtime on the CPU.

`select_engine(models, engine, device, ...)` takes the PyTorch backbones a command built and returns, per
backbone, a callable with the same contract (normalized images [N, 3, S, S] -> {output name: [N, width]})
and a description of the engine for the feature file's settings.
  torch        the PyTorch modules themselves.
  onnxruntime  each backbone exported to ONNX once (onnx_export.py, cached), checked against PyTorch on a few
               real images before its first use (engine_cache.py keeps the verdict), then run by an ONNX
               Runtime CPU session: faster than PyTorch on CPUs, same features up to float rounding.
  auto         ONNX Runtime on the CPU when it is installed and every backbone exports and passes the
               check; PyTorch otherwise, and always on the GPU. The log says which and why.
All backbones of a run use one engine. Grad-CAM needs gradients and runs on PyTorch (inference/full_model.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.backbones import engine_cache
from pipeline.backbones.onnx_export import (
    INPUT_NAME,
    OPSET,
    CachedGraphMismatch,
    ExportUnavailable,
    default_cache_dir,
    exported_model,
    read_graph,
)

ENGINES = ("auto", "torch", "onnxruntime")
PROBE_IMAGES = 3              # real images (x 2 views) the exported graph must match PyTorch on
VERIFY_TOLERANCE = 1e-4       # max abs difference allowed, relative to the features' scale when that is above 1
CHUNK_VIEWS = 16              # views per ONNX Runtime run (memory, see OnnxBackbone)


class EngineUnavailable(RuntimeError):
    """The engine asked for cannot run here, or its graph does not reproduce PyTorch; the message says why."""


def import_onnxruntime():
    """The onnxruntime module, or EngineUnavailable. One place, so tests can simulate its absence."""
    try:
        import onnxruntime
    except ImportError as err:
        raise EngineUnavailable(f"onnxruntime is not installed ({err}); pip install onnxruntime") from err
    return onnxruntime


def torch_description() -> dict:
    return {"engine": "torch", "engine_version": torch.__version__}


def default_threads() -> int:
    """Intra-op threads for ONNX Runtime: the same count PyTorch uses (one per core; OMP_NUM_THREADS lowers it)."""
    return max(1, torch.get_num_threads())


class OnnxBackbone:
    """An ONNX Runtime session that is called like a FrozenBackbone: [N, 3, S, S] -> {output name: [N, width]}."""

    def __init__(self, session, output_names: Sequence[str], path: Path):
        self.session = session
        self.output_names = list(output_names)
        self.path = path

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        # ONNX Runtime wants a C-contiguous float32 NCHW array; a channels_last tensor is copied once here.
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        # A few views per run: the arena then holds one chunk's activations, not the batch's,
        # at the same speed.
        chunks = [self.session.run(self.output_names, {INPUT_NAME: array[i:i + CHUNK_VIEWS]})
                  for i in range(0, len(array), CHUNK_VIEWS)] or [self.session.run(self.output_names, {INPUT_NAME: array})]
        return {name: torch.from_numpy(np.concatenate([c[k] for c in chunks])) for k, name in enumerate(self.output_names)}


_shared_arena = []   # set once per process: the CPU arena every session here allocates from


def _share_one_arena(ort) -> bool:
    """Register one CPU arena for all sessions of this process; False if ONNX Runtime refuses.

    Each session would otherwise keep its own arena at its own peak, which
    adds up over the backbones for no speed.
    """
    if not _shared_arena:
        try:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # ORT's default arena settings
            _shared_arena.append(True)
        except Exception:  # registered already (by someone else in this process), or not supported
            _shared_arena.append(False)
    return _shared_arena[0]


def make_session(path: Path | bytes, threads: int):
    """A CPU session with every graph optimisation, `threads` intra-op threads and one inter-op thread.

    These convnets are one chain of ops, so parallelism inside each op is what
    pays, and a second inter-op pool would only compete with the decode thread.
    Idle workers do not spin, so the decode thread beside the forward gets the CPU.
    No memory pattern (it pre-plans one block per input shape: more memory, no
    faster), and one arena shared by all sessions. Timings: benchmarks/RESULTS.md.
    path: the graph file, or its bytes (onnx_export.read_graph: the bytes whose digest was checked).
    """
    ort = import_onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = False
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _share_one_arena(ort):
        options.add_session_config_entry("session.use_env_allocators", "1")
    source = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def check_output_widths(session, widths: dict[str, int] | None, path: Path) -> None:
    """Raise EngineUnavailable unless the graph's outputs are these names with these widths (when known)."""
    if not widths:
        return
    found = {o.name: (o.shape[-1] if o.shape else None) for o in session.get_outputs()}
    wrong = [f"{name} {found.get(name)} wide (expected {width})" for name, width in widths.items()
             if found.get(name) != width]
    if wrong:
        raise EngineUnavailable(f"the graph {path} does not have this backbone's outputs: {', '.join(wrong)}; "
                                f"delete it to export again")


def probe_views(files: Sequence[str | Path] = ()) -> tuple[torch.Tensor, str]:
    """([K, 3, S, S] normalized plain + mirrored views, where from) for the engine check.

    The first files that decode (the command's own images); generated pictures
    only when none were given or none decode.
    """
    from pipeline.images.decoders import make_decoder

    files = [str(f) for f in list(files)[:PROBE_IMAGES]]
    if files:
        decoded = make_decoder("torch", "cpu", len(files)).decode(files)
        if len(decoded.kept):
            return decoded.views.flatten(0, 1), f"{len(decoded.kept)} of the input images, both views"
    return _generated_views(), f"{PROBE_IMAGES} generated pictures, both views"


def _generated_views() -> torch.Tensor:
    from pipeline.images.views import preprocess_rgb, with_mirror

    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:200, 0:200] / 200
    pictures = []
    for _ in range(PROBE_IMAGES):  # smooth gradients with a bright blob: closer to photos than noise
        picture = np.stack([rows, cols, (rows + cols) / 2], -1) * rng.uniform(40, 120, 3)
        cy, cx = rng.uniform(0.4, 0.6, 2)
        picture[((rows - cy) / 0.35) ** 2 + ((cols - cx) / 0.28) ** 2 < 1] += rng.uniform(80, 140, 3)
        pictures.append(np.clip(picture + rng.normal(0, 6, picture.shape), 0, 255).astype(np.uint8))
    return with_mirror(preprocess_rgb(pictures)).flatten(0, 1)


def max_difference(reference: dict[str, torch.Tensor], candidate: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """{output: (max abs difference, allowed)}; allowed is VERIFY_TOLERANCE x max(1, largest |value|)."""
    found = {}
    for name, expected in reference.items():
        expected = expected.float().cpu()
        got = candidate[name].float().cpu()
        if got.shape != expected.shape:
            found[name] = (float("inf"), 0.0)
            continue
        scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
        found[name] = (float((got - expected).abs().max()) if expected.numel() else 0.0, VERIFY_TOLERANCE * scale)
    return found


class PendingBackbone:
    """A PyTorch backbone not built yet: what its graph is looked up by, and how to build it when it is needed.

    select_engine takes these beside built backbones, so that a run whose graphs
    were checked before never builds PyTorch (engine_cache.py).
    """

    def __init__(self, name: str, weights_id: str, output_names: Sequence[str] | dict[str, int],
                 build: Callable[[], torch.nn.Module]):
        """output_names: the names, or {name: width} (then a graph with other widths is refused)."""
        self.name, self.weights_id, self.output_names = name, weights_id, tuple(output_names)
        self.widths = dict(output_names) if isinstance(output_names, dict) else None
        self._build, self._model = build, None

    @property
    def is_built(self) -> bool:
        return self._model is not None

    def build(self) -> torch.nn.Module:
        if self._model is None:
            self._model = self._build()
        return self._model


def built(model):
    """The PyTorch module itself (a PendingBackbone is built now)."""
    return model.build() if isinstance(model, PendingBackbone) else model


def _widths(model) -> dict[str, int] | None:
    if isinstance(model, PendingBackbone):
        return model.widths
    return dict(model.output_widths) if hasattr(model, "output_widths") else None


def _identity(model) -> tuple[str, str, list[str]]:
    """(backbone name, weights id, output names), without building a PendingBackbone."""
    if isinstance(model, PendingBackbone):
        return model.name, model.weights_id, list(model.output_names)
    return model.spec.name, model.weights_id, list(model.output_names)


def _remembered_backbone(model, ort, threads: int, cache_dir: Path | None) -> tuple[OnnxBackbone, float] | None:
    """The graph an earlier run exported and checked for exactly this backbone (engine_cache.py), opened; else None."""
    name, weights_id, outputs = _identity(model)
    key = engine_cache.shortcut_key(name, weights_id, outputs, ort.__version__)
    graph = engine_cache.remembered_graph(key, Path(cache_dir or default_cache_dir())) if key else None
    if graph is None:
        return None
    try:  # the graph's own record must describe this backbone, and its bytes be the ones recorded
        data, export_key, digest = read_graph(graph)
    except CachedGraphMismatch:
        return None   # the full path exports it again
    if not engine_cache.graph_fits_shortcut(export_key, key):
        return None
    verdict = engine_cache.recorded_verdict(graph, engine_cache.verdict_key(graph, ort.__version__, VERIFY_TOLERANCE,
                                                                            digest))
    if verdict is None or verdict.get("weights_source") != key["weights_source"]:
        return None
    try:
        session = make_session(data, threads)
        check_output_widths(session, _widths(model), graph)
    except Exception:  # noqa: BLE001 - whatever is wrong with the file, the full path reports it or exports again
        return None
    return OnnxBackbone(session, outputs, graph), float(verdict.get("max_abs_difference", 0.0))


@torch.inference_mode()
def verified_onnx_backbone(model, views: torch.Tensor | Callable[[], torch.Tensor], threads: int,
                           cache_dir: Path | None, log) -> tuple[OnnxBackbone, float, bool]:
    """Export (or reuse) `model`'s graph, open a session, and check it reproduces `model` on `views`.

    model: a FrozenBackbone or a PendingBackbone (built only when needed).
    views: the probe tensor, or a callable that makes it (called only when a
    check runs). A graph that passed the check before is not checked again:
    found from the weights' source without building the model when possible,
    else from the built model's export key (engine_cache.py). Returns (the
    session's backbone, max abs difference, whether that verdict came from the
    cache). Raises EngineUnavailable when it cannot, naming the backbone and the reason.
    """
    ort = import_onnxruntime()
    remembered = _remembered_backbone(model, ort, threads, cache_dir)
    if remembered is not None:
        return remembered[0], remembered[1], True
    model = built(model)
    name = model.spec.name
    try:
        path, _ = exported_model(model, ort.__version__, cache_dir, log)
    except ExportUnavailable as err:
        raise EngineUnavailable(str(err)) from err
    try:  # the bytes whose digest matches the record beside the graph are the ones the session runs
        data, _, digest = read_graph(path)
    except CachedGraphMismatch as err:   # changed since exported_model looked at it
        raise EngineUnavailable(f"{name}: {err}; delete it to export again") from err
    try:
        session = make_session(data, threads)
    except Exception as err:  # a corrupt cache file, an op this runtime lacks
        raise EngineUnavailable(f"{name}: ONNX Runtime cannot load {path} ({type(err).__name__}: {err}); "
                                f"delete it to export again") from err
    check_output_widths(session, _widths(model), path)
    backbone = OnnxBackbone(session, model.output_names, path)
    key = engine_cache.verdict_key(path, ort.__version__, VERIFY_TOLERANCE, digest)
    recorded = engine_cache.recorded_verdict(path, key)
    if recorded is not None:
        worst, cached = float(recorded.get("max_abs_difference", 0.0)), True
    else:
        views = views() if callable(views) else views
        device = next(model.parameters()).device
        reference = model(views.to(device))
        differences = max_difference(reference, backbone(views))
        worst, cached = max(d for d, _ in differences.values()), False
        failed = {k: v for k, v in differences.items() if not v[0] <= v[1]}
        if failed:
            detail = ", ".join(f"{k} {d:.2g} (allowed {a:.2g})" for k, (d, a) in failed.items())
            raise EngineUnavailable(f"{name}: the ONNX graph does not reproduce PyTorch on {len(views)} images: max "
                                    f"abs difference {detail}. Not using it; run with --engine torch, or delete "
                                    f"{path} to export again")
    shortcut = engine_cache.shortcut_key(name, model.weights_id, list(model.output_names), ort.__version__)
    if not cached or (shortcut is not None and recorded.get("weights_source") != shortcut["weights_source"]):
        engine_cache.record_verdict(path, key, worst, len(views) if not cached else int(recorded.get("views", 0)),
                                    shortcut["weights_source"] if shortcut else None)
    if shortcut is not None and engine_cache.remembered_graph(shortcut, path.parent) != path:
        engine_cache.remember_graph(shortcut, path.parent, path)  # later runs find it without building the model
    return backbone, worst, cached


def select_engine(models: dict[str, torch.nn.Module], engine: str, device: torch.device,
                  probe_files: Sequence[str | Path] = (), log: Callable = print,
                  cache_dir: Path | None = None, threads: int | None = None,
                  precision: str = "float32") -> tuple[dict, dict]:
    """({backbone name or key: forward callable}, engine description) for these PyTorch backbones.

    models: FrozenBackbones, or PendingBackbones that are built only if their
    graph was not checked before or the engine ends up being PyTorch.

    engine: "auto", "torch" or "onnxruntime". A backbone's PyTorch module is
    replaced by an ONNX Runtime session only when every backbone can be, so all
    features of a run come from one engine. "onnxruntime" raises
    EngineUnavailable when that is not possible; "auto" falls back to PyTorch
    and logs why. precision: the resolved device.compute_precision name; the
    exported graphs compute in float32 only.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch":
        return {key: built(model) for key, model in models.items()}, torch_description()
    device = torch.device(device)
    try:
        if device.type != "cpu":
            raise EngineUnavailable(f"ONNX Runtime runs on the CPU here (its CPU package has no GPU provider), "
                                    f"and the device is {device}")
        if precision != "float32":
            raise EngineUnavailable(f"the ONNX graphs compute in float32, and the precision asked for is {precision}")
        threads = threads or default_threads()
        probe = []   # (views, where from), made on first need: a graph with a stored verdict needs none

        def probe_tensor() -> torch.Tensor:
            if not probe:
                probe.append(probe_views(probe_files))
            return probe[0][0]

        forwards, worst, remembered = {}, 0.0, []
        for key, model in models.items():
            forwards[key], difference, cached = verified_onnx_backbone(model, probe_tensor, threads, cache_dir, log)
            worst = max(worst, difference)
            if cached:
                remembered.append(_identity(model)[0])
    except EngineUnavailable as err:
        if engine == "onnxruntime":
            raise
        log(f"engine: PyTorch {torch.__version__} (auto: {err})")
        return {key: built(model) for key, model in models.items()}, torch_description()
    ort = import_onnxruntime()
    checks = ([f"on {probe[0][1]}"] if probe else []) + (
        [f"in an earlier run ({', '.join(remembered)}: verdict cached beside the graph)"] if remembered else [])
    unbuilt = all(isinstance(m, PendingBackbone) and not m.is_built for m in models.values())
    log(f"engine: ONNX Runtime {ort.__version__} on the CPU, {threads} threads "
        f"(checked against PyTorch {' and '.join(checks)}: max abs difference {worst:.1e}"
        f"{'; PyTorch models not built' if unbuilt and models else ''})")
    return forwards, onnx_description(ort, threads)


def onnx_description(ort, threads: int) -> dict:
    return {"engine": "onnxruntime", "engine_version": ort.__version__, "opset": OPSET, "threads": threads}


def planned_engine(engine: str, device: torch.device | str, precision: str = "float32") -> dict:
    """The description select_engine will most likely give, known before any model is built or exported.

    Exact for "torch" and for the cases "auto" rules out up front (GPU, not
    float32, onnxruntime missing); when "auto" later falls back (export or check
    failed), BackboneRunner.describe() says so.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "torch" or (engine == "auto" and (torch.device(device).type != "cpu" or precision != "float32")):
        return torch_description()
    try:
        ort = import_onnxruntime()
    except EngineUnavailable:
        if engine == "onnxruntime":
            raise
        return torch_description()
    return onnx_description(ort, default_threads())
