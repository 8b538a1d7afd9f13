"""Option parsing shared by several commands."""

from __future__ import annotations

import os
from pathlib import Path

import click

from pipeline.images.checks import DEFAULT_MAX_PIXELS


def parse_max_pixels(text: str) -> int | None:
    """--max-pixels: a whole number of pixels; 0 or 'none' turns the limit off (None)."""
    text = str(text).strip().lower()
    if text in ("0", "none"):
        return None
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise ValueError(f"--max-pixels must be a whole number of pixels, 0 or 'none', got {text!r}") from None
    if value < 0:
        raise ValueError(f"--max-pixels must not be negative, got {value}")
    return value


def _max_pixels_callback(ctx, param, value):
    try:
        return parse_max_pixels(value)
    except ValueError as err:
        raise click.BadParameter(str(err)) from err


def max_pixels_option(command):
    """--max-pixels: images above it are skipped with a reason before decoding (images/checks.py)."""
    return click.option(
        "--max-pixels", default=str(DEFAULT_MAX_PIXELS), show_default=True, callback=_max_pixels_callback,
        help="Skip (with a reason) images with more pixels than this, read from the header before decoding; "
             "0 or 'none': no limit.")(command)


def parse_weight_pairs(texts: str | tuple[str, ...] | None, backbones: list[str] | None = None) -> dict[str, str]:
    """'resnet50=/models/r50.pth,mobilenet_v2=IMAGENET1K_V1' (one string, or several) -> {name: value}.

    backbones: the names allowed, when known while parsing.
    """
    if isinstance(texts, str):
        texts = (texts,)
    weights = {}
    for text in texts or ():
        for item in text.split(","):
            if not item.strip():
                continue
            name, sep, value = (part.strip() for part in item.partition("="))
            if not sep or not name or not value:
                raise click.BadParameter(f"expected NAME=FILE_OR_ENUM, got {item!r}", param_hint="--weights")
            if backbones is not None and name not in backbones:
                raise click.BadParameter(f"{name!r} is not one of the backbones here ({', '.join(backbones)})",
                                         param_hint="--weights")
            weights[name] = value
    return weights


def precision_option(command):
    """--precision: one compute precision for featurize, predict and explain (device.compute_precision)."""
    return click.option(
        "--precision", type=click.Choice(["auto", "float32", "float16", "bfloat16"]), default="auto",
        show_default=True, help="Backbone compute precision, the same setting in featurize, predict and explain. "
                                "auto: float16 autocast on CUDA, float32 on the CPU.")(command)


def engine_option(command):
    """--engine: what runs the backbones' forward pass in featurize and predict (extract.BackboneRunner picks it)."""
    return click.option(
        "--engine", type=click.Choice(["auto", "torch", "onnxruntime"]), default="auto", show_default=True,
        help="What runs the backbones' forward pass. auto: ONNX Runtime on the CPU when installed and the "
             "exported graph matches PyTorch (1.5-3.5x faster, same features up to float rounding), "
             "else PyTorch; always PyTorch on the GPU.")(command)


# Names the options offer, known before any heavy module is imported (so that --help and usage errors stay
# fast). tests/cli/test_fast_help.py checks each against the library's own list.
BACKBONE_NAMES = ("mobilenet_v2", "resnet50", "efficientnet_b0")   # backbones.registry.DEFAULT_BACKBONES
DEFAULT_WEIGHTS = "IMAGENET1K_V1"                                  # backbones.registry.DEFAULT_WEIGHTS
CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "eigengradcam",
               "scorecam")                                         # explain.cam.METHODS
CALIBRATION_METHODS = ("off", "temperature")                       # heads.calibration.METHODS


class AliasedCommand(click.Command):
    """A command that still accepts old option spellings, hidden from --help, for one release.

    aliases: {old spelling: new spelling}, e.g. {"--features": "--feature-file"}. The old
    spelling is rewritten before parsing, so the new option sees the value as given on the
    command line (a recipe does not override it).
    """

    def __init__(self, *args, aliases: dict[str, str] | None = None, hidden_arguments: tuple[str, ...] = (),
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.aliases = dict(aliases or {})
        self.hidden_arguments = tuple(hidden_arguments)   # positional arguments left out of the usage line

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, rewrite_aliases(args, self.aliases))

    def collect_usage_pieces(self, ctx):
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if not (isinstance(param, click.Argument) and param.name in self.hidden_arguments):
                pieces.extend(param.get_usage_pieces(ctx))
        return pieces


def rewrite_aliases(args: list[str], aliases: dict[str, str]) -> list[str]:
    """Replace old option spellings ('--old' and '--old=value') by the new ones, up to a '--'."""
    out, ended = [], False
    for arg in args:
        if not ended and arg == "--":
            ended = True
        elif not ended and arg.startswith("--"):
            name, eq, value = arg.partition("=")
            if name in aliases:
                arg = aliases[name] + eq + value
        out.append(arg)
    return out


def out_option(kind: str, help: str, **kwargs):
    """-o/--out, documented and checked as a FILE or a FOLDER (kind), refused in one line when it is the other.

    A file output is refused when the path is an existing folder or ends with a slash; a folder
    output when the path is an existing file.
    """
    if kind not in ("file", "folder"):
        raise ValueError(f"kind must be file or folder, not {kind!r}")

    def check(ctx, param, value):
        if value is None:
            return value
        text, path = str(value), Path(value)
        if kind == "file" and (path.is_dir() or text.endswith(("/", os.sep))):
            raise click.BadParameter(f"{text} is a folder; {ctx.find_root().info_name} writes a FILE here",
                                     param_hint="-o/--out")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise click.BadParameter(f"{text} is a file; {ctx.find_root().info_name} writes a FOLDER here",
                                     param_hint="-o/--out")
        return path

    return click.option("-o", "--out", type=click.Path(), callback=check,  # a str: a trailing slash is kept
                        metavar=kind.upper(), help=help, **kwargs)
