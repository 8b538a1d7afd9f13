"""`predict`: label new face images with a trained head and its frozen backbones.

    predict IMAGES_OR_FOLDER... --checkpoint HEAD [--checkpoint HEAD...] [--tta] [-o predictions.csv]

The image goes through the same steps as during featurize (decode, resize,
normalize; backbones as recorded in the checkpoint) and then through the head.
Several --checkpoint heads are an ensemble: their probabilities are averaged.
Folders are searched recursively for .jpg, .jpeg and .png files. Files that
cannot be read are reported by name; the others are still predicted.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch

from ..backbones import WeightsUnavailable
from ..dataset import collect_images
from ..device import compute_precision
from ..heads import assemble_features
from ..labels import display_path
from ..image_checks import DEFAULT_MAX_PIXELS
from .exit_codes import finish, output_error, require_writable
from .options import engine_option, max_pixels_option, parse_weight_pairs, precision_option


@dataclass
class Prediction:
    file: str
    probs: np.ndarray          # [C] group probabilities
    age: float | None          # years, for age-regression heads
    face: int | None = None    # --faces detect: index of the face in its picture (largest first)
    box: np.ndarray | None = None      # --faces detect: x0, y0, x1, y1 in the picture's pixels
    score: float | None = None         # --faces detect: the detector's probability


class Predictor:
    """The full model of one or more head checkpoints (full_model.load_full_model), ready to label decoded images.

    Several checkpoints make an ensemble: each backbone is built and run once
    per batch, each head reads its own features from those outputs, and the
    heads' probabilities are averaged (ages too, when every head predicts one),
    as `evaluate --ensemble` does on cached features.
    weights: optional {backbone: path or enum}, needed when a head was trained
    on features from a local weights file (the checkpoint holds only its name
    and hash); they must have the id recorded in the checkpoint.
    """

    def __init__(self, checkpoints, weights: dict[str, str] | None = None, device: str = "auto",
                 labels: list[str] | None = None, precision: str = "auto", engine: str = "torch",
                 probe_files=(), log=None):
        """checkpoints: one or a list, each a path or a loaded HeadCheckpoint; labels name them in errors.

        engine: engines.ENGINES, for the backbones' forward; probe_files: a few of the images to
        predict, which ONNX Runtime's graphs are checked on against PyTorch; log: where to say which.
        """
        from ..device import resolve_device, resolve_precision
        from ..engines import select_engine
        from ..full_model import load_full_models
        from ..heads import HeadCheckpoint, load_checkpoint

        checkpoints = list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
        labels = labels or [f"head {i + 1}" for i in range(len(checkpoints))]
        loaded = [c if isinstance(c, HeadCheckpoint) else load_checkpoint(c) for c in checkpoints]
        # Check the heads agree before building any backbone (which may mean loading weights).
        groups = list(loaded[0].meta["class_names"])
        for label, ckpt in zip(labels[1:], loaded[1:]):
            if list(ckpt.meta["class_names"]) != groups:
                raise ValueError(f"{label} predicts groups {list(ckpt.meta['class_names'])}, "
                                 f"{labels[0]} predicts {groups}: an ensemble needs the same groups")
        self.device = resolve_device(device)
        self.precision = precision
        self.backbones = {}  # (name, weights id) -> backbone, shared by the heads
        models = load_full_models(loaded, weights, self.device, labels if len(loaded) > 1 else None,
                                  self.backbones)
        self.members = list(zip(models, loaded))
        # The forward per backbone: the PyTorch module, or an ONNX Runtime session exported from it (engines.py).
        self.forwards, self.engine = select_engine(self.backbones, engine, self.device, probe_files,
                                                   log or (lambda *_: None),
                                                   precision=resolve_precision(self.device, precision))
        self.checkpoint = self.members[0][1]
        self.meta = self.checkpoint.meta

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """views [B, 2, 3, S, S] -> (probabilities [B, C], ages [B] or None); with tta both views are averaged."""
        n_views = 2 if tta else 1
        x = views[:, :n_views].to(self.device).flatten(0, 1)  # [B * n_views, 3, S, S]
        x = x.contiguous(memory_format=torch.channels_last)
        # The precision featurize and explain use on this device (device.compute_precision), so features match.
        with compute_precision(self.device, self.precision):
            pooled = {key: forward(x) for key, forward in self.forwards.items()}
        probs, ages = [], []
        for model, ckpt in self.members:
            own = {name: pooled[(name, str(ckpt.meta["weights"][name]))] for name in model.names}
            features = assemble_features(own, model.names, model.feature_kind).float()
            p = torch.softmax(model.head(features).float(), dim=1)
            probs.append(p.reshape(len(views), n_views, -1).mean(1))
            age = ckpt.predict_age(features)
            ages.append(None if age is None else age.float().reshape(len(views), n_views).mean(1))
        prob = torch.stack(probs).mean(0).cpu().numpy()
        age = None if any(a is None for a in ages) else torch.stack(ages).mean(0).cpu().numpy()
        return prob, age


def predict_files(predictor: Predictor, files: list[Path], decoder, batch_size: int, tta: bool = False,
                  progress=None) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predict every file; returns (predictions in input order, [(file, reason)] for files that failed)."""
    predictions, failures = [], []
    for lo in range(0, len(files), batch_size):
        chunk = [str(p) for p in files[lo:lo + batch_size]]
        decoded = decoder.decode(chunk)
        failures += decoded.failures
        if decoded.kept:
            probs, ages = predictor(decoded.views, tta)
            for k, position in enumerate(decoded.kept):
                predictions.append(Prediction(chunk[position], probs[k], None if ages is None else float(ages[k])))
        if progress is not None:
            progress(len(chunk))
    return predictions, failures


def predict_faces(predictor: Predictor, files: list[Path], mode, batch_size: int, tta: bool = False,
                  annotated_dir: Path | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[list[Prediction], list[tuple[str, str]], list[Path]]:
    """Every face of every picture: (one prediction per face, [(file, reason)] for pictures that failed or hold
    no face, annotated copies written). Faces are cut out as featurize --faces detect does (face_crops.py)."""
    from ..face_crops import read_faces

    predictions, failures, annotated = [], [], []
    for lo in range(0, len(files), batch_size):
        pictures, bad = read_faces([str(p) for p in files[lo:lo + batch_size]], mode, max_pixels)
        failures += bad
        faces = [(picture, k, aligned) for picture in pictures for k, aligned in enumerate(picture.faces)]
        found = []
        for start in range(0, len(faces), batch_size):  # a group photo can hold more faces than a batch
            chunk = faces[start:start + batch_size]
            probs, ages = face_probabilities(predictor, [(picture.rgb, aligned) for picture, _, aligned in chunk], tta)
            found += [Prediction(picture.path, probs[i], None if ages is None else float(ages[i]), k,
                                 aligned.face.box.astype(float), float(aligned.face.score))
                      for i, (picture, k, aligned) in enumerate(chunk)]
        predictions += found
        if annotated_dir is not None:
            annotated += _write_annotated(pictures, found, list(predictor.meta["class_names"]), annotated_dir)
    return predictions, failures, annotated


def face_probabilities(predictor: Predictor, faces: list, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N, C], ages [N] or None) of faces cut out of pictures: [(picture rgb, faces.AlignedFace)].

    With tta each face is cut out again at every faces.TTA_ZOOMS side, and the plain and mirrored views
    of every cut are averaged: the framing of a face found in a photo is only known to a few percent.
    """
    from ..face_crops import crops_to_views
    from ..faces import TTA_ZOOMS, align_face

    zooms = TTA_ZOOMS if tta else (1.0,)
    runs = []
    for zoom in zooms:
        crops = [aligned.crop if zoom == 1.0 else align_face(rgb, aligned.face, zoom=zoom).crop
                 for rgb, aligned in faces]
        runs.append(predictor(crops_to_views(crops, predictor.device), tta))
    probs = np.mean([p for p, _ in runs], axis=0)
    ages = None if runs[0][1] is None else np.mean([a for _, a in runs], axis=0)
    return probs, ages


def _write_annotated(pictures, predictions: list[Prediction], class_names: list[str], folder: Path) -> list[Path]:
    """One PNG per picture: the photo with each face's box, index, group and probability (and age)."""
    from PIL import Image

    from ..overlays import annotate_faces

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for picture in pictures:
        own = [p for p in predictions if p.file == picture.path]
        labels = [f"{p.face}: {class_names[int(p.probs.argmax())]} {p.probs.max():.2f}"
                  + (f" ({p.age:.0f} y)" if p.age is not None else "") for p in own]
        path = folder / f"{Path(picture.path).stem}_faces.png"
        counter = 1
        while path in written:  # two photos with the same name in different folders
            counter += 1
            path = folder / f"{Path(picture.path).stem}_faces-{counter}.png"
        Image.fromarray(annotate_faces(picture.rgb, [p.box for p in own], labels)).save(path)
        written.append(path)
    return written


def write_csv(predictions: list[Prediction], class_names: list[str], path: Path) -> None:
    with_age = any(p.age is not None for p in predictions)
    with_faces = any(p.face is not None for p in predictions)
    face_columns = ["face", "x0", "y0", "x1", "y1", "score"] if with_faces else []
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file"] + face_columns + ["group"] + [f"p_{n}" for n in class_names]
                        + (["age"] if with_age else []))
        for p in predictions:
            faces = ([p.face] + [f"{v:.1f}" for v in p.box] + [f"{p.score:.4f}"]) if with_faces else []
            row = [display_path(str(p.file))] + faces + [class_names[int(p.probs.argmax())]] + [f"{v:.6f}" for v in p.probs]
            if with_age:
                row.append(f"{p.age:.2f}")
            writer.writerow(row)


def format_table(predictions: list[Prediction], class_names: list[str]) -> str:
    with_age = any(p.age is not None for p in predictions)
    header = ["file", "group"] + class_names + (["age"] if with_age else [])
    # With --faces detect the file column names the face too: photo.jpg#0 is its largest face.
    rows = [[display_path(str(p.file)) + ("" if p.face is None else f"#{p.face}"), class_names[int(p.probs.argmax())]]
            + [f"{v:.3f}" for v in p.probs]
            + ([f"{p.age:.1f}"] if with_age else []) for p in predictions]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--checkpoint", "checkpoints", required=True, multiple=True, type=click.Path(path_type=Path),
              help="Trained head (from train_head). Repeat to average several heads' probabilities (an ensemble, "
                   "as evaluate --ensemble); backbones they share run once.")
@click.option("--weights", multiple=True, metavar="NAME=PATH",
              help="Backbone weights to use instead of those named in the checkpoint; needed when they were a "
                   "local file, and checked against the id it records. Repeat, or comma-separate.")
@click.option("--tta", is_flag=True,
              help="Average the plain and mirrored views' probabilities; with --faces detect, also over the face "
                   "cut out at 0.95x, 1x and 1.05x its side (its framing in a photo is known to a few percent).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@engine_option
@precision_option
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False), help="Write a CSV here.")
@click.option("--quiet", is_flag=True, help="Do not print the table.")
@max_pixels_option
@click.option("--faces", type=click.Choice(["aligned", "detect"]), default="aligned", show_default=True,
              help="aligned: each image is an aligned face crop. detect: find every face in each photo (MTCNN), "
                   "cut each out as featurize --faces detect does, and label each (one row per face).")
@click.option("--annotated-dir", type=click.Path(path_type=Path, file_okay=False),
              help="--faces detect: write each photo with its faces' boxes and labels here "
                   "(default: <OUT>_annotated/ next to -o; none without -o).")
def main(images, checkpoints, weights, tta, batch_size, device, decoder, out, quiet, faces, annotated_dir, engine,
         precision, max_pixels):
    """Label face IMAGES (files or folders) with an age group, its probabilities and, for age heads, the age."""
    from ..decode import make_decoder
    from ..faces import make_face_mode
    from ..full_model import RebuildError
    from ..heads import load_checkpoint

    loaded = []
    for checkpoint in checkpoints:
        if not checkpoint.exists():
            raise click.ClickException(f"checkpoint {checkpoint} does not exist")
        try:
            loaded.append(load_checkpoint(checkpoint))
        except (OSError, ValueError, KeyError, RuntimeError) as err:
            raise click.ClickException(f"cannot load checkpoint {checkpoint}: {err}") from err
    files, problems = collect_images(images)
    if not files:
        raise click.ClickException("no image to label:\n" + "\n".join(f"  {item}: {reason}" for item, reason in problems))
    if out is not None:
        require_writable(out)  # a read-only folder: one line, before the model is built
    backbones = list(dict.fromkeys(name for ckpt in loaded for name in ckpt.meta["backbones"]))
    try:
        predictor = Predictor(loaded, parse_weight_pairs(weights, backbones), device,
                              labels=[f"checkpoint {c}" for c in checkpoints], engine=engine, precision=precision,
                              probe_files=files[:3], log=lambda line: click.echo(line, err=True))
        dec = make_decoder(decoder, predictor.device.type, batch_size, max_pixels=max_pixels)
        face_mode = None if faces == "aligned" else make_face_mode(faces, predictor.device)
    except RebuildError as err:
        which = f"checkpoint {checkpoints[0]}" if len(checkpoints) == 1 else "the ensemble"
        raise click.ClickException(f"cannot rebuild the model of {which}: {err}") from err
    except (WeightsUnavailable, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err

    annotated = []
    if face_mode is None:
        predictions, failures = predict_files(predictor, files, dec, batch_size, tta)
        failures = problems + failures
    else:
        if annotated_dir is None and out is not None:
            annotated_dir = out.with_name(f"{out.stem}_annotated")
        predictions, failures, annotated = predict_faces(predictor, files, face_mode, batch_size, tta, annotated_dir,
                                                         max_pixels)
        failures = problems + failures
    class_names = list(predictor.meta["class_names"])
    if predictions and not quiet:
        click.echo(format_table(predictions, class_names))
    if out is not None:
        try:
            write_csv(predictions, class_names, out)
        except OSError as err:
            raise output_error(out, err) from err
        click.echo(f"wrote {len(predictions)} predictions to {out}")
    if annotated:
        click.echo(f"wrote {len(annotated)} annotated photos to {annotated_dir}")
    if failures:
        click.echo(f"could not predict {len(failures)} of {len(files)} images:", err=True)
        for file, reason in failures:
            click.echo(f"  {display_path(str(file))}: {reason}", err=True)
    if not predictions:
        raise click.ClickException("no image could be read")
    finish(len(failures))  # exit 3: some images were not labelled (listed above)

