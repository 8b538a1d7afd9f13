"""Small synthetic feature files with a learnable signal, for head/metric/cam tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.constants import DEFAULT_GROUP_EDGES
from pipeline.features.extract import PREPROCESSING
from pipeline.features.writer import write_feature_file
from pipeline.ingest.dataset import age_to_group


def class_signal_arrays(n=240, d=16, signal=1.0, seed=0, views_signal=(True, True), train=0.5, val=0.25):
    """(features [n, 2, d], groups, ages, splits) for head tests: noise plus signal x a direction per group.

    View v carries the direction if views_signal[v]; ages are drawn inside each group; splits are
    train, val, test in row order with the given fractions.
    """
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 4, n)
    directions = rng.normal(size=(4, d))
    features = rng.normal(size=(n, 2, d))
    for v, carries in enumerate(views_signal):
        if carries:
            features[:, v] += signal * directions[groups]
    ages = np.array([rng.integers((0, 26, 51, 76)[g], (25, 50, 75, 116)[g] + 1) for g in groups])
    n_train, n_val = int(train * n), int(val * n)
    splits = np.array(["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val), dtype=object)
    return features.astype(np.float32), groups, ages, splits


WIDTHS = {"mobilenet_v2": (1280, 488), "resnet50": (2048, 1792), "efficientnet_b0": (1280, 512)}


def synthetic_settings(backbones=("mobilenet_v2",), edges=DEFAULT_GROUP_EDGES, weights="none", seed=0) -> dict:
    return {
        "backbones": list(backbones),
        "weights": {name: weights for name in backbones},
        "preprocessing": dict(PREPROCESSING),
        "group_edges": list(edges),
        "seed": seed,
        "split_source": "seeded",
        "dtype": "float16",
        "records": "synthetic",
    }


def make_feature_file(path: Path, n: int = 400, backbones=("mobilenet_v2",), signal: float = 2.0,
                      edges=DEFAULT_GROUP_EDGES, seed: int = 0, widths: dict | None = None,
                      weights: str = "none") -> Path:
    """Features = noise + signal * (class direction); the mirrored view is a small perturbation.

    Splits are 70/15/15 in row order after a seeded shuffle. Ages are drawn per group.
    """
    rng = np.random.default_rng(seed)
    widths = widths or WIDTHS
    ages = rng.integers(0, 117, size=n)
    groups = age_to_group(ages, edges)
    order = rng.permutation(n)
    split = np.empty(n, dtype=object)
    split[order[: int(0.7 * n)]] = "train"
    split[order[int(0.7 * n): int(0.85 * n)]] = "val"
    split[order[int(0.85 * n):]] = "test"
    meta = {
        "path": np.asarray([f"{a}_{i % 2}_{i % 5}_2017{i:013d}.jpg.chip.jpg" for i, a in enumerate(ages)], dtype=object),
        "age": ages, "gender": np.arange(n) % 2, "race": np.arange(n) % 5, "group": groups,
        "split": split, "sha256": np.asarray([f"{i:064x}" for i in range(n)]),
    }
    features, stages = {}, {}
    for name in backbones:
        width, stages_width = widths[name]
        for target, d in ((features, width), (stages, stages_width)):
            directions = rng.normal(size=(len(edges), d))
            plain = rng.normal(size=(n, d)) + signal * directions[groups]
            mirror = plain + 0.1 * rng.normal(size=(n, d))
            target[name] = np.stack([plain, mirror], axis=1).astype(np.float16)
    settings = synthetic_settings(backbones, edges, weights, seed)
    write_feature_file(path, settings, meta, features, stages,
                       skipped=[("bad_name.jpg", "bad name: name is not age_gender_race_datetime")],
                       extra_attrs={"shard": {"index": 0, "count": 1}})
    return Path(path)


def reseal(path: Path) -> Path:
    """After a test edits a feature file in place: its fingerprint and meta digests made to match again, as if
    featurize had written it that way (an edit without this is what the readers refuse)."""
    import json

    import h5py

    from pipeline.features.read import META_DIGEST_ATTR, meta_digests
    from pipeline.features.settings import fingerprint

    with h5py.File(path, "r+") as h5:
        h5.attrs["fingerprint"] = fingerprint(json.loads(h5.attrs["settings"]))
        h5["meta"].attrs[META_DIGEST_ATTR] = json.dumps(meta_digests(h5), sort_keys=True)
    return Path(path)
