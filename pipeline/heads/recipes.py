"""Named train-head recipes (`train-head --recipe NAME`): one table of option values, and the checks a recipe needs.

A recipe only changes option defaults: any option given on the command line keeps the user's value. Values
are written as on the command line, so a recipe reads like the options it stands for and goes through the
same parsing.
  paper   the paper's head and training, train-head's plain defaults (nothing set).
  strong  40 epochs, AdamW weight decay 1e-4, cosine schedule, label smoothing 0.1, standardized features,
          dropout 0.5: the README's "stronger head".
  best    strong, fed the last block, the earlier stages and the grid of the last earlier stage (featurize
          --descriptors stage_grid), trained on soft targets from the age; chosen on validation by the
          descriptor study (docs/results.md). Every block wider than 1024 enters as its top 1024 principal
          components (--pca 1024, fitted once and cached beside the feature file), for 15 epochs of batches
          of 128 at lr 2e-3: about 6x (one backbone) to 9x (three) fewer FLOPs than 40 epochs of batches
          of 32 on the whole width, with the same validation accuracy over 3 seeds on one and on three
          backbones (benchmarks/RESULTS.md).
          No temperature scaling: on these soft heads it did not improve validation calibration.
"""

from __future__ import annotations

DEFAULT_RECIPE = "paper"

_STRONG = {"--epochs": "40", "--weight-decay": "1e-4", "--schedule": "cosine", "--label-smoothing": "0.1",
           "--standardize": "on", "--dropout": "0.5"}

RECIPES: dict[str, dict[str, str]] = {
    "paper": {},
    "strong": _STRONG,
    "best": {**_STRONG, "--feature-kind": "both+stage_grid", "--target": "soft", "--label-smoothing": "0",
             "--pca": "1024", "--epochs": "15", "--batch-size": "128", "--lr": "2e-3"},
}


def recipe_options(name: str) -> dict[str, str]:
    """{option flag: value} of a recipe; a ValueError naming the recipes for an unknown name."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def describe(name: str) -> str:
    """A recipe as the options it sets, e.g. '--epochs 40 --weight-decay 1e-4 ...'."""
    options = recipe_options(name)
    return " ".join(f"{flag} {value}" for flag, value in options.items()) or "train-head's defaults"


def help_text() -> str:
    """The --recipe help: every recipe with its values."""
    return "; ".join(f"{name} = {describe(name)}" for name in RECIPES)


def missing_descriptor_message(feature_file, feature_kind: str, available, backbones, recipe: str) -> str | None:
    """One line when the feature file lacks a descriptor the feature kind needs; None when it has them all.

    available: the descriptors the file holds (its settings["descriptors"]).
    """
    from pipeline.backbones.descriptors import kind_descriptors  # imports torch: only when a head is trained

    missing = [d for d in kind_descriptors(feature_kind) if d not in set(available or ())]
    if not missing:
        return None
    it = "it" if len(missing) == 1 else "them"
    source = f"--recipe {recipe} feeds the head --feature-kind {feature_kind}" if recipe != DEFAULT_RECIPE \
        else f"--feature-kind {feature_kind} needs {it}"
    return (f"{feature_file} has no {' or '.join(missing)} descriptor ({source}); make a feature file that has "
            f"{it} with: featurize DATA_DIR -o FEATURES.h5 --backbones {','.join(backbones)} "
            f"--descriptors {','.join(missing)}")
