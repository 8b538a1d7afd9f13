"""A sweep's bookkeeping: the configurations a grid expands to, their ranking, and what is saved."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

from pipeline.heads.checkpoint import save_checkpoint
from pipeline.heads.config import HeadConfig, HeadResult, expand_grid, result_meta


def grid_configs(grid: dict) -> list[HeadConfig]:
    """Every combination of the grid's values, each once. Only soft heads read soft_sigma:
    the other targets are trained once, not once per sigma."""
    configs = expand_grid(HeadConfig(), **grid)
    return list(dict.fromkeys(c if c.target == "soft" else replace(c, soft_sigma=grid["soft_sigma"][0])
                              for c in configs))


def ranked(results: list[HeadResult]) -> list[int]:
    """Indices of the heads that did not diverge: best validation accuracy first, lower validation loss on ties."""
    def key(i):
        best = results[i].history[results[i].best_epoch - 1]
        return (-best["val_acc"], best["val_loss"])

    return sorted((i for i, r in enumerate(results) if not r.diverged), key=key)


def results_rows(results: list[HeadResult], order: list[int]) -> tuple[list[dict], list[str]]:
    """One row per ranked head, and the columns of the table (only age heads have val_mae)."""
    rows = [{"rank": rank, "config": i, **results[i].row()} for rank, i in enumerate(order, start=1)]
    return rows, list(dict.fromkeys(key for row in rows for key in row))


def checkpoint_of(loaded, result: HeadResult, rank: int, n_configs: int, split_file, recipe: str):
    """(head, meta) to save; with temperature scaling, the meta gains the validation ECE/NLL before and after."""
    head = result.to_head(loaded.group_edges)
    meta = result_meta(loaded, result, split_file, rank=rank, n_configs=n_configs, recipe=recipe)
    if result.calibration != "off":
        from pipeline.heads.calibration import calibration_summary

        meta["calibration"].update(calibration_summary(head, loaded.data.val, loaded.data.val_group))
    return head, meta


def save_sweep(out: Path, loaded, results: list[HeadResult], order: list[int], split_file, recipe: str,
               save_all: bool = False) -> dict:
    """Writes the best head to OUT, every head to OUT/runs/NNN with save_all, and OUT/results.csv.
    Returns the best head's meta."""
    out.mkdir(parents=True, exist_ok=True)
    best_head, best_meta = checkpoint_of(loaded, results[order[0]], 1, len(results), split_file, recipe)
    save_checkpoint(out, best_head, best_meta)
    if save_all:
        for rank, i in enumerate(order, start=1):
            save_checkpoint(out / "runs" / f"{i:03d}",
                            *checkpoint_of(loaded, results[i], rank, len(results), split_file, recipe))
    rows, columns = results_rows(results, order)
    with (out / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return best_meta
