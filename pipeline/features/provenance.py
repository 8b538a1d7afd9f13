"""How a feature file's numbers were computed: the compute record, its row ranges, and the mix rule.

A compute record says what changes features by more than float rounding:
    {"device": "cuda", "precision": "float16-autocast", "decoder": "dali-gpu",
     "engine": "torch", "engine_version": "2.14.1+cu130"}
It is part of a file's settings (`settings["compute"]`), so it is in the fingerprint, and resume,
"nothing to do", merge and join refuse to mix two records unless asked to (`--allow-mixed`). A file that
mixes them holds the list of its distinct records in `settings["compute"]`, and every file keeps the
attribute `compute_ranges`: which rows (and backbones) were computed how. Files written before this
record existed have no "compute" key; they compare equal only to each other.
"""

from __future__ import annotations

import json

import numpy as np
import torch

COMPUTE_KEY = "compute"
MIX_HINT = ("only how the numbers were computed differs; pass --allow-mixed to accept that "
            "(the file then lists every row range with its own record in compute_ranges)")


def compute_record(device: torch.device | str, precision: str, decoder: str, engine: dict | None = None) -> dict:
    """The record of one run. engine: {"engine", "engine_version"} (BackboneRunner.describe()), default torch."""
    engine = engine or {"engine": "torch", "engine_version": torch.__version__}
    return {"device": torch.device(device).type, "precision": precision, "decoder": decoder,
            "engine": str(engine["engine"]), "engine_version": str(engine["engine_version"])}


def planned_decoder(choice: str, device: torch.device | str) -> str:
    """The decoder name images.decoders.make_decoder(choice, device.type) will report, without building it."""
    from pipeline.images.dali_decoder import (
        dali_available,  # late: images imports DALI lazily, keep that
    )

    family = "dali" if choice == "dali" or (choice == "auto" and dali_available()) else "torch"
    return f"{family}-{'gpu' if torch.device(device).type == 'cuda' else 'cpu'}"


def records(settings: dict) -> list[dict]:
    """The distinct compute records of a file's settings (none for files older than the record)."""
    value = settings.get(COMPUTE_KEY)
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def combined(found: list[dict]) -> dict | list | None:
    """settings["compute"] for rows computed with `found`: one record, or the distinct ones in first-seen order."""
    distinct = []
    for record in found:
        if record is not None and record not in distinct:
            distinct.append(record)
    if not distinct:
        return None
    return distinct[0] if len(distinct) == 1 else distinct


def is_mixed(settings: dict) -> bool:
    return len(records(settings)) > 1


def without_compute(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k != COMPUTE_KEY}


def describe(record: dict | None) -> str:
    """One line: 'cuda float16-autocast, decoder dali-gpu, torch 2.14.1'."""
    if not record:
        return "not recorded (file made before compute records)"
    return (f"{record.get('device')} {record.get('precision')}, decoder {record.get('decoder')}, "
            f"{record.get('engine')} {record.get('engine_version')}")


def describe_all(settings: dict) -> str:
    found = records(settings)
    if not found:
        return describe(None)
    return " + ".join(describe(r) for r in found)


def with_combined(settings: dict, found: list[dict]) -> dict:
    """settings with "compute" set from the records `found` (left out when none is known)."""
    value = combined(found)
    out = without_compute(settings)
    if value is not None:
        out[COMPUTE_KEY] = value
    return out


# ---------------------------------------------------------------- row ranges


def part_array(settings: dict) -> np.ndarray:
    """What a batch part stores about its compute: the record as JSON (a 0-d string array)."""
    return np.asarray(json.dumps(settings.get(COMPUTE_KEY), sort_keys=True))


def part_record(batch, default: dict | None) -> dict | None:
    """The compute record saved with a batch part (parts from before the record: `default`)."""
    if "compute" not in batch.files:
        return default
    return json.loads(str(batch["compute"]))


def add_range(ranges: list[dict], start: int, stop: int, record: dict | None, backbones: list[str]) -> None:
    """Append rows [start, stop) to `ranges`, extending the last range when it has the same record."""
    if stop <= start:
        return
    entry = {"rows": [int(start), int(stop)], "backbones": list(backbones), **(record or {})}
    last = ranges[-1] if ranges else None
    if last and last["rows"][1] == start and {k: v for k, v in last.items() if k != "rows"} == \
            {k: v for k, v in entry.items() if k != "rows"}:
        last["rows"][1] = int(stop)
    else:
        ranges.append(entry)


def read_ranges(attrs, settings: dict, rows: int) -> list[dict]:
    """A file's compute_ranges attribute; for files without one, one range from its settings."""
    if "compute_ranges" in attrs:
        value = attrs["compute_ranges"]
        return json.loads(value.decode() if isinstance(value, bytes) else value)
    ranges: list[dict] = []
    found = records(settings)
    add_range(ranges, 0, rows, found[0] if len(found) == 1 else None, list(settings.get("backbones", [])))
    return ranges


def range_record(entry: dict) -> dict | None:
    """The compute record of one compute_ranges entry (None for rows of a file without records)."""
    return {k: v for k, v in entry.items() if k not in ("rows", "backbones")} or None


def stacked_ranges(files: list[tuple[list[dict], int]]) -> list[dict]:
    """The ranges of files whose rows are put one after another (merge): [(ranges, rows), ...] in order."""
    out: list[dict] = []
    offset = 0
    for ranges, rows in files:
        for entry in ranges:
            add_range(out, entry["rows"][0] + offset, entry["rows"][1] + offset, range_record(entry),
                      entry.get("backbones", []))
        offset += rows
    return out


# ---------------------------------------------------------------- decoder fallbacks


def fallback_summary(fallbacks: list[tuple[str, str]], examples: int = 20) -> dict:
    """{"count", "reasons": {reason: n}, "examples": [[path, reason], ...]} for the file attribute and summary.

    Counted, not listed in full: a GPU decoder that cannot start hands every file
    to the CPU, and 23,708 paths do not belong in an HDF5 attribute.
    """
    reasons: dict[str, int] = {}
    for _, reason in fallbacks:
        reasons[reason] = reasons.get(reason, 0) + 1
    return {"count": len(fallbacks), "reasons": reasons,
            "examples": [[str(p), str(r)] for p, r in list(fallbacks)[:examples]]}


def merged_fallbacks(summaries: list[dict], examples: int = 20) -> dict:
    """One fallback summary for files put together (merge, join)."""
    reasons: dict[str, int] = {}
    for summary in summaries:
        for reason, n in summary.get("reasons", {}).items():
            reasons[reason] = reasons.get(reason, 0) + int(n)
    listed = [e for summary in summaries for e in summary.get("examples", [])]
    return {"count": sum(int(s.get("count", 0)) for s in summaries), "reasons": reasons,
            "examples": listed[:examples]}
