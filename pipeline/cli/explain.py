"""`explain`: Grad-CAM of the full model (frozen backbone + trained head) on demand, and the report.

    explain IMAGES_OR_FOLDER... -c HEAD [-c HEAD2 ...] -o OUT/       overlays (+ .npy), grid
    explain --report -f F.h5 --data DATA_DIR -c HEAD -o OUT/          face focus + deletion table
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.exit_codes import finish
from pipeline.cli.options import (
    CAM_METHODS,
    AliasedCommand,
    max_pixels_option,
    out_option,
    parse_weight_pairs,
    precision_option,
)


# One release of grace for the old spelling of --feature-file.
@click.command(cls=AliasedCommand, aliases={"--features": "--feature-file"},
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("inputs", nargs=-1, metavar="[IMAGES_OR_FOLDER]...", type=click.Path(path_type=Path))
@click.option("-c", "--checkpoint", "checkpoints", multiple=True, required=True,
              type=click.Path(path_type=Path, exists=True), metavar="DIR",
              help="Head checkpoint folder (made by train-head); repeat for several backbones.")
@out_option("folder", required=True, help="Output FOLDER: overlays, grid, explanations.csv (or the report).")
@click.option("--target", default="predicted", show_default=True,
              help="Group to explain: 'predicted', a group name such as 26-50, or its index.")
@click.option("--method", type=click.Choice(list(CAM_METHODS)), default="gradcam", show_default=True,
              help="gradcam is computed here (raw maps); the others come from pytorch-grad-cam "
                   "(maps min-max normalized per image).")
@click.option("--save-npy", is_flag=True, help="Also save each raw map, at the picture's resolution, as .npy.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--weights", help="name=FILE pairs for backbones featurized with weights from a file, "
                                "e.g. resnet50=/models/r50.pth (checked against the recorded id).")
@click.option("--grid-rows", default=20, show_default=True, type=click.IntRange(1),
              help="Images shown in the grid figure (several checkpoints).")
@click.option("--report", is_flag=True, help="Measure face focus and deletion faithfulness over a split.")
@click.option("-f", "--feature-file", "features", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              metavar="FILE", help="--report: the feature file the heads were trained on.")
@click.option("--data", "data_dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="--report: image folder; meta/path in the feature file is relative to it.")
@click.option("--split", default="test", show_default=True, help="--report: split to measure.")
@click.option("--limit", type=click.IntRange(1), help="--report: a seeded random subsample of N images.")
@click.option("--seed", default=0, show_default=True, help="--report: seed of the subsample and random orders.")
@click.option("--steps", default=10, show_default=True, type=click.IntRange(2),
              help="--report: deletion steps (fractions 0, 1/steps, ..., 1).")
@click.option("--faces", type=click.Choice(["aligned", "detect"]), default="aligned", show_default=True,
              help="aligned: each image is an aligned face crop. detect: find every face in each photo (MTCNN), "
                   "explain its aligned crop (OUT/<image>_face<k>_...png) and paste the map back into the photo "
                   "(..._photo.png).")
@precision_option
@max_pixels_option
def main(inputs, checkpoints, out, target, method, save_npy, batch_size, device, weights, grid_rows, report,
         features, data_dir, split, limit, seed, steps, faces, precision, max_pixels):
    """Grad-CAM heatmaps of IMAGES_OR_FOLDER for each head checkpoint, on the full model.

    The model is rebuilt from each checkpoint: the same frozen backbone, weights
    and preprocessing as featurize, global pooling, then the trained head. Per
    image and checkpoint: OUT/<image>_<backbone>_<method>.png (overlay with the
    predicted group and its probability), with --save-npy the raw map as .npy;
    with several checkpoints also OUT/grid_<method>.png (rows: images, columns:
    backbones); OUT/explanations.csv lists them all.

    With --report: OUT/report.md, report.json and deletion_curves.png.
    """
    from pipeline.backbones.registry import RebuildError, WeightsUnavailable
    from pipeline.explain.cam import CamError
    from pipeline.explain.job import ExplainConfig, explain_images
    from pipeline.heads.checkpoint import CheckpointError, HeadMismatch

    def warn(message: str) -> None:
        click.echo(message, err=True)

    weights_map = parse_weight_pairs(weights)
    try:
        if report:
            if inputs:
                raise click.UsageError("--report measures a split of the feature file; give no IMAGES")
            if features is None or data_dir is None:
                raise click.UsageError("--report needs -f/--feature-file FEATURES.h5 and --data DATA_DIR")
            if target != "predicted":
                raise click.UsageError("--report explains the predicted group; leave --target out")
            if faces != "aligned":
                raise click.UsageError("--report reads the feature file's pictures as aligned crops; "
                                       "--faces is for IMAGES")
            from pipeline.explain.report import ReportConfig, run_report

            result = run_report(ReportConfig(
                checkpoints=list(checkpoints), features=features, data_dir=data_dir, out_dir=out, split=split,
                limit=limit, seed=seed, method=method, steps=steps, batch_size=batch_size, device=device,
                weights=weights_map), log=click.echo, warn=warn)
            click.echo((Path(out) / "report.md").read_text())
            click.echo(f"wrote {out}/report.md, report.json, deletion_curves.png ({result['images']} images)")
            if result["failures"]:
                warn(f"{len(result['failures'])} image(s) could not be read (listed above)")
            finish(len(result["failures"]))  # exit 3: some images were skipped
            return
        if not inputs:
            raise click.UsageError("give IMAGES_OR_FOLDER (or --report)")
        summary = explain_images(ExplainConfig(
            inputs=list(inputs), checkpoints=list(checkpoints), out_dir=out, target=target, method=method,
            save_npy=save_npy, batch_size=batch_size, device=device, weights=weights_map, grid_rows=grid_rows,
            faces=faces, precision=precision, max_pixels=max_pixels),
            log=click.echo, warn=warn)
    except (CamError, RebuildError, HeadMismatch, CheckpointError, WeightsUnavailable, FileNotFoundError, ValueError,
            OSError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"explained {summary['explained']} image(s) into {out}")
    if summary["failures"]:
        warn(f"{len(summary['failures'])} input(s) could not be explained (listed above)")
        finish(len(summary["failures"]))  # exit 3: finished, some inputs skipped (the rule in exit_codes.py)


if __name__ == "__main__":
    main()
