"""`explain --report`: face focus and deletion faithfulness per backbone over a split.

For each chosen image, each checkpoint's full model is rebuilt and its map is
computed for the predicted group; its logits are checked against the head on
the image's cached features (within float16 rounding), and face focus and the
deletion / random-order curves are measured on the 224 x 224 model input.
Results go to OUT/report.md, OUT/report.json and OUT/deletion_curves.png.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from pipeline.device import resolve_device
from pipeline.explain.attribution import (
    FACE_REGION,
    FaceRegion,
    curve_auc,
    deletion_curves,
    deletion_order,
    face_focus,
    fractions,
    random_map,
    summarize,
)
from pipeline.explain.cam import CamError, cache_agreement, explain_batch
from pipeline.explain.job import (
    checkpoint_labels,
    columns_for,
    load_models,
    read_pictures,
    to_model_input,
)
from pipeline.features.read import read_meta, read_settings
from pipeline.files import check_output, file_sha256, write_bytes_atomically
from pipeline.heads.checkpoint import load_checkpoint
from pipeline.heads.data import load_features
from pipeline.heads.regroup import in_bins


@dataclass
class ReportConfig:
    checkpoints: list[Path]
    features: Path
    data_dir: Path
    out_dir: Path
    split: str = "test"
    limit: int | None = None
    seed: int = 0
    method: str = "gradcam"
    steps: int = 10
    batch_size: int = 16
    device: str = "auto"
    weights: dict[str, str] = field(default_factory=dict)
    region: FaceRegion = FACE_REGION
    random_grid: tuple[int, int] = (7, 7)  # the target layers' grid at 224 (stride 32)


def choose_rows(splits: np.ndarray, split: str, limit: int | None, seed: int) -> np.ndarray:
    """Row indices of `split`, or a seeded sorted subsample of `limit` of them."""
    rows = np.flatnonzero(np.asarray(splits, dtype=object) == split)
    if len(rows) == 0:
        present = sorted(set(np.asarray(splits, dtype=object).tolist()))
        raise CamError(f"no rows in split {split!r}; the feature file has {', '.join(map(str, present))}")
    if limit is not None and limit < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


def _probabilities(model) -> Callable[[torch.Tensor], torch.Tensor]:
    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return torch.softmax(model(batch.contiguous(memory_format=torch.channels_last)).float(), dim=1)
    return predict


def matching_pictures(paths: list[Path], digests) -> tuple[list[int], list[tuple[str, str]]]:
    """(positions whose bytes are the ones featurized, (path, reason) for the others): a data folder holding
    other pictures under the same names must not be reported on as if it were the cached one."""
    kept, bad = [], []
    for position, (path, digest) in enumerate(zip(paths, digests)):
        try:
            found = file_sha256(path)
        except OSError as err:
            bad.append((str(path), f"cannot read image: {err.strerror or err}"))
            continue
        if found != str(digest):
            bad.append((str(path), f"not the picture that was featurized (sha256 {found[:12]}..., the feature "
                                   f"file recorded {str(digest)[:12]}...)"))
        else:
            kept.append(position)
    return kept, bad


def run_report(config: ReportConfig, log: Callable[[str], None] = print,
               warn: Callable[[str], None] = print) -> dict:
    started = time.time()
    check_output(config.out_dir, [config.features, *config.checkpoints])  # OutputConflict: not over an input
    device = resolve_device(config.device)
    settings = read_settings(config.features)
    meta = read_meta(config.features)
    # Heads trained on other age groups (train-head --bins) are scored against the file's ages regrouped.
    edges = load_checkpoint(config.checkpoints[0]).meta["group_edges"]
    settings, meta = in_bins(config.features, settings, meta, edges)
    rows = choose_rows(meta["split"], config.split, config.limit, config.seed)
    models, ckpts, _ = load_models(config.checkpoints, config.weights, device, settings=settings)
    labels = checkpoint_labels([c.meta for c in ckpts], list(config.checkpoints))
    columns = columns_for(labels, [c.meta for c in ckpts])
    class_names = list(ckpts[0].meta.get("class_names") or [])
    # Plain-view cached features of the chosen rows, per checkpoint.
    cached = [load_features(config.features, c.meta["backbones"], c.meta["feature_kind"])[rows, 0] for c in ckpts]
    paths = [Path(config.data_dir) / str(p) for p in meta["path"][rows]]
    digests = np.asarray(meta["sha256"])[rows]
    truth = np.asarray(meta["group"])[rows]
    log(f"report over {len(rows)} {config.split} image(s) of {config.features} "
        f"({', '.join(labels)}, {config.method}, {config.steps} deletion steps) on {device}")

    per_model = {m: {"predicted": [], "prob": [], "check": []} for m in range(len(models))}
    per_column = {c.label: {"focus": [], "map_curve": [], "random_curve": []} for c in columns}
    done_rows, failures = [], []
    emptied = [None] * len(models)
    for start in range(0, len(rows), config.batch_size):
        batch = list(range(start, min(start + config.batch_size, len(rows))))
        same, other = matching_pictures([paths[i] for i in batch], digests[batch])
        batch = [batch[k] for k in same]
        kept, pictures, bad = read_pictures([paths[i] for i in batch])
        for path, reason in other + bad:
            warn(f"error: {path}: {reason}")
        failures += other + bad
        if not kept:
            continue
        local = [batch[k] for k in kept]
        x = to_model_input(pictures, device)
        size = tuple(x.shape[-2:])
        mask = config.region.mask(*size)
        randoms = []
        for i in local:
            rng = np.random.default_rng([config.seed, int(rows[i])])
            randoms.append(deletion_order(random_map(config.random_grid, *size, rng), rng))
        for m, model in enumerate(models):
            result = explain_batch(model, x, None, config.method)
            check = cache_agreement(model.head, result.scores, cached[m][local])
            predict = _probabilities(model)
            if emptied[m] is None:
                emptied[m] = predict(torch.zeros_like(x[:1]))[0].cpu().numpy()
            target = result.predicted
            intact = result.probs[np.arange(len(local)), target]
            random_curves = deletion_curves(predict, x, randoms, target, config.steps, intact,
                                            emptied[m][target], config.batch_size)
            per_model[m]["predicted"].append(target)
            per_model[m]["prob"].append(intact)
            per_model[m]["check"].append(check)
            for column in (c for c in columns if c.model_index == m):
                cams = result.cams[column.backbone]
                orders = [deletion_order(cams[k], np.random.default_rng([config.seed, int(rows[i]), 1]))
                          for k, i in enumerate(local)]
                map_curves = deletion_curves(predict, x, orders, target, config.steps, intact,
                                             emptied[m][target], config.batch_size)
                store = per_column[column.label]
                store["focus"].append(face_focus(cams, mask))
                store["map_curve"].append(map_curves)
                store["random_curve"].append(random_curves)
        done_rows += local
        log(f"  {min(start + config.batch_size, len(rows))}/{len(rows)} ({time.time() - started:.0f} s)")
    if not done_rows:
        raise CamError(f"none of the {len(rows)} image(s) of the split could be read as featurized in "
                       f"{config.features} (e.g. {failures[0][0]}: {failures[0][1]}); check --data "
                       f"(meta/path is relative to it)" if failures else "no image of the split could be read")

    done_rows = np.asarray(done_rows)
    true_group = truth[done_rows]
    report = {
        "features": str(config.features), "data_dir": str(config.data_dir), "split": config.split,
        "rows_in_split": int((np.asarray(meta["split"], dtype=object) == config.split).sum()),
        "limit": config.limit, "seed": config.seed, "images": int(len(done_rows)), "failures": failures,
        "method": config.method, "steps": config.steps, "random_grid": list(config.random_grid),
        "fill": "ImageNet mean colour (0 after normalization)",
        "face_region": {"cx": config.region.cx, "cy": config.region.cy, "rx": config.region.rx,
                        "ry": config.region.ry, "area_share": config.region.area,
                        "description": config.region.describe()},
        "class_names": class_names, "models": [], "columns": [], "records": [],
        "machine": {"device": str(device), "torch": torch.__version__, "platform": platform.platform()},
        "seconds": None,
    }
    _add_model_summaries(report, config, ckpts, labels, columns, per_model, per_column, meta, rows, done_rows,
                         true_group, warn)
    report["seconds"] = round(time.time() - started, 1)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Each file replaced whole (written under a temporary name, then renamed); the index-like report.md last.
    curves_figure(report, out / "deletion_curves.png")
    write_bytes_atomically(out / "report.json", json.dumps(report, indent=1).encode())
    write_bytes_atomically(out / "report.md", report_markdown(report).encode())
    return report


def _add_model_summaries(report, config, ckpts, labels, columns, per_model, per_column, meta, rows, done_rows,
                         true_group, warn) -> None:
    """Per model: accuracy and the cache check; per column (model x backbone): its summary, curves and records."""
    for m, ckpt in enumerate(ckpts):
        predicted = np.concatenate(per_model[m]["predicted"])
        checks = {k: np.concatenate([c[k] for c in per_model[m]["check"]]) for k in per_model[m]["check"][0]}
        correct = predicted == true_group
        agreement = {
            "images_within_tolerance": int(checks["ok"].sum()), "images": int(len(predicted)),
            "max_abs_logit_diff": float(checks["max_abs_diff"].max()),
            "max_diff_over_tolerance": float(checks["ratio"].max()),
            "median_tolerance": float(np.median(checks["tolerance"])),
            "same_prediction_as_cache": int((checks["cached_predicted"] == predicted).sum()),
        }
        if agreement["images_within_tolerance"] < agreement["images"]:
            warn(f"warning: {labels[m]}: on {agreement['images'] - agreement['images_within_tolerance']} image(s) "
                 f"the rebuilt model's logits differ from the head on cached features by more than float16 "
                 f"rounding (max {agreement['max_abs_logit_diff']:.4g}, {agreement['max_diff_over_tolerance']:.3g}x "
                 f"the bound). Was the cache made on a GPU (float16 autocast) or with other weights?")
        report["models"].append({"label": labels[m], "checkpoint": str(config.checkpoints[m]),
                                 "backbones": ckpt.meta["backbones"], "feature_kind": ckpt.meta["feature_kind"],
                                 "accuracy": float(correct.mean()), "cache_check": agreement})
        for column in (c for c in columns if c.model_index == m):
            store = per_column[column.label]
            focus = np.concatenate(store["focus"])
            map_curves = np.concatenate(store["map_curve"])
            random_curves = np.concatenate(store["random_curve"])
            auc_map, auc_random = curve_auc(map_curves), curve_auc(random_curves)
            report["columns"].append({
                "label": column.label, "backbone": column.backbone, "model": labels[m],
                "summary": summarize(focus, auc_map, auc_random, correct),
                "mean_map_curve": map_curves.mean(axis=0).tolist(),
                "mean_random_curve": random_curves.mean(axis=0).tolist(),
            })
            for k, row in enumerate(done_rows):
                report["records"].append({
                    "path": str(meta["path"][rows[row]]), "column": column.label, "true": int(true_group[k]),
                    "predicted": int(predicted[k]), "probability": float(map_curves[k, 0]),
                    "correct": bool(correct[k]), "face_focus": None if not np.isfinite(focus[k]) else float(focus[k]),
                    "deletion_auc": float(auc_map[k]), "random_auc": float(auc_random[k]),
                    "logit_diff_vs_cache": float(checks["max_abs_diff"][k]),
                })


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report_markdown(report: dict) -> str:
    lines = [
        "# Where does each backbone look?",
        "",
        f"{report['images']} image(s) of split `{report['split']}` (of {report['rows_in_split']}"
        + (f"; seeded subsample, seed {report['seed']}" if report["limit"] and report["limit"] < report["rows_in_split"]
           else "") + f") from `{report['features']}`; maps: {report['method']} for the predicted group.",
        "",
        f"- **Face focus**: share of map mass inside the face region, a fixed {report['face_region']['description']}. "
        f"A map spread evenly scores {report['face_region']['area_share']:.3f}.",
        f"- **Deletion**: pixels set to the {report['fill']}, most-attended first, in {report['steps']} steps; "
        "AUC of the predicted group's probability over the fraction removed (lower = the map found what matters). "
        f"**Random**: the same for a random {report['random_grid'][0]}x{report['random_grid'][1]} map upsampled "
        "like a Grad-CAM map (blobs in random places). **Gap** = random AUC − map AUC (> 0: better than random).",
        "",
    ] + ([f"- Maps from pytorch-grad-cam ({report['method']}) are min-max normalized per image (a constant offset is "
          "removed, which changes face focus).", ""] if report["method"] != "gradcam" else []) + [
        "| model | subset | n | face focus (mean ± sem) | median | deletion AUC | random AUC | gap (± sem) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for column in report["columns"]:
        for subset, s in column["summary"].items():
            focus = f"{_fmt(s['face_focus_mean'])} ± {_fmt(s['face_focus_sem'])}" if s["n"] else "–"
            lines.append(f"| {column['label']} | {subset} | {s['n']} | {focus} | {_fmt(s['face_focus_median'])} | "
                         f"{_fmt(s['deletion_auc'])} | {_fmt(s['random_auc'])} | "
                         f"{_fmt(s['auc_gap'])} ± {_fmt(s['auc_gap_sem'])} |")
    lines += ["", "| model | accuracy on these images | rebuilt model vs cached features |", "|---|---:|---|"]
    for model in report["models"]:
        c = model["cache_check"]
        lines.append(f"| {model['label']} | {model['accuracy']:.3f} | {c['images_within_tolerance']}/{c['images']} "
                     f"within float16 rounding; max abs logit diff {c['max_abs_logit_diff']:.2g} "
                     f"({c['max_diff_over_tolerance']:.2g}x the bound); same prediction on "
                     f"{c['same_prediction_as_cache']}/{c['images']} |")
    if report["failures"]:
        lines += ["", f"{len(report['failures'])} image(s) could not be read: "
                  + ", ".join(p for p, _ in report["failures"][:10]) + (" ..." if len(report["failures"]) > 10 else "")]
    lines += ["", f"Machine: {report['machine']['device']}, torch {report['machine']['torch']}; "
              f"{report['seconds']} s.", ""]
    return "\n".join(lines)


def curves_figure(report: dict, path: Path) -> Path:
    from matplotlib.figure import Figure

    from pipeline.evaluation.figures import save_figure

    x = fractions(report["steps"])
    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for i, column in enumerate(report["columns"]):
        colour = f"C{i}"
        ax.plot(x, column["mean_map_curve"], color=colour, label=f"{column['label']} (map order)")
        ax.plot(x, column["mean_random_curve"], color=colour, linestyle="--", label=f"{column['label']} (random map)")
    ax.set_xlabel("fraction of pixels removed")
    ax.set_ylabel("probability of the predicted group")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"Deletion curves ({report['method']}, {report['images']} images)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
