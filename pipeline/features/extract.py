"""The featurize job: scan, split, decode each image once, run every backbone, store.

Each decoded batch (plain + mirrored views) goes through every selected
backbone before the next batch is decoded, and is saved as soon as it is done,
so an interrupted job resumes where it stopped (see parts.PartsFolder).
"""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline import __version__
from pipeline.backbones.descriptors import parse_descriptors
from pipeline.backbones.weights_hash import weights_sha256
from pipeline.backbones.registry import (
    create_backbone,
    fuse_conv_bn,
    get_spec,
    output_widths,
    resolve_weights_id,
)
from pipeline.constants import (
    DEFAULT_GROUP_EDGES,
    IMAGE_SIZE,
    IMAGENET_MEAN,
    IMAGENET_STD,
)
from pipeline.device import compute_precision, resolve_device, resolve_precision
from pipeline.features import provenance
from pipeline.features.parts import PartsFolder
from pipeline.features.settings import (
    WEIGHTS_SHA256,
    SettingsMismatch,
    fingerprint,
    settings_difference,
)
from pipeline.features.writer import assemble, mixed_parts_message
from pipeline.files import file_sha256
from pipeline.images.checks import DEFAULT_MAX_PIXELS
from pipeline.ingest.dataset import (
    apply_split_file,
    assign_splits,
    empty_split_warnings,
    read_split_file,
    scan,
    split_counts,
    subjects_straddling,
)

PREPROCESSING = {
    "size": IMAGE_SIZE,
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
    "resize": "bilinear-antialias",
    "scale": "[0,1]",
    "views": ["plain", "mirror"],
}


@dataclass
class FeaturizeConfig:
    data_dir: Path
    out: Path
    backbones: tuple[str, ...]
    weights: dict[str, str | None]
    batch_size: int = 64
    device: str = "auto"
    decoder: str = "auto"
    dtype: str = "float16"
    group_edges: tuple[int, ...] = DEFAULT_GROUP_EDGES
    seed: int = 0
    split_file: Path | None = None
    limit: int | None = None
    shard: tuple[int, int] = (0, 1)   # (index, count)
    descriptors: tuple[str, ...] = ()  # extra outputs per backbone (descriptors.py); () = features + stages only
    precision: str = "auto"            # device.compute_precision: auto = float16 autocast on CUDA, float32 on CPU
    allow_mixed: bool = False          # accept resuming/keeping rows computed another way (provenance.py)
    labels: object = None              # a labels.LabelSource (CSV, class folders); None = UTKFace names
    faces: str = "aligned"             # faces.detect.FACE_MODES: aligned = whole picture; detect/box = cut out
    engine: str = "auto"               # engines.ENGINES: auto = ONNX Runtime on the CPU when it can, else PyTorch
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # images.decoders.make_decoder: larger ones skipped; None = none


@dataclass
class Plan:
    """What a job will write: its records (this shard's), splits and settings."""
    meta: dict[str, np.ndarray]
    skipped: list[tuple[str, str]]
    settings: dict
    out: Path
    total_records: int
    shard_rows: tuple[int, int]
    warnings: list[str] = field(default_factory=list)   # e.g. an empty split; printed by run()

    @property
    def rows(self) -> int:
        return len(self.meta["path"])


def shard_path(out: Path, shard: tuple[int, int]) -> Path:
    index, count = shard
    if count == 1:
        return Path(out)
    out = Path(out)
    return out.with_name(f"{out.stem}.shard-{index}-of-{count}{out.suffix}")


def shard_from_env(environ=os.environ) -> tuple[int, int] | None:
    """(index, count) from SLURM array or torchrun variables, if set; ValueError naming the variables if unusable."""
    for index_key, count_key in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"), ("RANK", "WORLD_SIZE")):
        if index_key in environ and count_key in environ:
            shown = f"{index_key}={environ[index_key]}, {count_key}={environ[count_key]}"
            offset_key = "SLURM_ARRAY_TASK_MIN" if index_key == "SLURM_ARRAY_TASK_ID" else None
            try:
                index, count = int(environ[index_key]), int(environ[count_key])
                if offset_key:  # arrays may start at an offset, e.g. --array=1-4
                    index -= int(environ.get(offset_key, 0))
            except ValueError:
                raise ValueError(f"cannot use {shown} as a shard: not whole numbers") from None
            if not 0 <= index < count:
                # A stepped array (--array=0-6:2) has COUNT 4 but IDs up to 6: the IDs do not number the tasks.
                raise ValueError(f"{shown}{f', {offset_key}=' + environ.get(offset_key, '0') if offset_key else ''}"
                                 f" gives shard {index} of {count}, outside 0..{count - 1} (a stepped or sparse "
                                 f"array?); give the shard explicitly with --shard i/n")
            return index, count
    return None


def parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like i/n (e.g. 0/4), got {text!r}") from None
    if not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= i < n")
    return index, count


def make_plan(config: FeaturizeConfig) -> Plan:
    records, skipped = scan(config.data_dir, config.group_edges, config.limit, config.labels)
    if not records:
        what = "UTKFace images found" if config.labels is None else "usable labelled images"
        raise ValueError(f"no {what} in {config.data_dir} ({len(skipped)} skipped"
                         + (f", e.g. {skipped[0].path}: {skipped[0].reason})" if skipped else ")"))
    paths = [r.path for r in records]
    given = [r.split for r in records]   # a split column of a labels file
    if config.split_file and any(g is not None for g in given):
        raise ValueError(f"the labels file has a split column and --split-file {config.split_file} gives splits "
                         f"too; drop one of them")
    warnings = []
    if config.split_file:
        splits = apply_split_file(paths, read_split_file(config.split_file), warnings)
        split_source = f"file:{Path(config.split_file).name}:sha256={file_sha256(Path(config.split_file))[:16]}"
    elif any(g is not None for g in given):
        splits = [g or "" for g in given]
        split_source = "labels-file split column"
    else:
        splits = assign_splits(records, config.seed)
        # The subject-aware name only when subjects exist, so UTKFace files keep their settings.
        split_source = ("seeded-stratified-duplicate-and-subject-aware" if any(r.subject for r in records)
                        else "seeded-stratified-duplicate-aware")
    straddling = subjects_straddling(records, splits)
    if straddling:
        warnings.append(f"{len(straddling)} subjects have images in more than one split (e.g. {straddling[0]!r}); "
                        f"the given split leaks people between splits")
    warnings += empty_split_warnings(splits)

    # The fingerprint covers everything that changes the stored numbers, but not
    # the shard, so that merged shards equal a single run.
    settings = {
        "backbones": list(config.backbones),
        "weights": {name: resolve_weights_id(name, config.weights.get(name)) for name in config.backbones},
        # The bytes the weights come from (hashed once per file change): a checkpoint replaced under the
        # same name in TORCH_HOME gives another fingerprint, and merge and join refuse to mix them.
        WEIGHTS_SHA256: {name: weights_sha256(name, config.weights.get(name)) for name in config.backbones},
        "preprocessing": PREPROCESSING,
        "group_edges": list(config.group_edges),
        "seed": config.seed,
        "split_source": split_source,
        "dtype": config.dtype,
        "records": fingerprint({"files": [(r.path, r.sha256) for r in records], "splits": splits}),
    }
    label_settings = (config.labels.settings() if config.labels is not None else None)
    if label_settings is not None:  # only for non-default sources, so UTKFace-name files keep their settings
        settings["labels"] = label_settings
    if config.descriptors:  # only when asked for, so files without descriptors keep their fingerprint
        settings["descriptors"] = list(parse_descriptors(config.descriptors))
    settings["compute"] = planned_compute(config)  # device, precision, decoder, engine: part of the fingerprint
    index, count = config.shard
    bounds = np.linspace(0, len(records), count + 1).astype(int)  # contiguous blocks keep merge trivial
    lo, hi = int(bounds[index]), int(bounds[index + 1])
    meta = {
        "path": np.asarray(paths, dtype=object),
        "age": np.asarray([r.age for r in records]),
        "gender": np.asarray([r.gender for r in records]),
        "race": np.asarray([r.race for r in records]),
        "group": np.asarray([r.group for r in records]),
        "split": np.asarray(splits, dtype=object),
        "sha256": np.asarray([r.sha256 for r in records]),
        **optional_meta(records),
    }
    meta = {k: v[lo:hi] for k, v in meta.items()}
    skipped_rows = [(s.path, s.reason) for s in skipped] if index == 0 else []  # name skips reported once
    return Plan(meta, skipped_rows, settings, shard_path(config.out, config.shard), len(records),
                (int(lo), int(hi)), warnings)


def optional_meta(records) -> dict[str, np.ndarray]:
    """The per-row columns only some label sources give (layout.OPTIONAL_META_COLUMNS), when any row has them."""
    meta = {}
    if any(r.subject is not None for r in records):
        meta["subject"] = np.asarray([r.subject or "" for r in records], dtype=object)
    for column in ("box", "eyes"):
        if any(getattr(r, column) is not None for r in records):
            meta[column] = np.asarray([getattr(r, column) or (np.nan,) * 4 for r in records], dtype=np.float32)
    return meta


PLANNED_ATTR = "compute_planned"   # file attribute: the plan's compute record (JSON), beside the real one


def planned_compute(config: FeaturizeConfig) -> dict:
    """How this job will compute (provenance.compute_record), known before any model or decoder is built."""
    from pipeline.backbones.engines import planned_engine

    device = resolve_device(config.device)
    precision = resolve_precision(device, config.precision)
    # What run() will really use is recorded per part from runner.describe(); this is the expectation.
    return provenance.compute_record(device, precision, provenance.planned_decoder(config.decoder, device),
                                     planned_engine(config.engine, device, precision))


def existing_status(plan: Plan, allow_mixed: bool = False) -> str | None:
    """'done' if the output exists with these settings; raise if it exists with others.

    The plan's compute record is the expected one (planned_compute); the file's is what was really
    used, which can differ (--engine auto fell back to PyTorch). So the file counts as done when its
    real record matches this plan, or when the plan it recorded (attribute PLANNED_ATTR) does: the
    same request again is done. A file whose rows were computed in several ways is compared on its
    real records only. allow_mixed: a file that differs only in how it was computed counts as done.
    """
    if not plan.out.exists():
        return None
    try:
        with h5py.File(plan.out, "r") as h5:
            found = json.loads(h5.attrs["settings"])
            planned = h5.attrs.get(PLANNED_ATTR)
            planned = json.loads(planned) if planned is not None else None
    except (OSError, KeyError, ValueError) as err:  # ValueError: settings that are not JSON
        raise SettingsMismatch(f"{plan.out} exists but is not a finished feature file ({err}); "
                               f"move it away or choose another -o") from err
    difference = settings_difference(found, plan.settings, allow_mixed)
    if difference and planned and not provenance.is_mixed(found) and settings_difference(
            {**found, provenance.COMPUTE_KEY: planned}, plan.settings, allow_mixed) is None:
        difference = None   # computed otherwise than planned, but this run asks for just what that one asked
    if difference:
        raise SettingsMismatch(f"{plan.out} already exists with other settings:\n{difference}\n"
                               f"Choose another -o, or delete the file to recompute.")
    return "done"


class BackboneRunner:
    """Runs the frozen backbones on a batch of views, the fastest measured way per device.

    channels_last and BatchNorm folded into the convs: both faster than the
    default on the CPU (benchmarks/RESULTS.md), and both give the same features
    up to float rounding. The precision is
    device.compute_precision's, shared with predict and explain: by default
    float16 autocast on the GPU, float32 on the CPU (autocast there would change
    features beyond rounding).
    """

    def __init__(self, names, weights, device: torch.device, descriptors=(), precision: str = "auto",
                 engine: str = "torch", probe_files=(), log=print):
        """engine: engines.ENGINES; probe_files: a few input images the ONNX graphs are checked on."""
        from pipeline.backbones.engines import PendingBackbone, select_engine

        self.device = device
        self.precision = resolve_precision(device, precision)  # device.compute_precision: as predict and explain
        self.descriptors = parse_descriptors(descriptors)

        def build(name: str) -> torch.nn.Module:
            model = fuse_conv_bn(create_backbone(name, weights.get(name), self.descriptors)).to(device)
            return model.to(memory_format=torch.channels_last)

        # Built only when needed: graphs exported and checked by an earlier run open without PyTorch (engine_cache.py).
        pending = {name: PendingBackbone(name, resolve_weights_id(name, weights.get(name)),
                                         output_widths(get_spec(name), self.descriptors), lambda n=name: build(n))
                   for name in names}
        # From here on a backbone's forward is its PyTorch module or an ONNX Runtime session exported from it.
        self.models, self.engine = select_engine(pending, engine, device, probe_files, log, precision=self.precision)

    def describe(self) -> dict:
        """The engine that computes the features: {"engine", "engine_version"} (+ "opset", "threads" for ONNX RT)."""
        return dict(self.engine)

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor) -> dict[str, dict[str, np.ndarray]]:
        """views [B, 2, 3, H, W] -> {backbone: {output name: [B, 2, width]}} (output names as model.output_names)."""
        batch = views.shape[0]
        x = views.to(self.device, non_blocking=True).flatten(0, 1)  # [2B, 3, H, W]: plain, mirror, plain, ...
        if self.engine["engine"] == "torch":  # ONNX Runtime takes plain NCHW: no layout copy there and back
            x = x.contiguous(memory_format=torch.channels_last)
        out = {}
        for name, model in self.models.items():
            with compute_precision(self.device, self.precision):
                outputs = model(x)
            out[name] = {key: value.float().reshape(batch, 2, -1).cpu().numpy() for key, value in outputs.items()}
        return out


def versions() -> dict:
    found = {"python": platform.python_version(), "torch": torch.__version__, "h5py": h5py.__version__,
             "numpy": np.__version__, "pipeline": __version__}
    import torchvision

    found["torchvision"] = torchvision.__version__
    try:
        import nvidia.dali

        found["dali"] = nvidia.dali.__version__
    except ImportError:
        pass
    return found


def run(config: FeaturizeConfig, progress=None, log=print) -> dict:
    """Featurize (this shard of) the data set. Returns a summary dict.

    progress: a callable (total, initial) -> tqdm-like bar, or None for no bar.
    Holds the output's lock (safe_io.output_lock) throughout: a second run on the
    same output stops at once with safe_io.OutputLocked naming this one's pid.
    """
    from pipeline.features.safe_io import output_lock

    with output_lock(shard_path(config.out, config.shard)):
        return _run_locked(config, progress, log)


def _run_locked(config: FeaturizeConfig, progress=None, log=print) -> dict:
    from pipeline.images.decoders import (
        make_decoder,  # imported late: DALI import is slow
    )

    plan = make_plan(config)
    face_mode = _face_mode(config, plan)
    for warning in plan.warnings:
        log(f"warning: {warning}")
    if existing_status(plan, config.allow_mixed) == "done":
        return {"status": "already done", "out": str(plan.out), "rows": plan.rows}

    parts = PartsFolder(plan.out, {**plan.settings, "shard": list(config.shard), "shard_rows": list(plan.shard_rows)},
                        config.allow_mixed)
    done = parts.rows_done()
    if done:
        log(f"resuming: {done} of {plan.rows} images already done in {parts.folder}")

    device = resolve_device(config.device)
    dtype = np.float16 if config.dtype == "float16" else np.float32
    started = time.perf_counter()
    if done < plan.rows:
        files = [str(Path(config.data_dir) / p) for p in plan.meta["path"]]
        runner = BackboneRunner(config.backbones, config.weights, device, config.descriptors, config.precision,
                                config.engine, probe_files=files[:3], log=log)
        decoder = (make_decoder(config.decoder, device.type, config.batch_size, max_pixels=config.max_pixels)
                   if face_mode is None
                   else _face_decoder(face_mode, device, files, plan.meta, config.decoder, config.batch_size))
        # Each part records how it was really computed (the engine as the runner reports it).
        finished = parts.records() if done else []   # as assemble reads them (older parts: the plan's record)
        parts.settings = {**parts.settings, "compute": provenance.compute_record(
            device, runner.precision, decoder.name, runner.describe())}
        earlier = [r for r in finished if r != parts.settings["compute"]]
        if earlier and not config.allow_mixed:  # same plan, but the finished batches really ran another way
            raise SettingsMismatch(mixed_parts_message(parts.folder, earlier + [parts.settings["compute"]]))
        log(f"decoding with {decoder.name} on {device} ({runner.precision}); "
            f"backbones: {', '.join(config.backbones)}")
        batches = [(lo, min(lo + config.batch_size, plan.rows)) for lo in range(done, plan.rows, config.batch_size)]
        bar = progress(plan.rows, done) if progress else None
        recycle = getattr(decoder, "recycle", None)
        # Decode batch k+1 in a thread while the backbones run on batch k.
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(decoder.decode, files[batches[0][0]:batches[0][1]])
            for k, (lo, hi) in enumerate(batches):
                decoded = pending.result()
                if k + 1 < len(batches):
                    nxt = batches[k + 1]
                    pending = pool.submit(decoder.decode, files[nxt[0]:nxt[1]])
                arrays = _compute_batch(runner, decoded, lo, files[lo:hi], dtype)
                if recycle is not None:  # the features are computed: the decoder may reuse the views' memory
                    recycle(decoded.views)
                arrays.update(_fallback_arrays(decoded))
                arrays.update(_face_arrays(decoded))
                parts.write(lo, hi, arrays)
                if bar is not None:
                    bar.update(hi - lo)
        if bar is not None:
            bar.close()
    elapsed = time.perf_counter() - started
    computed = plan.rows - done

    widths = {name: output_widths(get_spec(name), config.descriptors) for name in config.backbones}
    extra = {
        "shard": {"index": config.shard[0], "count": config.shard[1]},
        "shard_rows": list(plan.shard_rows),
        "total_records": plan.total_records,
        "versions": versions(),
        "data_dir": str(Path(config.data_dir).resolve()),
        "decoder_device": str(device),
        PLANNED_ATTR: plan.settings.get("compute") or {},   # what existing_status compares a rerun's plan with
    }
    result = assemble(plan.out, parts, plan.meta, widths, plan.skipped, plan.settings, extra, config.dtype,
                      config.allow_mixed)
    parts.remove()
    return {
        "status": "written",
        "out": str(plan.out),
        "written": result["written"],
        "rows": plan.rows,   # planned for this shard (0 when there are more shards than images)
        "skipped": result["skipped"],
        "computed": computed,
        "seconds": elapsed,
        "images_per_s": computed / elapsed if elapsed > 0 and computed else 0.0,
        "bytes": plan.out.stat().st_size,
        "splits": _written_splits(plan.out),
        "compute": result["settings"].get("compute"),
        "fallbacks": result["fallbacks"],
    }


def _written_splits(path: Path) -> dict[str, int]:
    """Split counts of the rows the file holds (files that failed to decode are not among them)."""
    from pipeline.features.read import read_column

    with h5py.File(path, "r") as h5:
        return split_counts(read_column(h5, "split"))


def _face_mode(config: FeaturizeConfig, plan: Plan):
    """The face mode of a --faces detect|box job (its settings join the plan's), or None for aligned crops.

    Aligned jobs add nothing to the settings, so their files keep the fingerprint they always had.
    """
    if config.faces == "aligned":
        return None
    from pipeline.faces.detect import make_face_mode

    if config.faces == "box" and "box" not in plan.meta and "eyes" not in plan.meta:
        raise ValueError("--faces box needs face boxes (x,y,w,h) or eye points in the labels file (--labels)")
    from pipeline.faces.crops import decoder_name, resize_path

    device = resolve_device(config.device)
    mode = make_face_mode(config.faces, device)  # MTCNN on the backbones' device
    plan.settings["faces"] = mode.settings()
    compute = plan.settings.get("compute")
    if isinstance(compute, dict) and "decoder" in compute:  # the face decoder, not the planned DALI/torch one
        plan.settings["compute"] = {**compute, "decoder": decoder_name(mode.name, device, resize_path(config.decoder))}
    return mode


def _face_decoder(mode, device: torch.device, files: list[str], meta: dict, decoder: str = "torch",
                  batch_size: int = 64):
    """Decoding that cuts the face out first (faces/crops.py), then resizes on --decoder's path (DALI or torch)."""
    from pipeline.faces.crops import FaceCropDecoder, hints_from_meta, resize_path

    return FaceCropDecoder(mode, device, hints_from_meta(files, meta), resize_path(decoder), batch_size)


def _face_arrays(decoded) -> dict[str, np.ndarray]:
    """The face record of each kept row (faces.crops.FaceBatch.faces), stored as /faces/<name> by writer.assemble."""
    from pipeline.features.layout import ROW_ARRAY_PREFIX

    faces = getattr(decoded, "faces", None) or {}   # plain decoders' batches have none
    return {f"{ROW_ARRAY_PREFIX}faces.{name}": values for name, values in faces.items()}


def _fallback_arrays(decoded) -> dict[str, np.ndarray]:
    """Files the GPU decoder handed to the CPU decoder (images.views.DecodedBatch.fallbacks), saved with the batch."""
    fallbacks = list(getattr(decoded, "fallbacks", None) or [])
    return {"fallback_paths": np.asarray([str(p) for p, _ in fallbacks], dtype=str),
            "fallback_reasons": np.asarray([str(r) for _, r in fallbacks], dtype=str)}


def _compute_batch(runner: BackboneRunner, decoded, lo: int, batch_files: list[str], dtype) -> dict[str, np.ndarray]:
    reasons = {str(path): reason for path, reason in decoded.failures}
    failed = sorted(set(range(len(batch_files))) - set(decoded.kept))
    arrays = {
        "rows": np.asarray(decoded.kept, dtype=np.int64) + lo,
        "failed_rows": np.asarray(failed, dtype=np.int64) + lo,
        "failed_reasons": np.asarray([reasons.get(batch_files[i], "cannot decode") for i in failed], dtype=str),
    }
    if len(decoded.kept):
        features = runner(decoded.views)
    for name in runner.models:
        # One array per output: features_<backbone>, stages_<backbone>, <descriptor>_<backbone>.
        for output, width in output_widths(get_spec(name), runner.descriptors).items():
            values = features[name][output] if len(decoded.kept) else np.zeros((0, 2, width))
            if values.shape[1:] != (2, width):  # checked before the part is saved: no wrong batch to resume from
                raise ValueError(f"{name} gave {output} {values.shape[-1]} wide, not {width}, on rows {lo}-"
                                 f"{lo + len(batch_files)}; the engine's graph is not this backbone's "
                                 f"(run with --engine torch, or delete the ONNX cache)")
            arrays[f"{output}_{name}"] = values.astype(dtype)
    return arrays
