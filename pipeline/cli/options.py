"""Option parsing shared by several commands."""

from __future__ import annotations

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
