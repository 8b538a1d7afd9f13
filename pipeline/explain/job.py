"""The explain command's job: files and folders in, overlays (+ .npy maps), a grid and an index out.

One model load per checkpoint, however many images; pictures are read and
explained in batches; a picture that cannot be read is reported and skipped.
Outputs are staged and committed at the end (outputs.py): an interrupted run
leaves the previous index and its pictures as they were.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipeline.device import resolve_device
from pipeline.explain.cam import (
    METHODS,
    CamError,
    explain_batch,
    require_last_block,
    resolve_target,
)
from pipeline.explain.overlays import (
    GridCell,
    overlay_rgb,
    resize_map,
    save_grid,
    save_overlay,
    save_titled,
)
from pipeline.explain.outputs import RunOutputs
from pipeline.files import check_output
from pipeline.heads.checkpoint import HeadCheckpoint, load_checkpoint
from pipeline.images.checks import DEFAULT_MAX_PIXELS, ImageProblem
from pipeline.inference.full_model import FullModel, load_full_models
from pipeline.ingest.dataset import collect_images
from pipeline.ingest.labels import IMAGE_SUFFIXES, display_path


def read_pictures(paths: Sequence[Path], max_pixels: int | None = DEFAULT_MAX_PIXELS
                  ) -> tuple[list[int], list[np.ndarray], list[tuple[str, str]]]:
    """(positions that loaded, HxWx3 uint8 pictures, (path, reason) failures), with featurize's file checks."""
    from pipeline.images.views import load_rgb

    kept, pictures, failures = [], [], []
    for position, path in enumerate(paths):
        try:
            pictures.append(load_rgb(path, max_pixels))  # file checks first: never blocks, never decodes a bomb
            kept.append(position)
        except ImageProblem as err:
            failures.append((str(path), f"cannot read image: {err.reason}"))
        except Exception as err:  # one bad file must not stop the others
            failures.append((str(path), f"cannot read image: {err}"))
    return kept, pictures, failures


def to_model_input(pictures: list[np.ndarray], device: torch.device) -> torch.Tensor:
    from pipeline.images.views import preprocess_rgb

    return preprocess_rgb(pictures, device=device)


# --------------------------------------------------------------------------- the explain job


@dataclass
class Column:
    """One map per image: a checkpoint and one of its backbones."""
    label: str
    model_index: int
    backbone: str


def checkpoint_labels(metas: list[dict], paths: list[Path]) -> list[str]:
    """Backbone name(s) per checkpoint; the checkpoint's folder name is added where two would clash."""
    base = ["+".join(m["backbones"]) for m in metas]
    labels = []
    for label, path in zip(base, paths):
        if base.count(label) > 1:
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            label = f"{label}-{folder.name}"
        labels.append(label)
    return labels


def columns_for(labels: list[str], metas: list[dict]) -> list[Column]:
    columns = []
    for index, (label, meta) in enumerate(zip(labels, metas)):
        for name in meta["backbones"]:
            text = label if len(meta["backbones"]) == 1 else f"{label}:{name}"
            columns.append(Column(text, index, name))
    return columns


KEY_BYTES = 120  # output names add _<model>_<method>.png; file systems allow 255 bytes per name


def image_key(path: Path) -> str:
    """The file name without its image suffixes: 1_0_0_2017...jpg.chip.jpg -> 1_0_0_2017...

    A key longer than KEY_BYTES is cut and ends in a hash of the whole name, so that the
    output names fit the file system and two long names still get different outputs.
    """
    name = path.name
    while True:
        stem, dot, suffix = name.rpartition(".")
        if dot and ("." + suffix.lower()) in (*IMAGE_SUFFIXES, ".chip"):
            name = stem
        else:
            break
    name = name or path.name
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= KEY_BYTES:
        return name
    digest = hashlib.sha256(path.name.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    return raw[:KEY_BYTES - 13].decode("utf-8", "ignore") + "-" + digest


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_+." else "_" for ch in text)


@dataclass
class ExplainConfig:
    inputs: list[Path]
    checkpoints: list[Path]
    out_dir: Path
    target: str = "predicted"
    method: str = "gradcam"
    save_npy: bool = False
    batch_size: int = 16
    device: str = "auto"
    weights: dict[str, str] = field(default_factory=dict)
    grid_rows: int = 20
    precision: str = "auto"  # device.compute_precision, as featurize and predict
    faces: str = "aligned"   # aligned: each picture is a face crop; detect: explain every face found (MTCNN)
    max_pixels: int | None = DEFAULT_MAX_PIXELS  # larger pictures are skipped with a reason (images/checks.py)


@dataclass
class Item:
    """One picture to explain: a whole aligned picture, or one face cut out of a photo (--faces detect)."""
    path: Path
    rgb: np.ndarray                  # what the model sees, HxWx3 uint8
    face: int | None = None          # index of the face in its photo (largest first)
    photo: np.ndarray | None = None  # the whole photo the face was cut from
    aligned: object = None           # faces.detect.AlignedFace: its box and crop->photo map


def read_items(paths: Sequence[Path], face_mode, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> tuple[list[Item], list[tuple[str, str]]]:
    """The pictures (face_mode None) or every face of every photo, and (path, reason) for the rest."""
    if face_mode is None:
        kept, pictures, bad = read_pictures(paths, max_pixels)
        return [Item(paths[position], rgb) for position, rgb in zip(kept, pictures)], bad
    from pipeline.faces.crops import read_faces

    found, bad = read_faces([str(p) for p in paths], face_mode, max_pixels)
    return [Item(Path(picture.path), aligned.crop, k, picture.rgb, aligned)
            for picture in found for k, aligned in enumerate(picture.faces)], bad


def save_photo_overlay(path: Path, item: Item, cam: np.ndarray, lines: list[str]) -> Path:
    """The crop's map pasted back into the whole photo (only where the crop came from), with the face's box."""
    from pipeline.explain.overlays import overlay_in_region
    from pipeline.faces.detect import paste_back
    from pipeline.faces.drawing import annotate_faces

    values, inside = paste_back(item.photo, cam, item.aligned.to_picture)
    picture = annotate_faces(overlay_in_region(item.photo, values, inside), [item.aligned.face.box], [str(item.face)])
    return save_titled(path, picture, lines)


def load_models(checkpoints: Sequence[Path], weights: dict[str, str], device: torch.device,
                target: str | None = None, settings: dict | None = None
                ) -> tuple[list[FullModel], list[HeadCheckpoint], int | None]:
    """One full model per checkpoint, and the target group index (None: predicted).

    Everything cheap is checked before any backbone is built: the heads agree
    on their groups, the target names one, the weights can be matched, and
    (given a feature file's `settings`) the heads fit those features.
    """
    ckpts = [load_checkpoint(path) for path in checkpoints]
    if settings is not None:
        for ckpt in ckpts:
            ckpt.check_compatible(settings)  # HeadMismatch names what differs
    names = [tuple(c.meta.get("class_names") or []) for c in ckpts]
    if len(set(names)) > 1:
        raise CamError(f"the checkpoints predict different groups: {sorted(set(names))}")
    chosen = resolve_target(target, names[0])
    for ckpt in ckpts:
        require_last_block(ckpt.meta)
    # Heads over the same backbone share it: Grad-CAM's hooks live only for one model's call.
    return load_full_models(ckpts, weights, device), ckpts, chosen


def explain_images(config: ExplainConfig, log: Callable[[str], None] = print,
                   warn: Callable[[str], None] = print) -> dict:
    """Explain every picture with every checkpoint; write overlays (+ .npy), a grid and an index CSV.

    Pictures that cannot be read are reported through `warn` and skipped; the
    rest are explained. Returns {explained, failures, files}.
    """
    device = resolve_device(config.device)
    face_mode = None
    if config.faces != "aligned":
        from pipeline.faces.detect import make_face_mode

        face_mode = make_face_mode(config.faces, device)
    if config.method not in METHODS:
        raise CamError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    check_output(config.out_dir, config.inputs, folder=True)  # OutputConflict: never among its own inputs
    paths, failures = collect_images(config.inputs)
    for path, reason in failures:
        warn(f"error: {display_path(str(path))}: {reason}")
    if not paths:
        raise CamError("no images to explain")
    models, ckpts, target = load_models(config.checkpoints, config.weights, device, config.target)
    for model in models:
        model.precision = config.precision
    class_names = list(ckpts[0].meta.get("class_names") or [])
    labels = checkpoint_labels([c.meta for c in ckpts], list(config.checkpoints))
    columns = columns_for(labels, [c.meta for c in ckpts])
    log(f"explaining {len(paths)} image(s) with {', '.join(labels)} ({config.method}, "
        f"target {config.target}) on {device}")

    outputs = RunOutputs(Path(config.out_dir))
    try:
        result = _explain_all(config, paths, face_mode, models, target, class_names, columns, outputs, log, warn)
    except BaseException:
        outputs.discard()
        raise
    failures += result.pop("failures")
    files = outputs.commit(result.pop("rows")) if result["explained"] else []
    if not result["explained"]:
        outputs.discard()
    return {**result, "failures": failures, "files": files}


def _explain_all(config: ExplainConfig, paths, face_mode, models, target, class_names, columns,
                 outputs: RunOutputs, log, warn) -> dict:
    """Explain every picture into the run's staging folder; returns {explained, failures, rows}."""
    device = resolve_device(config.device)
    failures = []
    index_rows = []
    grid_pictures, grid_names, grid_cells = [], [], []
    explained = 0
    for start in range(0, len(paths), config.batch_size):
        batch_paths = paths[start:start + config.batch_size]
        items, bad = read_items(batch_paths, face_mode, config.max_pixels)
        for path, reason in bad:
            warn(f"error: {display_path(str(path))}: {reason}")
        failures += bad
        if not items:
            continue
        x = to_model_input([item.rgb for item in items], device)
        results = [explain_batch(model, x, target, config.method) for model in models]
        for i, item in enumerate(items):
            path = item.path
            # Unique in the run: a/x.jpg, b/x.jpg and x-2.jpg get x, x-2 and x-2-2.
            key = outputs.unique_key(image_key(path) + ("" if item.face is None else f"_face{item.face}"))
            rgb = item.rgb
            row_cells = []
            for column in columns:
                result = results[column.model_index]
                pred, tgt = int(result.predicted[i]), int(result.target[i])
                probs = result.probs[i]
                cam = resize_map(result.cams[column.backbone][i], *rgb.shape[:2])
                lines = [column.label, f"pred {class_names[pred]}  p={probs[pred]:.2f}"]
                if tgt != pred:
                    lines.append(f"map for {class_names[tgt]}  p={probs[tgt]:.2f}")
                stem = f"{key}_{_safe(column.label)}_{_safe(config.method)}"
                png = save_overlay(outputs.path(f"{stem}.png"), rgb, cam, lines)
                npy = ""
                if config.save_npy:
                    npy = outputs.path(f"{stem}.npy")
                    np.save(npy, cam.astype(np.float32))
                index_rows.append({"image": display_path(str(path)), "model": column.label, "backbone": column.backbone,
                                   "predicted": class_names[pred], "probability": f"{probs[pred]:.4f}",
                                   "target": class_names[tgt], "target_probability": f"{probs[tgt]:.4f}",
                                   "overlay": png.name, "npy": Path(npy).name if npy else ""})
                if item.face is not None:  # the map on the aligned crop, and pasted back into the photo
                    photo_png = save_photo_overlay(outputs.path(f"{stem}_photo.png"), item, cam, lines)
                    box = " ".join(f"{v:.1f}" for v in item.aligned.face.box)
                    index_rows[-1].update({"face": item.face, "box": box, "score": f"{item.aligned.face.score:.4f}",
                                           "photo_overlay": photo_png.name})
                if len(grid_pictures) < config.grid_rows:
                    caption = f"{class_names[pred]} {probs[pred]:.2f}"
                    row_cells.append(GridCell(overlay_rgb(rgb, cam), caption))
            if len(grid_pictures) < config.grid_rows:
                grid_pictures.append(rgb)
                grid_names.append(path.name if item.face is None else f"{path.name}#{item.face}")
                grid_cells.append(row_cells)
            explained += 1
        log(f"  {min(start + config.batch_size, len(paths))}/{len(paths)}")

    if len(columns) > 1 and grid_pictures:
        save_grid(outputs.path(f"grid_{_safe(config.method)}.png"), grid_pictures, grid_names,
                  [c.label for c in columns], grid_cells)
        if explained > len(grid_pictures):
            log(f"grid shows the first {len(grid_pictures)} of {explained} images (--grid-rows)")
    return {"explained": explained, "failures": failures, "rows": index_rows}
