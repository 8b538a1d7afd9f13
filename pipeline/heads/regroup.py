"""Other age groups from the stored ages: train-head --bins, and evaluate scoring such heads.

A feature file stores each row's age and its group in the bins it was featurized
with. Heads can be trained on other bins without featurizing again: the groups are
recomputed from the ages, and the split stays the stored one. Rows labelled with a
group only (age -1) cannot be regrouped, so such files are refused.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np

from pipeline.ingest.dataset import age_to_group
from pipeline.ingest.labels import AGE_UNKNOWN


class RegroupError(ValueError):
    """Ages needed for other bins are missing."""


def _edges_text(edges) -> str:
    return ",".join(str(int(e)) for e in edges)


def group_only_rows(ages) -> int:
    """How many rows are labelled with a group only (stored age -1)."""
    return int(np.sum(np.asarray(ages) <= AGE_UNKNOWN))


def require_ages(feature_file, ages, edges, what: str) -> None:
    """Raise RegroupError (one line) unless every row has an age to regroup into `edges`."""
    missing = group_only_rows(ages)
    if missing:
        raise RegroupError(f"{feature_file}: {what} {_edges_text(edges)} need every row's age, but "
                           f"{missing} rows are labelled with a group only (stored age -1); use the file's own "
                           f"bins or featurize with the bins you want")


def regroup_training_set(loaded, edges):
    """A copy of a heads.data.TrainingSet whose train/val groups follow `edges` (inclusive upper ages).

    The features, ages, split and rows fingerprint stay as loaded; the checkpoint then
    records the new edges and class names (config.result_meta reads loaded.group_edges).
    """
    import torch

    edges = [int(e) for e in edges]
    if edges == [int(e) for e in loaded.group_edges]:
        return loaded
    data = loaded.data
    ages = torch.cat([data.train_age, data.val_age]).cpu().numpy()
    require_ages(loaded.feature_file, ages, edges, "--bins")
    boundaries = torch.tensor(edges, dtype=data.train_age.dtype, device=data.train_age.device)

    def groups(age):
        return torch.searchsorted(boundaries, age.contiguous(), side="left").to(torch.int64)

    regrouped = replace(data, train_group=groups(data.train_age), val_group=groups(data.val_age),
                        n_classes=len(edges), group_edges=tuple(edges), _standardized=data._standardized)
    return replace(loaded, data=regrouped, group_edges=edges)


def in_bins(feature_file, settings: dict, meta: dict, edges) -> tuple[dict, dict]:
    """A feature file's (settings, meta) as if featurized with `edges`: every row's group recomputed from its
    age, the settings naming the new edges so that a head's bins check passes. The same objects when the
    file already uses those bins; RegroupError when some rows have no age."""
    edges = [int(e) for e in edges]
    if edges == [int(e) for e in settings.get("group_edges", [])]:
        return settings, meta
    require_ages(feature_file, meta["age"], edges, "the head's age groups")
    groups = age_to_group(np.asarray(meta["age"]), edges).astype(np.int64)
    return {**settings, "group_edges": edges}, {**meta, "group": groups}


def inputs_in_bins(inputs, edges):
    """evaluate: a view of an evaluation.evaluate.FeatureInputs whose groups follow `edges` (see in_bins);
    `inputs` itself when the file already uses those bins. The read features are shared."""
    settings, meta = in_bins(inputs.path, inputs.settings, inputs.meta, edges)
    if settings is inputs.settings:
        return inputs
    view = copy.copy(inputs)
    view.settings, view.meta = settings, meta
    return view
