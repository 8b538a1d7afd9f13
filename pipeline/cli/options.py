"""Option parsing shared by several commands."""

from __future__ import annotations

import click


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
