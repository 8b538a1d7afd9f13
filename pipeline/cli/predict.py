"""`predict`: label new face images with a trained head and its frozen backbones.

    predict IMAGES_OR_FOLDER... --checkpoint HEAD [--checkpoint HEAD...] [--tta] [-o predictions.csv]

The image goes through the same steps as during featurize (decode, resize,
normalize; backbones as recorded in the checkpoint) and then through the head.
Several --checkpoint heads are an ensemble: their probabilities are averaged.
Folders are searched recursively for .jpg, .jpeg and .png files. Files that
cannot be read are reported by name; the others are still predicted."""

from __future__ import annotations

import csv
from pathlib import Path

import click

from pipeline.backbones.registry import WeightsUnavailable
from pipeline.cli.exit_codes import finish, output_error, require_writable
from pipeline.cli.options import (
    engine_option,
    max_pixels_option,
    parse_weight_pairs,
    precision_option,
)
from pipeline.inference.predictor import (
    Prediction,
    Predictor,
    predict_faces,
    predict_files,
)
from pipeline.ingest.dataset import collect_images
from pipeline.ingest.labels import display_path


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
    from pipeline.backbones.registry import RebuildError
    from pipeline.faces.detect import make_face_mode
    from pipeline.heads.checkpoint import load_checkpoint
    from pipeline.images.decoders import make_decoder

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
