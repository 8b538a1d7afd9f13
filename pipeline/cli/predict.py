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
from ..heads import assemble_features
from .options import parse_weight_pairs


@dataclass
class Prediction:
    file: str
    probs: np.ndarray          # [C] group probabilities
    age: float | None          # years, for age-regression heads


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
                 labels: list[str] | None = None):
        """checkpoints: one or a list, each a path or a loaded HeadCheckpoint; labels name them in errors."""
        from ..device import resolve_device
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
        self.backbones = {}  # (name, weights id) -> backbone, shared by the heads
        models = load_full_models(loaded, weights, self.device, labels if len(loaded) > 1 else None,
                                  self.backbones)
        self.members = list(zip(models, loaded))
        self.checkpoint = self.members[0][1]
        self.meta = self.checkpoint.meta

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """views [B, 2, 3, S, S] -> (probabilities [B, C], ages [B] or None); with tta both views are averaged."""
        n_views = 2 if tta else 1
        x = views[:, :n_views].to(self.device).flatten(0, 1)  # [B * n_views, 3, S, S]
        x = x.contiguous(memory_format=torch.channels_last)
        # As featurize does: float16 autocast on CUDA, float32 on the CPU, so features match the cache.
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            pooled = {key: backbone(x) for key, backbone in self.backbones.items()}
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


def write_csv(predictions: list[Prediction], class_names: list[str], path: Path) -> None:
    with_age = any(p.age is not None for p in predictions)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "group"] + [f"p_{n}" for n in class_names] + (["age"] if with_age else []))
        for p in predictions:
            row = [p.file, class_names[int(p.probs.argmax())]] + [f"{v:.6f}" for v in p.probs]
            if with_age:
                row.append(f"{p.age:.2f}")
            writer.writerow(row)


def format_table(predictions: list[Prediction], class_names: list[str]) -> str:
    with_age = any(p.age is not None for p in predictions)
    header = ["file", "group"] + class_names + (["age"] if with_age else [])
    rows = [[p.file, class_names[int(p.probs.argmax())]] + [f"{v:.3f}" for v in p.probs]
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
@click.option("--tta", is_flag=True, help="Average the plain and mirrored views' probabilities.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True)
@click.option("-o", "--out", type=click.Path(path_type=Path, dir_okay=False), help="Write a CSV here.")
@click.option("--quiet", is_flag=True, help="Do not print the table.")
def main(images, checkpoints, weights, tta, batch_size, device, decoder, out, quiet):
    """Label face IMAGES (files or folders) with an age group, its probabilities and, for age heads, the age."""
    from ..decode import make_decoder
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
    if problems:
        raise click.ClickException("\n".join(f"{item}: {reason}" for item, reason in problems))
    backbones = list(dict.fromkeys(name for ckpt in loaded for name in ckpt.meta["backbones"]))
    try:
        predictor = Predictor(loaded, parse_weight_pairs(weights, backbones), device,
                              labels=[f"checkpoint {c}" for c in checkpoints])
        dec = make_decoder(decoder, predictor.device.type, batch_size)
    except RebuildError as err:
        which = f"checkpoint {checkpoints[0]}" if len(checkpoints) == 1 else "the ensemble"
        raise click.ClickException(f"cannot rebuild the model of {which}: {err}") from err
    except (WeightsUnavailable, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from err

    predictions, failures = predict_files(predictor, files, dec, batch_size, tta)
    class_names = list(predictor.meta["class_names"])
    if predictions and not quiet:
        click.echo(format_table(predictions, class_names))
    if out is not None:
        write_csv(predictions, class_names, out)
        click.echo(f"wrote {len(predictions)} predictions to {out}")
    if failures:
        click.echo(f"could not predict {len(failures)} of {len(files)} images:", err=True)
        for file, reason in failures:
            click.echo(f"  {file}: {reason}", err=True)
    if not predictions:
        raise click.ClickException("no image could be read")

