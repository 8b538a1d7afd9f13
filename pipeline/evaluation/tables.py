"""Evaluation results as rows, a Markdown comparison and a terminal table."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from pipeline.evaluation.evaluate import Evaluation
from pipeline.files import csv_cell
from pipeline.heads.calibration import N_BINS


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


UTKFACE = "UTKFace names"   # labels.describe_label_source of a file labelled by UTKFace's file names


def paper_accuracy(meta: dict, dataset: str = UTKFACE) -> float | None:
    """The paper's UTKFace test accuracy for a comparable head: one backbone, the default groups, scored on
    UTKFace (a number about UTKFace says nothing about other data)."""
    from pipeline.constants import DEFAULT_GROUP_EDGES, PAPER_TEST_ACCURACY

    if (len(meta["backbones"]) != 1 or list(meta["group_edges"]) != list(DEFAULT_GROUP_EDGES) or "members" in meta
            or dataset != UTKFACE):
        return None
    return PAPER_TEST_ACCURACY.get(meta["backbones"][0])


COLUMNS = ("checkpoint", "backbones", "features", "split", "data", "domain", "n", "accuracy %", "paper accuracy %",
           "balanced acc %", "macro-F1 %", "off-by-one %", "ECE %", "MAE (years)")


def table_rows(evaluations: list[Evaluation]) -> list[list[str]]:
    rows = []
    for ev in evaluations:
        m, s = ev.metrics, ev.meta
        paper = paper_accuracy(s, ev.dataset or UTKFACE)
        rows.append([
            ev.name, "+".join(s["backbones"]), str(s.get("feature_kind")), ev.split + (" +TTA" if ev.tta else ""),
            Path(ev.features).name if ev.features else "—", ev.domain, str(m["n"]), _pct(m["accuracy"]), _pct(paper), _pct(m["balanced_accuracy"]), _pct(m["macro_f1"]),
            _pct(m["off_by_one"]), _pct(m["ece"]), "—" if m["mae"] is None else f"{m['mae']:.2f}",
        ])
    return rows


def comparison_markdown(evaluations: list[Evaluation], feature_file, split_source: str) -> str:
    """The Markdown comparison table across checkpoints, with the paper's Table 1 beside ours.

    feature_file: one path, or several (cross-dataset evaluation: each row names its file in `data`
    and says whether it is the head's own data, in-domain, or another data set, cross-domain).
    """
    files = [feature_file] if isinstance(feature_file, (str, Path)) else list(feature_file)
    datasets = {}
    for ev in evaluations:
        datasets.setdefault(ev.features, ev.dataset)
    lines = ["# Age-group evaluation", ""]
    if len(files) == 1:
        lines.append(f"Features: `{files[0]}`; rows: {split_source}.")
    else:
        lines.append(f"Rows: {split_source}. Feature files (column `data`):")
        lines += [f"- `{f}`: {datasets.get(str(f), '')}" for f in files]
    lines += [
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" if i < 4 else "---:" for i in range(len(COLUMNS))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(evaluations)]
    lines += [
        "",
        "Paper accuracy: UTKFace test accuracy in Table 1 of the study this tool reproduces (frozen backbone, "
        "last-stage features, 4 groups, its own random 70/15/15 split; see the README, \"The paper behind the "
        "tables\"), shown for single-backbone heads on the default groups scored on UTKFace, else —.",
        f"ECE: {N_BINS} equal-width confidence bins. Off-by-one: predicted group is the true one or a neighbour. "
        "Balanced acc: mean per-group recall. +TTA: plain and mirrored views' probabilities averaged.",
        "Domain: in-domain = the head's own training data (same feature file, or the same rows, labels and "
        "splits); cross-domain = another data set.",
        "",
    ]
    for ev in evaluations:
        for warning in ev.warnings:
            lines.append(f"- Warning ({ev.name}): {warning}")
    return "\n".join(lines).rstrip() + "\n"


def terminal_table(evaluations: list[Evaluation]) -> str:
    """A compact fixed-width table for the terminal."""
    cols = ("checkpoint", "split", "data", "n", "acc%", "paper%", "bal%", "F1%", "±1%", "ECE%", "MAE")
    picks = (0, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13)
    rows = [[row[i] for i in picks] for row in table_rows(evaluations)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    fmt = lambda r: "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def predictions_csv(ev: Evaluation) -> bytes:
    """predictions.csv: one row per evaluated image (true and predicted group, the probabilities, and age).

    Every cell goes through csv_cell: a file name starting with =, +, -, @ is not run as a spreadsheet formula.
    """
    names = list(ev.meta["class_names"])
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer)
    header = ["file", "age", "true_group", "predicted_group"] + [f"p_{n}" for n in names]
    if ev.ages_pred is not None:
        header.append("predicted_age")
    writer.writerow([csv_cell(h) for h in header])
    for i, file in enumerate(ev.paths):
        row = [file, int(ev.ages_true[i]), names[int(ev.y_true[i])], names[int(ev.probs[i].argmax())]]
        row += [f"{p:.6f}" for p in ev.probs[i]]
        if ev.ages_pred is not None:
            row.append(f"{ev.ages_pred[i]:.2f}")
        writer.writerow([csv_cell(c) for c in row])
    return buffer.getvalue().encode("utf-8", "backslashreplace")
