"""`predict`: label the faces in pictures with an age group, its probabilities and, for age heads, the age.

    predict PICTURES_OR_FOLDERS... [-c HEAD_OR_MODEL ...] [--tta] [-o predictions.json|.jsonl|.csv]

With no -c the model shipped with the package is used (pipeline.models.DEFAULT_MODEL). Each head's own face
framing is used unless --faces says otherwise: heads trained with featurize --faces detect find every face
in a photo and cut it out as featurize does; heads trained on aligned crops take each picture whole.
Several -c heads are an ensemble: their probabilities are averaged. Folders are searched recursively for
.jpg, .jpeg and .png files. Files that cannot be read are reported by name; the others are still labelled."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.exit_codes import finish, output_error, require_writable
from pipeline.cli.options import (
    engine_option,
    max_pixels_option,
    parse_weight_pairs,
    precision_option,
)
from pipeline.ingest.dataset import collect_images
from pipeline.ingest.labels import display_path


def format_table(records: list[dict], class_names: list[str]) -> str:
    """One line per face (photo.jpg#0 is a photo's largest face), and one per picture with no face."""
    with_age = any(face["age"] is not None for record in records for face in record["faces"])
    header = ["file", "group"] + class_names + (["age"] if with_age else [])
    rows = []
    for record in records:
        if not record["faces"] and "error" not in record:
            rows.append([display_path(record["file"]), "(no face)"] + [""] * (len(header) - 2))
        many = len(record["faces"]) > 1 or record["faces"] and record["faces"][0]["score"] is not None
        for k, face in enumerate(record["faces"]):
            rows.append([display_path(record["file"]) + (f"#{k}" if many else ""), face["group"]]
                        + [f"{face['probabilities'][n]:.3f}" for n in class_names]
                        + ([f"{face['age']:.1f}"] if with_age else []))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(header)] + [fmt(r) for r in rows])


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-c", "--checkpoint", "checkpoints", multiple=True, metavar="DIR_OR_NAME",
              help="A head folder (from train-head) or a shipped model's name; default: the shipped model. "
                   "Repeat to average several heads' probabilities (an ensemble); backbones they share run once.")
@click.option("--weights", multiple=True, metavar="NAME=PATH",
              help="Backbone weights to use instead of those named in the checkpoint; needed when they were a "
                   "local file, and checked against the id it records. Repeat, or comma-separate.")
@click.option("--tta", is_flag=True,
              help="Average the plain and mirrored views' probabilities; for faces cut out of photos, also over "
                   "the face cut out at 0.95x, 1x and 1.05x its side (its framing in a photo is known to a few "
                   "percent).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True,
              help="Decoder for pictures used whole (heads trained on aligned crops).")
@engine_option
@precision_option
@click.option("-o", "--out", type=click.Path(path_type=Path), metavar="FILE",
              help="Write the predictions to FILE: .json (a list) or .jsonl (one line per picture) with each "
                   "picture's faces (box, score, landmarks, group, probabilities, age), or .csv (one row per face "
                   "and one per picture without a face).")
@click.option("--quiet", is_flag=True, help="Print neither the table nor the progress bar.")
@max_pixels_option
@click.option("--faces", type=click.Choice(["aligned", "detect"]), default=None,
              help="Override the head's own face framing (default). detect: find every face in each photo "
                   "(MTCNN), cut each out as featurize --faces detect does, and label each. aligned: each "
                   "picture is one aligned face crop. A framing other than the head's is warned about.")
@click.option("--annotated-dir", type=click.Path(path_type=Path, file_okay=False),
              help="For faces found in photos: write each photo with its faces' boxes and labels here "
                   "(default: <OUT>_annotated/ next to -o; none without -o). Never inside an input folder.")
def main(images, checkpoints, weights, tta, batch_size, device, decoder, out, quiet, faces, annotated_dir, engine,
         precision, max_pixels):
    """Label the faces in IMAGES (files or folders) with an age group, its probabilities and, for age heads,
    the age. Without -c the model shipped with the package is used."""
    from pipeline.inference.output_checks import annotated_problem, drop_own_outputs, out_problem
    from pipeline.models import resolve_checkpoint

    files, problems = collect_images(images)
    if out is not None:
        problem = out_problem(out, list(images) + files, [resolve_checkpoint(c) for c in checkpoints or [None]])
        if problem:
            raise click.UsageError(problem)
    if annotated_dir is None and out is not None:
        annotated_dir = out.with_name(f"{out.stem}_annotated")
    files, dropped = drop_own_outputs(files, annotated_dir)
    if not files:
        listed = "\n".join(f"  {item}: {reason}" for item, reason in problems)
        raise click.ClickException("no image to label:\n" + listed)
    if out is not None:
        require_writable(out)  # a read-only folder: one line, before the model is built
    loaded, labels = load_heads(checkpoints)
    if (faces or framing_of(loaded, labels)) != "detect":
        annotated_dir = None  # pictures used whole: nothing to draw
    elif annotated_dir is not None:
        problem = annotated_problem(annotated_dir, images)
        if problem:
            raise click.ClickException(problem)
    predictor, mode = load_predictor(loaded, labels, weights, faces, device, engine, precision, files)
    records, failures, annotated = run_predictions(predictor, mode, files, decoder, batch_size, tta, annotated_dir,
                                                   max_pixels, quiet)
    failures = problems + failures
    class_names = list(predictor.meta["class_names"])
    if not quiet:
        click.echo(format_table(records, class_names))
    if out is not None:
        from pipeline.inference.records import write_records

        try:
            write_records(records, class_names, out, detected=mode.name == "detect")
        except OSError as err:
            raise output_error(out, err) from err
        click.echo(f"wrote {len(records)} pictures ({sum(len(r['faces']) for r in records)} faces) to {out}")
    if annotated:
        click.echo(f"wrote {len(annotated)} annotated photos to {annotated_dir}")
    report(records, failures, len(files), dropped, annotated_dir)
    if not any("error" not in r for r in records):
        raise click.ClickException("no image could be read")
    finish(len(failures))  # exit 3: some images were not labelled (listed above)


def load_heads(checkpoints):
    """(loaded heads, their labels), or one line saying why not."""
    from pipeline.heads.checkpoint import CheckpointError
    from pipeline.inference.estimator import load_heads as load

    try:
        return load(list(checkpoints) or [None])
    except (FileNotFoundError, CheckpointError) as err:
        raise click.ClickException(str(err)) from err
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise click.ClickException(f"cannot load the checkpoint: {err}") from err


def framing_of(loaded, labels) -> str:
    """The heads' one face framing, or one line when an ensemble mixes framings."""
    from pipeline.inference.framing import FramingMismatch, framing_of_heads

    try:
        return framing_of_heads([ckpt.meta for ckpt in loaded], labels)
    except FramingMismatch as err:
        raise click.ClickException(str(err)) from err


def load_predictor(loaded, labels, weights, faces, device, engine, precision, files):
    """The Predictor and face mode, or one line saying why not."""
    from pipeline.backbones.registry import RebuildError, WeightsUnavailable
    from pipeline.inference.estimator import open_predictor

    backbones = list(dict.fromkeys(name for ckpt in loaded for name in ckpt.meta["backbones"]))
    try:
        return open_predictor(loaded, labels, faces, device, engine, precision, parse_weight_pairs(weights, backbones),
                              files[:3], log=lambda line: click.echo(line, err=True),
                              warn=lambda line: click.echo(line, err=True))
    except RebuildError as err:
        which = labels[0] if len(labels) == 1 else "the ensemble"
        raise click.ClickException(f"cannot rebuild the model of {which}: {err}") from err
    except (WeightsUnavailable, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err


def run_predictions(predictor, mode, files, decoder, batch_size, tta, annotated_dir, max_pixels, quiet):
    """(picture records in input order, [(file, reason)] for pictures that could not be read, annotated copies)."""
    import numpy as np
    from tqdm import tqdm

    from pipeline.images.decoders import make_decoder
    from pipeline.inference.predictor import predict_faces, predict_files
    from pipeline.inference.records import picture_records, whole_picture_box

    bar = tqdm(total=len(files), unit="img", desc="predict", disable=quiet or not sys.stderr.isatty(), leave=False)
    try:
        annotated = []
        if mode.name == "detect":
            predictions, failures, _, annotated = predict_faces(predictor, files, mode, batch_size, tta,
                                                                annotated_dir, max_pixels, bar.update)
        else:
            dec = make_decoder(decoder, predictor.device.type, batch_size, max_pixels=max_pixels)
            predictions, failures = predict_files(predictor, files, dec, batch_size, tta, bar.update)
            for p in predictions:  # a picture used whole: its face is all of it
                box = whole_picture_box(p.file)
                p.box = None if box is None else np.asarray(box)
    finally:
        bar.close()
    records = picture_records([str(f) for f in files], predictions, list(predictor.meta["class_names"]), failures)
    for record in records:
        record["file"] = display_path(record["file"])
    return records, failures, annotated


def report(records, failures, total, dropped, annotated_dir) -> None:
    """Pictures without a face, pictures skipped, and own outputs left out, by name on stderr."""
    empty = [r["file"] for r in records if not r["faces"] and "error" not in r]
    if empty:
        click.echo(f"no face found in {len(empty)} of {total} pictures:", err=True)
        for file in empty:
            click.echo(f"  {file}: no face found", err=True)
    if dropped:
        click.echo(f"left out {dropped} of predict's own annotated copies among the inputs", err=True)
    if failures:
        click.echo(f"could not predict {len(failures)} of {total} images:", err=True)
        for file, reason in failures:
            click.echo(f"  {display_path(str(file))}: {reason}", err=True)
