"""`evaluate`: score trained heads on a split of a feature file; write figures, tables and JSON.

    evaluate -c HEAD [-c HEAD ...] -f FEATURES.h5 [-f OTHER.h5 ...]
             [--split test|val|train|all] [--cross-split SPLIT] [--split-file CSV] [--tta] [--ensemble] -o OUT/

Writes OUT/<checkpoint>/{metrics.json, predictions.csv, confusion.png, curves.png, reliability.png},
OUT/comparison.md (one row per checkpoint, the paper's Table 1 beside ours) and OUT/metrics.json (all numbers).
With --ensemble, one more row, OUT/ensemble/, scores the mean of all the checkpoints' probabilities.
Cross-dataset: with several --feature-file files every head is scored on each (OUT/<head>@<file>/), and
comparison.md marks each row in-domain (the head's own training data) or cross-domain.
A head trained on other age groups than the file's (train-head --bins) is scored against the file's
ages regrouped into its groups.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.cli.exit_codes import finish, require_writable
from pipeline.cli.options import AliasedCommand, out_option
from pipeline.files import OutputConflict, check_output, write_bytes_atomically

# numpy, torch, scikit-learn and matplotlib are imported when the command runs: --help answers at once.

SPLIT_CHOICES = ["test", "val", "train", "all"]


def definitions() -> dict:
    """What each number in metrics.json means."""
    from pipeline.heads.calibration import N_BINS

    return {
        "accuracy": "share of rows whose predicted group (argmax of the probabilities) is the true group",
        "balanced_accuracy": "mean per-group recall over the groups present in the split (sklearn)",
        "macro_f1": "unweighted mean of per-group F1 (sklearn, zero_division=0)",
        "off_by_one": "share of rows with |predicted group - true group| <= 1",
        "ece": f"expected calibration error, {N_BINS} equal-width bins of the top probability, "
               f"(b/{N_BINS}, (b+1)/{N_BINS}]",
        "mae": "mean absolute error in years of the predicted age (age-regression heads only, else null)",
        "mean_age_error": "mean of predicted minus true age in years (age-regression heads only, else null)",
        "tta": "if true, the plain and mirrored views' probabilities (and ages) are averaged",
        "ensemble": "the mean of its members' probabilities (after TTA, if any); ages averaged if every member has "
                    "one",
        "calibration_temperature": "the head's post-hoc temperature T (train-head --calibrate temperature, fitted "
                                   "on validation): its probabilities are softmax(group scores / T); 1 = "
                                   "uncalibrated; null for an ensemble, whose members each use their own",
        "domain": "in-domain: the head's own training data (same feature file, or the same rows, labels and "
                  "splits); cross-domain: another data set",
        "mae_rows": "MAE and mean_age_error use only rows with a known age (rows labelled with a group only have "
                    "age -1)",
        "group_edges": "the head's age groups (inclusive upper ages); when they differ from the feature file's, "
                       "the true groups are the file's ages regrouped into them",
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
    from pipeline.heads.checkpoint import load_checkpoint

    if not path.exists():
        raise click.ClickException(f"checkpoint {path} does not exist")
    try:
        return load_checkpoint(path)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise click.ClickException(f"cannot load checkpoint {path}: {err}") from err


def _dump(data, path: Path) -> None:
    # allow_nan=False: the file stays strict JSON (undefined values are null).
    write_bytes_atomically(path, (json.dumps(data, indent=2, allow_nan=False) + "\n").encode())


def _write_evaluation(ev, folder: Path, tta: bool) -> dict:
    """One head's folder: confusion, curves and reliability figures, predictions.csv, metrics.json."""
    from pipeline.evaluation import figures
    from pipeline.evaluation.tables import predictions_csv

    folder.mkdir(parents=True, exist_ok=True)
    summary = ev.summary()
    title = f"{ev.name} ({'+'.join(ev.meta['backbones'])}, {ev.split}{' +TTA' if tta else ''})"
    figures.confusion_figure(ev.metrics["confusion"], list(ev.meta["class_names"]), folder / "confusion.png", title)
    if "members" not in ev.meta:  # an ensemble has no training history of its own
        figures.curves_figure(ev.meta.get("history") or [], ev.meta.get("best_epoch"), folder / "curves.png", ev.name)
    figures.reliability_figure(ev.metrics["calibration"], folder / "reliability.png", ev.name)
    write_bytes_atomically(folder / "predictions.csv", predictions_csv(ev))
    _dump(summary, folder / "metrics.json")
    return summary


# One release of grace for the old spellings: --features FILE and the checkpoints as positional arguments.
@click.command(cls=AliasedCommand, aliases={"--features": "--feature-file"}, hidden_arguments=("legacy_checkpoints",),
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("legacy_checkpoints", nargs=-1, type=click.Path(path_type=Path))
@click.option("-c", "--checkpoint", "checkpoints", multiple=True, type=click.Path(path_type=Path), metavar="DIR",
              help="Head checkpoint folder (made by train-head). Repeat to score several heads side by side.")
@click.option("-f", "--feature-file", "feature_files", required=True, multiple=True,
              type=click.Path(path_type=Path), metavar="FILE",
              help="Feature file made by featurize (the heads' backbones, weights, preprocessing and face handling "
                   "must match; other age groups are regrouped from its ages). Repeat to score each head on "
                   "several data sets (cross-dataset evaluation; comparison.md puts the rows side by side).")
@click.option("--split", type=click.Choice(SPLIT_CHOICES), default="test", show_default=True,
              help="Which rows to score; 'all' scores every row of the file (e.g. another data set).")
@click.option("--cross-split", type=click.Choice(SPLIT_CHOICES),
              help="Rows to score in feature files that are not a head's own training data (cross-domain), "
                   "e.g. --split test --cross-split all. Default: the same as --split.")
@click.option("--split-file", type=click.Path(path_type=Path, dir_okay=False),
              help="CSV with columns file,split; its --split rows are scored instead of the file's own split.")
@click.option("--tta", is_flag=True, help="Average the plain and mirrored views' probabilities (both are cached).")
@click.option("--ensemble", is_flag=True,
              help="Also score the mean of all the checkpoints' probabilities, as one more row named 'ensemble' "
                   "(e.g. heads of several seeds or backbones; choose its members on --split val).")
@out_option("folder", required=True,
            help="Output FOLDER: comparison.md, metrics.json and one folder of figures per head.")
def main(legacy_checkpoints, checkpoints, feature_files, split, cross_split, split_file, tta, ensemble, out):
    """Score head checkpoints (-c) on a split of a feature file (-f); write figures, a comparison table and JSON.

    \b
    evaluate -c heads/mobilenet_v2 -c heads/resnet50 -f features.h5 -o eval/
    """
    checkpoints = [Path(p) for p in (*legacy_checkpoints, *checkpoints)]
    if not checkpoints:
        raise click.UsageError("give at least one head checkpoint: -c/--checkpoint DIR")
    feature_files = [Path(p) for p in feature_files]
    if ensemble and len(checkpoints) < 2:
        raise click.ClickException("--ensemble needs at least two checkpoints")
    if split_file is not None and not split_file.is_file():
        raise click.ClickException(f"split file {split_file} does not exist")
    require_writable(out)  # a read-only output folder is one line, before any work
    try:
        check_output(out, [*feature_files, *checkpoints])   # never over a feature file or a head
    except OutputConflict as err:
        raise click.ClickException(str(err)) from err

    from pipeline.evaluation.evaluate import FeatureInputs, ensemble_evaluation, evaluate_checkpoint, is_in_domain
    from pipeline.evaluation.tables import comparison_markdown, terminal_table
    from pipeline.heads.model import HeadMismatch
    from pipeline.heads.regroup import RegroupError, inputs_in_bins

    all_inputs = []
    for features in feature_files:
        try:
            all_inputs.append(FeatureInputs(features))
        except (OSError, ValueError, KeyError) as err:
            raise click.ClickException(str(err)) from err

    # Load and check every checkpoint against every feature file before writing anything. A head trained on
    # other age groups (train-head --bins) sees the file's ages regrouped into its own groups.
    loaded = [_load(path) for path in checkpoints]
    views = {}
    for f, inputs in enumerate(all_inputs):
        for h, (path, checkpoint) in enumerate(zip(checkpoints, loaded)):
            try:
                views[f, h] = inputs_in_bins(inputs, checkpoint.meta["group_edges"])
                checkpoint.check_compatible(views[f, h].settings)
            except RegroupError as err:
                raise click.ClickException(f"checkpoint {path}: {err}") from err
            except HeadMismatch as err:
                raise click.ClickException(f"checkpoint {path} does not fit feature file {inputs.path}:\n{err}") from err
    regrouped = [loaded[h] for (f, h), view in views.items() if view is not all_inputs[f]]
    for groups in dict.fromkeys(tuple(checkpoint.meta["class_names"]) for checkpoint in regrouped):
        click.echo(f"note: heads with age groups {', '.join(groups)} are scored against the file's ages regrouped "
                   f"into those groups", err=True)

    head_names = unique_names(checkpoints)
    ensemble_name = None
    if ensemble:
        taken = set(head_names)
        ensemble_name = next(n for n in ("ensemble", *(f"ensemble_{i}" for i in range(2, len(taken) + 3)))
                             if n not in taken)
    # One feature file: OUT/<head>/ as always; several: OUT/<head>@<file>/, rows of one head side by side.
    file_names = unique_names(feature_files) if len(feature_files) > 1 else [None]
    by_file = []
    for f, (inputs, file_name) in enumerate(zip(all_inputs, file_names)):
        found = []
        for h, (name, path, checkpoint) in enumerate(zip(head_names, checkpoints, loaded)):
            view = views[f, h]
            used_split = split if cross_split is None or is_in_domain(checkpoint.meta, view) else cross_split
            label = name if file_name is None else f"{name}@{file_name}"
            try:
                found.append(evaluate_checkpoint(checkpoint, label, path, view, used_split, split_file, tta))
            except ValueError as err:
                raise click.ClickException(f"{path} on {inputs.path}: {err}") from err
        if ensemble:
            label = ensemble_name if file_name is None else f"{ensemble_name}@{file_name}"
            try:
                found.append(ensemble_evaluation(found, label))
            except ValueError as err:
                raise click.ClickException(f"cannot ensemble these checkpoints on {inputs.path}: {err}") from err
        by_file.append(found)
    evaluations = [by_file[f][h] for h in range(len(by_file[0])) for f in range(len(by_file))]

    out.mkdir(parents=True, exist_ok=True)
    everything = {
        "features": str(feature_files[0]) if len(feature_files) == 1 else [str(f) for f in feature_files],
        "feature_fingerprint": all_inputs[0].settings.get("fingerprint"),
        "feature_files": [{"path": str(i.path), "fingerprint": i.settings.get("fingerprint"), "dataset": i.dataset,
                           "rows": int(len(i.meta["path"]))} for i in all_inputs],
        "split": split,
        "cross_split": cross_split,
        "split_file": None if split_file is None else str(split_file),
        "tta": tta,
        "ensemble": ensemble,
        "definitions": definitions(),
        "checkpoints": {},
    }
    for ev in evaluations:
        everything["checkpoints"][ev.name] = _write_evaluation(ev, out / ev.name, tta)
        for warning in ev.warnings:
            click.echo(f"warning: {ev.name}: {warning}", err=True)

    source = f"split {split!r} of " + (f"split file `{split_file}`" if split_file else "the feature file")
    if cross_split is not None:
        source += f" (cross-domain files: split {cross_split!r})"
    files = str(feature_files[0]) if len(feature_files) == 1 else [str(f) for f in feature_files]
    write_bytes_atomically(out / "comparison.md", comparison_markdown(evaluations, files, source).encode())
    _dump(everything, out / "metrics.json")

    click.echo(terminal_table(evaluations))
    click.echo(f"\nwrote {out / 'comparison.md'}, {out / 'metrics.json'} and per-checkpoint folders in {out}/")
    skipped = list(dict.fromkeys((row, reason) for ev in evaluations for row, reason in ev.skipped))
    for row, reason in skipped:
        click.echo(f"skipped {row}: {reason}", err=True)
    finish(len(skipped))  # exit 3: some rows of the split were not scored (listed above)
