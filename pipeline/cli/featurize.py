"""`featurize`: cache frozen-backbone features of face images in HDF5.

    featurize [DATA_DIR] -o features.h5     compute (resumes if interrupted)
    featurize merge SHARD.h5 ... -o OUT.h5  join shard files
    featurize join A.h5 B.h5 ... -o OUT.h5  put per-backbone files of the same images together
    featurize info FEATURES.h5              what a feature file holds
    featurize verify FEATURES.h5 -n 32      recompute rows on the CPU reference path and compare
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.cli.exit_codes import finish, output_error, require_writable
from pipeline.cli.label_options import label_source_options
from pipeline.cli.options import (
    BACKBONE_NAMES,
    DEFAULT_WEIGHTS,
    engine_option,
    max_pixels_option,
    out_option,
    parse_weight_pairs,
    precision_option,
)
from pipeline.ingest.dataset import parse_edges
from pipeline.ingest.skips import skip_list_path, skip_summary, write_skip_list

# torch, torchvision and the backbones are imported where a command runs, so that --help answers at once.
SAMPLE_DIR = Path(__file__).resolve().parents[2] / "sample" / "utkface"


class DefaultCommandGroup(click.Group):
    """A group that runs `run` when the first argument is not a subcommand name; its --help shows run's options."""

    def parse_args(self, ctx, args):
        if not args or args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx, formatter):
        formatter.write_usage(ctx.command_path, "[DATA_DIR] [OPTIONS]")
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

    def format_options(self, ctx, formatter):
        run = self.commands["run"]
        run_ctx = click.Context(run, info_name=ctx.info_name, parent=ctx.parent)
        records = [r for p in run.get_params(run_ctx) if (r := p.get_help_record(run_ctx)) is not None]
        with formatter.section("Options"):
            formatter.write_dl(records)
        self.format_commands(ctx, formatter)


@click.group(cls=DefaultCommandGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Cache pooled features of frozen ImageNet backbones for face images.

    Each image is decoded once; its plain and mirrored views go through every
    backbone; the pooled features land in one HDF5 file. With no command name,
    `featurize [DATA_DIR] [OPTIONS]` runs the main job (the options below);
    the commands join, check and describe feature files.
    """


def _parse_weights(text: str, backbones: tuple[str, ...]) -> dict[str, str | None]:
    """'IMAGENET1K_V1' for all, or 'resnet50=/path.pth,mobilenet_v2=IMAGENET1K_V1'."""
    if "=" not in text:
        return {name: text for name in backbones}
    return {**{name: DEFAULT_WEIGHTS for name in backbones}, **parse_weight_pairs(text, list(backbones))}


@main.command("run", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("data_dir", required=False, type=click.Path(path_type=Path, file_okay=False))
@click.option("--data", "data_opt", type=click.Path(path_type=Path, file_okay=False),
              help="Same as DATA_DIR. Default: the 96-image sample shipped in sample/utkface.")
@out_option("file", default="features.h5", show_default=True,
            help="Feature FILE to write (.h5; with --shard: one file per shard).")
@click.option("--backbones", default=",".join(BACKBONE_NAMES), show_default=True,
              help="Comma-separated backbone names.")
@click.option("--weights", default=DEFAULT_WEIGHTS, show_default=True,
              help="Weights enum name for all backbones, 'none' for random init, or "
                   "name=ENUM_OR_FILE pairs, e.g. resnet50=/models/r50.pth.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(1))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--decoder", type=click.Choice(["auto", "dali", "torch"]), default="auto", show_default=True,
              help="Decode/resize with NVIDIA DALI or torchvision. auto: DALI if installed.")
@click.option("--dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--bins", default="25,50,75,116", show_default=True,
              help="Inclusive upper age edges of the groups.")
@click.option("--seed", default=0, show_default=True, help="Seed of the 70/15/15 split.")
@click.option("--split-file", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              help="CSV with columns file,split that replaces the seeded split.")
@click.option("--limit", type=click.IntRange(1), help="Only the first N images (sorted by path).")
@click.option("--shard", help="i/n: compute the i-th of n shards. Default from SLURM_ARRAY_TASK_ID/"
                              "SLURM_ARRAY_TASK_COUNT or RANK/WORLD_SIZE when set.")
@click.option("--descriptors", default="none", show_default=True,
              help="Extra per-backbone outputs from the same forward pass, comma-separated: gem (GeM p=3 of the "
                   "last block), grid (2x2 + 3x3 cell means of the last block), stage_grid (the same grids of "
                   "the last earlier stage), all, or none.")
@precision_option
@engine_option
@click.option("--allow-mixed", is_flag=True,
              help="Resume or keep a file whose rows were computed another way (device, precision, decoder, "
                   "engine); every row range keeps its own record. Refused by default.")
@click.option("--verify", "verify_rows", type=click.IntRange(0), default=0, show_default=True,
              help="Afterwards, recompute N seeded-random rows on the CPU reference path (torch decoder, float32) "
                   "and fail (exit 1) if they differ beyond the documented tolerance.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--faces", type=click.Choice(["aligned", "detect", "box"]), default="aligned", show_default=True,
              help="aligned: each picture is an aligned face crop, used whole (UTKFace). detect: find faces (MTCNN), "
                   "use the largest, cut it out in UTKFace's framing. box: cut out the face the labels' box/eye "
                   "columns give.")
@max_pixels_option
@label_source_options
def run_command(data_dir, data_opt, out, backbones, weights, batch_size, device, decoder, dtype, bins, seed,
                split_file, limit, shard, descriptors, quiet, label_source, precision, allow_mixed, verify_rows,
                faces, engine, max_pixels):
    """Featurize DATA_DIR (searched recursively) into an HDF5 feature file.

    Interrupt at any moment and rerun the same command: it resumes. A finished
    file with the same settings is left alone.
    """
    from pipeline.backbones.descriptors import parse_descriptors
    from pipeline.backbones.engines import EngineUnavailable
    from pipeline.backbones.registry import WeightsUnavailable, parse_backbones
    from pipeline.features import extract
    from pipeline.features.settings import SettingsMismatch

    if data_dir and data_opt and data_dir != data_opt:
        raise click.UsageError("give the data folder once, as DATA_DIR or --data")
    data_dir = data_dir or data_opt or SAMPLE_DIR
    try:
        names = parse_backbones(backbones)
        edges = parse_edges(bins)
        shard_spec = extract.parse_shard(shard) if shard else (extract.shard_from_env() or (0, 1))
        descriptor_names = parse_descriptors(descriptors)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err
    config = extract.FeaturizeConfig(
        data_dir=data_dir, out=out, backbones=names, weights=_parse_weights(weights, names),
        batch_size=batch_size, device=device, decoder=decoder, dtype=dtype, group_edges=edges,
        seed=seed, split_file=split_file, limit=limit, shard=shard_spec, descriptors=descriptor_names,
        labels=label_source, precision=precision, allow_mixed=allow_mixed, faces=faces, engine=engine,
        max_pixels=max_pixels,
    )
    require_writable(extract.shard_path(out, shard_spec))  # a read-only folder: one line, before any work
    try:
        summary = extract.run(config, progress=None if quiet else _progress_bar, log=click.echo)
    except KeyboardInterrupt:
        click.echo(f"\ninterrupted: finished batches are kept in {extract.shard_path(out, shard_spec)}.parts; "
                   f"rerun the same command to resume", err=True)
        sys.exit(130)
    except (SettingsMismatch, WeightsUnavailable, EngineUnavailable, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    except OSError as err:  # e.g. the output folder became unwritable mid-run
        raise output_error(extract.shard_path(out, shard_spec), err) from err
    _print_summary(summary)
    if verify_rows:
        _verify(summary["out"], data_dir, verify_rows, seed=0, weights=config.weights, batch_size=batch_size,
                skip_faces=True)
    _exit_for(summary)


def _exit_for(summary: dict) -> None:
    """The exit-code rule (exit_codes.py): 1 when no image made it into the file, 3 when some were skipped."""
    from pipeline.features.read import file_summary

    if summary["status"] == "already done":
        held = file_summary(summary["out"])
        written, skipped = held["rows"], held["skipped"]
    else:
        written, skipped = summary["written"], len(summary["skipped"])
    planned = summary.get("rows", written)  # a shard can be planned 0 rows (more shards than images): no failure
    if written == 0 and planned > 0:
        raise click.ClickException(f"no image could be featurized: all {skipped} files were skipped "
                                   f"(reasons above; {summary['out']} holds 0 images)")
    finish(skipped)


def _progress_bar(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", desc="featurize", dynamic_ncols=True)


def _print_summary(summary: dict) -> None:
    if summary["status"] == "already done":
        click.echo(f"{summary['out']} is already complete ({summary['rows']} images, same settings): nothing to do.")
        return
    mb = summary["bytes"] / 2**20
    click.echo(f"wrote {summary['out']}: {summary['written']} images, {mb:.1f} MiB")
    if summary["computed"]:
        click.echo(f"computed {summary['computed']} images in {summary['seconds']:.1f} s "
                   f"({summary['images_per_s']:.1f} images/s, each through every backbone, both views)")
    if summary["splits"]:
        click.echo("splits: " + ", ".join(f"{k or 'unlisted'} {v}" for k, v in sorted(summary["splits"].items())))
    _print_compute(summary)
    skipped = summary["skipped"]
    if skipped:  # grouped by kind of reason, a few examples each; every one in <out>.skipped.csv
        click.echo("\n".join(skip_summary(skipped)))
        listed = write_skip_list(skip_list_path(summary["out"]), skipped)
        click.echo(f"  all {len(skipped)} with their reasons: {listed} (and /skipped in the file)")


def _print_compute(summary: dict) -> None:
    """How the numbers were computed, and the files a GPU decoder handed to the CPU (with reasons)."""
    from pipeline.features import provenance

    compute = summary.get("compute")
    records = compute if isinstance(compute, list) else [compute] if compute else []
    click.echo("computed with: " + (" + ".join(provenance.describe(r) for r in records) or "not recorded")
               + (" (MIXED: rows computed in different ways, accepted by --allow-mixed)" if len(records) > 1 else ""))
    fallbacks = summary.get("fallbacks") or {}
    if fallbacks.get("count"):
        click.echo(f"decoder fallbacks: {fallbacks['count']} files decoded on the CPU instead of the GPU: "
                   + ", ".join(f"{n} {r}" for r, n in sorted(fallbacks["reasons"].items(), key=lambda x: -x[1])))


def _verify(features, data_dir, n: int, seed: int, weights=None, batch_size: int = 16, json_out=None,
            skip_faces: bool = False) -> None:
    """Run verify.verify_file, print its report; a mismatch (or no way to check) exits 1.

    skip_faces (featurize --verify): a file of cut-out faces, which verify cannot check yet, is
    skipped with a warning instead of failing a run that wrote a good file.
    """
    from pipeline.backbones.registry import WeightsUnavailable
    from pipeline.features.read import read_settings
    from pipeline.features.verify import VerifyError, report_json, verify_file

    faces = read_settings(features).get("faces") if skip_faces else None
    if faces:
        mode = faces.get("mode", faces) if isinstance(faces, dict) else faces
        click.echo(f"warning: --verify skipped: {features} holds faces cut out (--faces {mode}); verify checks "
                   f"whole-picture files (--faces aligned) only, so far", err=True)
        return
    try:
        report = verify_file(features, data_dir, n=n, seed=seed, weights=weights, batch_size=min(batch_size, 64))
    except (VerifyError, WeightsUnavailable) as err:
        raise click.ClickException(f"verify: {err}") from err
    for line in report.lines():
        click.echo(line)
    if json_out:
        Path(json_out).write_text(report_json(report))
    if not report.ok:
        raise click.ClickException(f"verify failed for {features}: see the lines above")


def _combine(combine, files, out, allow_mixed: bool = False) -> dict:
    """Run combine.merge or combine.join; what is wrong with the input files becomes a readable error."""
    from pipeline.features.settings import SettingsMismatch

    try:
        return combine(list(files), out, allow_mixed=allow_mixed)
    except (SettingsMismatch, ValueError, KeyError, OSError) as err:
        raise click.ClickException(str(err)) from err


@main.command("merge", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@out_option("file", required=True, help="Feature FILE to write.")
@click.option("--allow-mixed", is_flag=True, help="Accept shards computed in different ways (device, precision, "
                                                   "decoder, engine); the file records every row range.")
def merge_command(shards, out, allow_mixed):
    """Join the files of a sharded run (--shard i/n) into one feature file."""
    from pipeline.features.combine import merge

    result = _combine(merge, shards, out, allow_mixed)
    click.echo(f"merged {result['shards']} shards into {out}: {result['written']} images")


@main.command("join", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@out_option("file", required=True, help="Feature FILE to write.")
@click.option("--allow-mixed", is_flag=True, help="Accept files computed in different ways (device, precision, "
                                                   "decoder, engine); the file records each one's ranges.")
def join_command(files, out, allow_mixed):
    """Put the backbones of files over the same images (one featurize job per backbone) into one file."""
    from pipeline.features.combine import join

    result = _combine(join, files, out, allow_mixed)
    click.echo(f"joined {len(files)} files into {out}: {result['written']} images, "
               f"backbones {', '.join(result['backbones'])}")


@main.command("verify", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("features", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--data", "data_dir", type=click.Path(path_type=Path, file_okay=False),
              help="The images' folder. Default: the data_dir recorded in the file.")
@click.option("-n", "rows", type=click.IntRange(1), default=32, show_default=True, help="Rows to recompute.")
@click.option("--seed", default=0, show_default=True, help="Seed of the row draw.")
@click.option("--weights", default=None, help="name=FILE pairs for backbones featurized from a local weights file.")
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_out", type=click.Path(path_type=Path, dir_okay=False), help="Also write the report as JSON.")
def verify_command(features, data_dir, rows, seed, weights, batch_size, json_out):
    """Recompute N rows of FEATURES on the CPU reference path and compare (exit 1 beyond tolerance).

    Reports per backbone the minimum cosine and the largest absolute difference
    of every stored output, and the decoded tensors' largest difference for the
    decoder the rows were computed with (when it runs here).
    """
    from pipeline.features.read import read_settings

    overrides = None
    if weights:
        try:
            overrides = parse_weight_pairs(weights, read_settings(features)["backbones"])
        except ValueError as err:
            raise click.BadParameter(str(err)) from err
    _verify(features, data_dir, rows, seed, overrides, batch_size, json_out)


@main.command("info", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("features", type=click.Path(path_type=Path, exists=True, dir_okay=False))
def info_command(features):
    """Show what a feature file holds and the settings that made it."""
    from pipeline.features.read import file_summary, read_meta, read_settings
    from pipeline.ingest.dataset import split_counts

    try:
        summary, settings, meta = file_summary(features), read_settings(features), read_meta(features)
    except (ValueError, OSError) as err:   # OSError: a FIFO or device, named as such
        raise click.ClickException(str(err)) from err
    click.echo(f"{features}: {summary['rows']} images, {summary['skipped']} skipped, "
               f"{summary['bytes'] / 2**20:.1f} MiB, fingerprint {summary['fingerprint']}")
    for name, shape in summary["backbones"].items():
        click.echo(f"  {name:16s} {shape}  weights {settings['weights'][name]}")
    click.echo(f"  splits: {split_counts(meta['split'])}  ({settings['split_source']})")
    click.echo(f"  group edges: {settings['group_edges']}  seed: {settings['seed']}  dtype: {settings['dtype']}")
    click.echo(f"  descriptors: {', '.join(settings.get('descriptors', [])) or 'none'}")
    from pipeline.ingest.labels import describe_label_source

    click.echo(f"  labels: {describe_label_source(settings)}"
               + (f"  (per-row {', '.join(c for c in ('subject', 'box', 'eyes') if c in meta)})"
                  if any(c in meta for c in ('subject', 'box', 'eyes')) else ""))


if __name__ == "__main__":
    main()
