"""`train_head`: train the paper's head (or a sweep of recipes) on cached features.

    train-head FEATURES.h5 --backbones NAME[,NAME...] -o OUT/ [--bins 18,30,45,60,116] [recipe options]

List-valued options (--lr 1e-3,3e-4 --dropout 0.3,0.5 --seed 0,1,2 ...) train
every combination, stacked into one batched computation where shapes allow.
Writes OUT/head.safetensors + OUT/head.json (the head with the best validation
accuracy) and OUT/results.csv (every configuration, best first); with
--save-all also OUT/runs/NNN/ for every configuration.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from click.core import ParameterSource

from pipeline.cli.exit_codes import finish, output_error, require_writable
from pipeline.cli.options import CALIBRATION_METHODS, AliasedCommand, out_option
from pipeline.files import OutputConflict, check_output
from pipeline.heads.recipes import (
    DEFAULT_RECIPE,
    RECIPES,
    help_text,
    missing_descriptor_message,
    recipe_options,
)


def _split_list(text: str, convert, name: str) -> list:
    try:
        values = [convert(t.strip()) for t in str(text).split(",") if t.strip()]
    except ValueError as err:
        raise click.BadParameter(f"{text!r}: {err}", param_hint=name) from None
    if not values:
        raise click.BadParameter("needs at least one value", param_hint=name)
    return list(dict.fromkeys(values))  # repeated values would train the same head twice


def _on_off(token: str) -> bool:
    lowered = token.lower()
    if lowered in ("on", "yes", "true", "1"):
        return True
    if lowered in ("off", "no", "false", "0"):
        return False
    raise ValueError(f"{token!r} is not on/off")


def _choice(options):
    def convert(token):
        if token not in options:
            raise ValueError(f"{token!r} is not one of {', '.join(options)}")
        return token
    return convert


def _hidden(texts: tuple[str, ...]) -> list[tuple[int, ...]]:
    sizes = []
    for text in texts or ("512,256",):
        try:
            shape = tuple(int(t) for t in text.replace("x", ",").split(",") if t.strip())
        except ValueError:
            raise click.BadParameter(f"{text!r} is not comma-separated layer widths", param_hint="--hidden") from None
        if not shape or min(shape) < 1:
            raise click.BadParameter(f"{text!r} needs positive widths", param_hint="--hidden")
        sizes.append(shape)
    return list(dict.fromkeys(sizes))


def _with_recipe(ctx: click.Context, recipe: str) -> tuple[dict, list[str]]:
    """Every option's value after the recipe: the recipe's value wherever the user left the option at its default.

    Returns (values by parameter name, the recipe's flags the command line overrode).
    """
    values, overridden = dict(ctx.params), []
    for flag, value in recipe_options(recipe).items():
        param = next(p for p in ctx.command.params if flag in p.opts)
        if ctx.get_parameter_source(param.name) in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            values[param.name] = value
        else:
            overridden.append(flag)
    return values, overridden


def _format_table(rows: list[dict], columns: list[str], limit: int | None = None) -> str:
    shown = rows[:limit] if limit else rows
    cells = [[_fmt(r.get(c)) for c in columns] for r in shown]
    widths = [max(len(c), *(len(row[i]) for row in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    if limit and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in results.csv")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _describe_run(features_file, names, feature_kind, loaded, split_file, started, device, workers, intra,
                  recipe, overridden, n_configs) -> None:
    import torch

    from pipeline.constants import group_names

    data = loaded.data
    counts = ", ".join(f"{k} {v}" for k, v in loaded.counts.items())
    click.echo(f"{features_file}: {'+'.join(names)} {feature_kind} features, D={data.dim}; rows: {counts} "
               f"(split from {split_file or 'the feature file'}); loaded in {time.perf_counter() - started:.1f} s")
    stored = [int(e) for e in loaded.settings["group_edges"]]
    if list(loaded.group_edges) != stored:
        click.echo(f"age groups {', '.join(group_names(loaded.group_edges))}: regrouped from the stored ages "
                   f"(the file's groups are {', '.join(group_names(stored))})")
    on = device if device != "cpu" else (f"cpu, {workers} worker threads" if workers > 1
                                         else f"cpu, {intra or torch.get_num_threads()} thread(s)")
    if recipe != DEFAULT_RECIPE or overridden:
        kept = f"; the command line overrides {', '.join(overridden)}" if overridden else ""
        click.echo(f"recipe {recipe}: {' '.join(f'{k} {v}' for k, v in recipe_options(recipe).items())}{kept}")
    click.echo(f"training {n_configs} configuration(s) on {on}")


def _describe_calibration(c: dict, n_val: int) -> None:
    click.echo(f"temperature scaling (best head): T = {c['temperature']:.4g}, fitted on the validation split "
               f"({n_val} rows): ECE {100 * c['val_ece_before']:.2f}% -> "
               f"{100 * c['val_ece_after']:.2f}%, NLL {c['val_nll_before']:.4f} -> {c['val_nll_after']:.4f} "
               f"(accuracy unchanged)")


def _grid(values: dict, hidden: str) -> dict:
    """{option: [values]}: each recipe option's comma-separated list, parsed (a usage error names the option)."""
    from pipeline.heads.model import TARGETS

    v = values
    return dict(
        lr=_split_list(v["lr"], float, "--lr"),
        epochs=_split_list(v["epochs"], int, "--epochs"),
        batch_size=_split_list(v["batch_size"], int, "--batch-size"),
        dropout=_split_list(v["dropout"], float, "--dropout"),
        hidden=_hidden(hidden),
        weight_decay=_split_list(v["weight_decay"], float, "--weight-decay"),
        schedule=_split_list(v["schedule"], _choice(("constant", "cosine")), "--schedule"),
        label_smoothing=_split_list(v["label_smoothing"], float, "--label-smoothing"),
        class_weights=_split_list(v["class_weights"], _on_off, "--class-weights"),
        standardize=_split_list(v["standardize"], _on_off, "--standardize"),
        flip=_split_list(v["flip"], _on_off, "--flip"),
        seed=_split_list(v["seed"], int, "--seed"),
        target=_split_list(v["target"], _choice(TARGETS), "--target"),
        soft_sigma=_split_list(v["soft_sigma"], float, "--soft-sigma"),
        pca=_split_list(v["pca"], int, "--pca"),
    )


def _load(features_file, names, feature_kind, split_file, recipe, edges):
    """The training set (heads.data.TrainingSet), regrouped into `edges` when given; problems are one line."""
    from pipeline.features.read import read_meta, read_settings
    from pipeline.heads.data import load_training_data
    from pipeline.heads.regroup import RegroupError, regroup_training_set, require_ages

    try:
        # A descriptor the file lacks is one line that says how to make it, before any feature is read.
        settings = read_settings(features_file)
        missing = missing_descriptor_message(features_file, feature_kind, settings.get("descriptors"), names, recipe)
        if missing:
            raise click.ClickException(missing)
        stored = [int(e) for e in settings["group_edges"]]
        if edges is not None and edges != stored:  # group-only rows cannot be regrouped: say so before reading
            require_ages(features_file, read_meta(features_file)["age"], edges, "--bins")
        loaded = load_training_data(features_file, names, feature_kind, split_file)
        return loaded if edges is None else regroup_training_set(loaded, edges)
    except (FileNotFoundError, ValueError, RegroupError) as err:
        raise click.ClickException(str(err)) from err


# One release of grace for the old spelling of --feature-kind.
@click.command(cls=AliasedCommand, aliases={"--features": "--feature-kind"},
               context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("features_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--backbones", required=True,
              help="Backbone(s) whose features feed the head, comma-separated; several are concatenated (fusion).")
@out_option("folder", required=True,
            help="Output FOLDER: head.safetensors + head.json (best head), results.csv.")
@click.option("--bins",
              help="Age groups as inclusive upper ages, e.g. 18,30,45,60,116: the groups are recomputed from the "
                   "stored ages (the split stays the file's). Default: the file's own groups. Needs every row's "
                   "age (refused on files labelled with groups only).")
@click.option("--recipe", type=click.Choice(list(RECIPES)), default=DEFAULT_RECIPE, show_default=True,
              help="A named set of option values; options given on the command line override it. "
                   + help_text() + ".")
@click.option("--feature-kind", "feature_kind", default="last", show_default=True,
              help="What each backbone contributes: last (final pooled features, the paper's), stages (earlier "
                   "stages pooled), both, or descriptors stored by featurize --descriptors (gem, grid, "
                   "stage_grid); join several with '+', e.g. both+grid.")
@click.option("--split-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="CSV with columns file,split overriding the feature file's split (unlisted rows are unused).")
@click.option("--target", default="group", show_default=True,
              help="group: the paper's 4-way classifier. age: regress years; groups derived, MAE reported. "
                   "soft: cross-entropy against soft labels from the age (a Gaussian over years summed into "
                   "groups). ordinal: CORAL cumulative logits. Comma-separated to compare them.")
@click.option("--soft-sigma", default="3", show_default=True,
              help="Width in years of the Gaussian behind --target soft.")
@click.option("--lr", default="1e-3", show_default=True, help="Adam learning rate(s).")
@click.option("--epochs", default="10", show_default=True, help="Epochs; the best validation epoch is kept.")
@click.option("--batch-size", default="32", show_default=True)
@click.option("--dropout", default="0.3", show_default=True)
@click.option("--hidden", multiple=True,
              help="Hidden widths, e.g. 512,256 (default, the paper's). Repeat the option to sweep.")
@click.option("--weight-decay", default="0", show_default=True, help="Decoupled weight decay (AdamW) when > 0.")
@click.option("--schedule", default="constant", show_default=True, help="constant and/or cosine (per step, to 0).")
@click.option("--label-smoothing", default="0", show_default=True)
@click.option("--class-weights", default="off", show_default=True,
              help="on: weight the loss by n / (C * count) of each group in the training split.")
@click.option("--standardize", default="off", show_default=True,
              help="on: z-score features with training-split statistics (kept inside the head).")
@click.option("--flip", default="on", show_default=True,
              help="on: each epoch, each image uses its plain or mirrored feature with p=0.5.")
@click.option("--seed", default="0", show_default=True)
@click.option("--pca", default="0", show_default=True,
              help="N > 0: every feature block wider than N (a backbone's last layer, its stages, a descriptor) "
                   "enters as its top N principal components, fitted on the standardized training rows once, "
                   "cached in FEATURES_FILE.pca/ and kept inside the head; 0: every feature as it is.")
@click.option("--calibrate", type=click.Choice(list(CALIBRATION_METHODS)), default="off", show_default=True,
              help="temperature: after training, fit one temperature T on the validation split (minimum NLL) and "
                   "divide the head's group scores by it. Accuracy is unchanged; probabilities and ECE move.")
@click.option("--keep", type=click.Choice(["best", "last"]), default="best", show_default=True,
              help="Which epoch's weights to keep: best validation accuracy (the paper's) or the last.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-stack", type=click.IntRange(1), default=None,
              help="Heads trained together in one stacked computation (memory grows with it). "
                   "Default: 2 on a CPU, 16 on a GPU.")
@click.option("--threads", default="auto", show_default=True,
              help="CPU threads: a number, or auto (whichever of 1 and torch's default is faster right now).")
@click.option("--save-all", is_flag=True, help="Also save every configuration's head under OUT/runs/NNN/.")
@click.option("--quiet", is_flag=True, help="Print only the results table.")
def main(features_file, backbones, out, bins, recipe, feature_kind, split_file, target, soft_sigma, lr, epochs,
         batch_size, dropout, hidden, weight_decay, schedule, label_smoothing, class_weights, standardize, flip, seed,
         pca, calibrate, keep, device, max_stack, threads, save_all, quiet):
    """Train age-group heads on FEATURES_FILE (made by featurize), from the cached features.

    Defaults are the paper's recipe (--recipe paper: a 512-256 head, 10 epochs,
    under a minute on a 2-core CPU for all of UTKFace); --recipe strong or best
    changes the defaults (strong: 40 epochs; best: much wider inputs, reduced
    by a cached PCA, about twice the paper head's time). Comma-separated values in the recipe options
    (--lr 1e-3,3e-4 --dropout 0.3,0.5 --seed 0,1,2 ...) train every combination.
    """

    from pipeline.backbones.descriptors import kind_outputs
    from pipeline.backbones.registry import parse_backbones
    from pipeline.device import resolve_device
    from pipeline.heads.data import HeadData
    from pipeline.heads.sweep import grid_configs, ranked, results_rows, save_sweep
    from pipeline.heads.targets import AGE_TARGETS, missing_ages_message
    from pipeline.heads.training import thread_plan, train_heads
    from pipeline.ingest.dataset import parse_edges

    # The recipe fills in every option the command line left at its default.
    values, overridden = _with_recipe(click.get_current_context(), recipe)
    feature_kind, calibrate = values["feature_kind"], values["calibrate"]
    if threads != "auto" and (not threads.isdigit() or int(threads) < 1):
        raise click.BadParameter(f"{threads!r} is not a positive number or auto", param_hint="--threads")
    try:
        device = resolve_device(device).type
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    try:
        names = list(parse_backbones(backbones))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--backbones") from None
    try:
        edges = None if bins is None else list(parse_edges(bins))
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--bins") from None

    grid = _grid(values, hidden)
    try:
        kind_outputs(feature_kind)
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint="--feature-kind") from None
    try:
        configs = grid_configs(grid)
    except ValueError as err:
        raise click.UsageError(str(err)) from None

    require_writable(out)
    try:
        check_output(out, [features_file], own_kind="a head checkpoint")   # never over a feature file
    except OutputConflict as err:
        raise click.ClickException(str(err)) from err
    started = time.perf_counter()
    loaded = _load(features_file, names, feature_kind, split_file, recipe, edges)
    for path, reason in loaded.skipped:
        click.echo(f"skipped {path}: {reason}", err=True)
    data: HeadData = loaded.data.to(device)
    for target_name in dict.fromkeys(grid["target"]):  # group-only labels (age -1) cannot train age targets
        if target_name in AGE_TARGETS and bool((data.train_age < 0).any() or (data.val_age < 0).any()):
            raise click.ClickException(missing_ages_message(target_name))
    workers, intra = thread_plan(data, configs, threads if threads == "auto" else int(threads))
    if not quiet:
        _describe_run(features_file, names, feature_kind, loaded, split_file, started, device, workers,
                      intra, recipe, overridden, len(configs))

    started = time.perf_counter()
    results = train_heads(data, configs, max_stack=max_stack, keep=keep,
                          threads=workers if workers > 1 else intra, calibrate=calibrate)
    elapsed = time.perf_counter() - started
    if not quiet:
        for source in sorted({r.reduction["source"] for r in results if r.reduction}):
            click.echo(f"principal components (--pca): {source}")
    diverged = [i for i, r in enumerate(results) if r.diverged]
    for i in diverged:
        cfg = results[i].config
        click.echo(f"configuration {i} (lr={cfg.lr:g}, weight decay={cfg.weight_decay:g}, seed={cfg.seed}) "
                   f"{results[i].diverged}; left out", err=True)
    if len(diverged) == len(results):
        raise click.ClickException("training diverged in every configuration; no head was saved")

    order = ranked(results)
    best = results[order[0]]
    rows, columns = results_rows(results, order)
    try:
        best_meta = save_sweep(out, loaded, results, order, split_file, recipe, save_all)
    except OSError as err:
        raise output_error(out, err) from err

    varying = [k for k, values in grid.items() if len(values) > 1]
    shown = ["rank", *varying, "best_epoch", "train_acc", "val_acc", "val_loss"]
    shown += [c for c in ("val_mae",) if c in columns]
    if not quiet and len(configs) == 1:
        click.echo(_format_table(best.history, list(best.history[0])))
        click.echo(f"kept epoch {best.best_epoch} (best validation accuracy)")
    click.echo(_format_table(rows, shown, limit=None if len(rows) <= 40 else 40))
    if not quiet and best.calibration != "off":
        _describe_calibration(best_meta["calibration"], len(data.val_group))
    if not quiet:
        rate = len(configs) / elapsed if elapsed > 0 else float("inf")
        click.echo(f"trained {len(configs)} head(s) in {elapsed:.1f} s ({rate:.2f}/s); "
                   f"best head -> {out}/head.safetensors + head.json; table -> {out}/results.csv")
    finish(len(loaded.skipped) + len(diverged))  # exit 3: rows or configurations were left out (listed above)


if __name__ == "__main__":
    main()
