"""How a head's faces were framed (featurize --faces), and which face mode predict should use for it.

A head learns the framing of its training faces: whole aligned crops, or faces cut out of pictures in
UTKFace's framing (detect, or the labels' boxes). Used in another framing its accuracy is unknown, so a
mismatch is reported in one line: an ensemble whose heads disagree is refused, a --faces that differs
from the heads' framing is warned about.
"""

from __future__ import annotations

from typing import Sequence

FRAMINGS = ("aligned", "detect")


class FramingMismatch(ValueError):
    """Heads of one ensemble were trained on faces framed in different ways."""


def head_framing(meta: dict) -> str:
    """'aligned' (whole crops; also heads from before face modes existed) or 'detect' (faces cut out of
    pictures, found by the detector or by the labels' boxes: the same framing, so predict detects)."""
    recorded = meta.get("faces") or {}
    return "aligned" if recorded.get("mode", "aligned") == "aligned" else "detect"


def framing_of_heads(metas: Sequence[dict], labels: Sequence[str]) -> str:
    """The one framing every head shares; FramingMismatch naming them when they differ."""
    framings = [head_framing(meta) for meta in metas]
    if len(set(framings)) > 1:
        listed = ", ".join(f"{label} ({framing})" for label, framing in zip(labels, framings))
        raise FramingMismatch(f"these heads were trained on faces framed in different ways, so no framing fits "
                              f"the ensemble: {listed}")
    return framings[0]


def framing_warning(trained: str, used: str) -> str | None:
    """One line when faces are framed (`used`) otherwise than the heads were trained on (`trained`)."""
    if trained == used:
        return None
    described = {"aligned": "whole aligned face crops (--faces aligned)",
                 "detect": "faces found and cut out of pictures (--faces detect)"}
    return (f"warning: the head was trained on {described[trained]} but is used on {described[used]}; "
            f"its accuracy there is unknown (leave --faces out to use the head's own framing)")


def detector_warning(meta: dict, current: dict) -> str | None:
    """One line when the head's faces were found with other detector settings than this version's."""
    recorded = meta.get("faces") or {}
    if recorded.get("mode") != "detect" or recorded == current:
        return None
    changed = sorted(k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k))
    return (f"warning: the head's faces were found with other detector settings ({', '.join(changed)}) than "
            f"this version uses; predictions can differ slightly from its reported accuracy")
