"""The settings that produced a feature file, their fingerprint, and how two settings differ."""

from __future__ import annotations

import hashlib
import json

from pipeline.features import provenance


WEIGHTS_SHA256 = "weights_sha256"   # settings key: {backbone: sha256 of its weights' bytes} ("none": random init)


class SettingsMismatch(ValueError):
    """A file or resume folder was made with other settings than the ones asked for."""


def fingerprint(settings: dict) -> str:
    """Stable short hash of the settings that determine the features."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def describe_mismatch(found: dict, wanted: dict) -> str:
    keys = sorted(set(found) | set(wanted))
    lines = [f"  {k}: file has {found.get(k)!r}, this run wants {wanted.get(k)!r}"
             for k in keys if found.get(k) != wanted.get(k)]
    return "\n".join(lines)


def settings_difference(found: dict, wanted: dict, allow_mixed: bool = False) -> str | None:
    """What differs between two settings (None when they agree); compute records are ignored with allow_mixed.

    A difference only in how the numbers were computed (device, precision,
    decoder, engine: provenance.py) says so and names --allow-mixed.
    """
    if allow_mixed:
        found, wanted = provenance.without_compute(found), provenance.without_compute(wanted)
    if found == wanted:
        return None
    text = describe_mismatch(found, wanted)
    if provenance.without_compute(found) == provenance.without_compute(wanted):
        text += ("\n  file computed with: " + provenance.describe_all(found)
                 + "\n  this one with:      " + provenance.describe_all(wanted)
                 + "\n  (" + provenance.MIX_HINT + ")")
    return text
