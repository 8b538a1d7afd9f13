"""`evaluate`: score trained heads on a split of a feature file; write figures, tables and JSON.

    evaluate CHECKPOINT [CHECKPOINT...] --features FEATURES.h5 [--split test|val] [--split-file CSV] [--tta]
             [--ensemble] -o OUT/

Writes OUT/<checkpoint>/{metrics.json, predictions.csv, confusion.png, curves.png, reliability.png},
OUT/comparison.md (one row per checkpoint, the paper's Table 1 beside ours) and OUT/metrics.json (all numbers).
With --ensemble, one more row, OUT/ensemble/, scores the mean of all the checkpoints' probabilities.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from .. import figures
from ..metrics import (N_BINS, FeatureInputs, comparison_markdown, ensemble_evaluation, evaluate_checkpoint,
                       terminal_table)

DEFINITIONS = {
    "accuracy": "share of rows whose predicted group (argmax of the probabilities) is the true group",
    "balanced_accuracy": "mean per-group recall over the groups present in the split (sklearn)",
    "macro_f1": "unweighted mean of per-group F1 (sklearn, zero_division=0)",
    "off_by_one": "share of rows with |predicted group - true group| <= 1",
    "ece": f"expected calibration error, {N_BINS} equal-width bins of the top probability, (b/{N_BINS}, (b+1)/{N_BINS}]",
    "mae": "mean absolute error in years of the predicted age (age-regression heads only, else null)",
    "mean_age_error": "mean of predicted minus true age in years (age-regression heads only, else null)",
    "tta": "if true, the plain and mirrored views' probabilities (and ages) are averaged",
    "ensemble": "the mean of its members' probabilities (after TTA, if any); ages averaged if every member has one",
}


def unique_names(paths: list[Path]) -> list[str]:
    """Output folder names: each checkpoint folder's name, with parent folders added where names collide.

    A checkpoint is a folder (or one of its two files, head.json / head.safetensors).
    """
    folders = [p.parent if p.suffix in (".json", ".safetensors") else p for p in paths]
    parts = [f.resolve().parts[1:] or ("checkpoint",) for f in folders]
    depth = [1] * len(parts)
    while True:
        names = ["_".join(p[-d:]) for p, d in zip(parts, depth)]
        clashing = [i for i, n in enumerate(names) if depth[i] < len(parts[i])
                    and any(m == n and parts[j] != parts[i] for j, m in enumerate(names))]
        if not clashing:
            break
        for i in clashing:
            depth[i] += 1
    # The same folder given twice: number the repeats.
    return [n if names.count(n) == 1 else f"{n}_{names[:i].count(n) + 1}" for i, n in enumerate(names)]


def _load(path: Path):
    from ..heads import load_checkpoint

    if not path.exists():
        raise click.ClickException(f"checkpoint {path} does not exist")
    try:
        return load_checkpoint(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise click.ClickException(f"cannot load checkpoint {path}: {err}") from err


def write_predictions(ev, path: Path) -> None:
    """One row per evaluated image: true and predicted group, the probabilities, and age."""
    names = list(ev.meta["class_names"])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        header = ["file", "age", "true_group", "predicted_group"] + [f"p_{n}" for n in names]
        if ev.ages_pred is not None:
            header.append("predicted_age")
        writer.writerow(header)
        for i, file in enumerate(ev.paths):
            row = [file, int(ev.ages_true[i]), names[int(ev.y_true[i])], names[int(ev.probs[i].argmax())]]
            row += [f"{p:.6f}" for p in ev.probs[i]]
            if ev.ages_pred is not None:
                row.append(f"{ev.ages_pred[i]:.2f}")
            writer.writerow(row)


def _dump(data, path: Path) -> None:
    # allow_nan=False: the file stays strict JSON (undefined values are null).
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--features", required=True, type=click.Path(path_type=Path),
              help="Feature file made by featurize (the heads' backbones, weights and groups must match).")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True,
              help="Which rows to score.")
@click.option("--split-file", type=click.Path(path_type=Path, dir_okay=False),
              help="CSV with columns file,split; its --split rows are scored instead of the file's own split.")
@click.option("--tta", is_flag=True, help="Average the plain and mirrored views' probabilities (both are cached).")
@click.option("--ensemble", is_flag=True,
              help="Also score the mean of all the checkpoints' probabilities, as one more row named 'ensemble' "
                   "(e.g. heads of several seeds or backbones; choose its members on --split val).")
@click.option("-o", "--out", required=True, type=click.Path(path_type=Path, file_okay=False),
              help="Output folder.")
def main(checkpoints, features, split, split_file, tta, ensemble, out):
    """Score head CHECKPOINTs on a split of FEATURES; write figures, a comparison table and JSON."""
    from ..heads import HeadMismatch

    checkpoints = [Path(p) for p in checkpoints]
    if ensemble and len(checkpoints) < 2:
        raise click.ClickException("--ensemble needs at least two checkpoints")
    if split_file is not None and not split_file.is_file():
        raise click.ClickException(f"split file {split_file} does not exist")
    try:
        inputs = FeatureInputs(features)
    except (OSError, ValueError) as err:
        raise click.ClickException(str(err)) from err

    # Load and check every checkpoint before writing anything.
    loaded = []
    for path in checkpoints:
        checkpoint = _load(path)
        try:
            checkpoint.check_compatible(inputs.settings)
        except HeadMismatch as err:
            raise click.ClickException(f"checkpoint {path} does not fit feature file {features}:\n{err}") from err
        loaded.append(checkpoint)

    evaluations = []
    for name, path, checkpoint in zip(unique_names(checkpoints), checkpoints, loaded):
        try:
            ev = evaluate_checkpoint(checkpoint, name, path, inputs, split, split_file, tta)
        except ValueError as err:
            raise click.ClickException(f"{path}: {err}") from err
        evaluations.append(ev)
    if ensemble:
        taken = set(unique_names(checkpoints))
        name = next(n for n in ("ensemble", *(f"ensemble_{i}" for i in range(2, len(taken) + 3))) if n not in taken)
        try:
            evaluations.append(ensemble_evaluation(evaluations, name))
        except ValueError as err:
            raise click.ClickException(f"cannot ensemble these checkpoints: {err}") from err

    out.mkdir(parents=True, exist_ok=True)
    everything = {
        "features": str(features),
        "feature_fingerprint": inputs.settings.get("fingerprint"),
        "split": split,
        "split_file": None if split_file is None else str(split_file),
        "tta": tta,
        "ensemble": ensemble,
        "definitions": DEFINITIONS,
        "checkpoints": {},
    }
    for ev in evaluations:
        folder = out / ev.name
        folder.mkdir(parents=True, exist_ok=True)
        summary = ev.summary()
        title = f"{ev.name} ({'+'.join(ev.meta['backbones'])}, {ev.split}{' +TTA' if tta else ''})"
        figures.confusion_figure(ev.metrics["confusion"], list(ev.meta["class_names"]), folder / "confusion.png", title)
        if "members" not in ev.meta:  # an ensemble has no training history of its own
            figures.curves_figure(ev.meta.get("history") or [], ev.meta.get("best_epoch"), folder / "curves.png",
                                  ev.name)
        figures.reliability_figure(ev.metrics["calibration"], folder / "reliability.png", ev.name)
        write_predictions(ev, folder / "predictions.csv")
        _dump(summary, folder / "metrics.json")
        everything["checkpoints"][ev.name] = summary
        for warning in ev.warnings:
            click.echo(f"warning: {ev.name}: {warning}", err=True)

    source = f"split {split!r} of " + (f"split file `{split_file}`" if split_file else "the feature file")
    (out / "comparison.md").write_text(comparison_markdown(evaluations, str(features), source))
    _dump(everything, out / "metrics.json")

    click.echo(terminal_table(evaluations))
    click.echo(f"\nwrote {out / 'comparison.md'}, {out / 'metrics.json'} and per-checkpoint folders in {out}/")
