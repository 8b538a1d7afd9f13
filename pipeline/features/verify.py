"""Self-verification of a feature file: recompute seeded-random rows on the CPU reference path and compare.

The reference path is the tested one: torchvision decoding on the CPU, the backbones in float32 on the CPU
with the torch engine. For N rows drawn with a seed, `verify_file` recomputes every stored output and
reports per backbone the minimum cosine and the largest absolute difference against what the file holds.
It also decodes the same files with the decoder each row range was computed with (when that decoder runs
here) and reports the largest difference of the decoded tensors. Tolerances depend on how the file was
computed (provenance.py) and are documented in the README ("GPU path: what is verified"); they leave room
over the differences measured on the CPU twins (benchmarks/RESULTS.md, "Decode paths and precisions").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from pipeline.constants import IMAGENET_STD
from pipeline.features import provenance

REFERENCE_DECODER = "torch-cpu"
REFERENCE_PRECISION = "float32"

# One 8-bit level after normalization: 1 / (255 * the smallest ImageNet std).
ONE_LEVEL = 1.0 / (255.0 * min(IMAGENET_STD))
# Largest decoded difference against torch-cpu, per decoder (images/decoders.py). torch-cpu against
# itself (another batch size) must agree exactly; DALI promises one 8-bit level. torchvision's nvJPEG
# does not interpolate chroma, so torch-gpu gets a bound above its simulated worst pixel (benchmarks/RESULTS.md).
DECODE_TOLERANCE = {"torch-cpu": 1e-6, "dali-cpu": ONE_LEVEL, "dali-gpu": ONE_LEVEL, "torch-gpu": 0.6}


@dataclass(frozen=True)
class Tolerance:
    """Pass when min cosine >= min_cosine and max |diff| <= max_relative * max |reference| (per output)."""
    min_cosine: float
    max_relative: float
    why: str


# Keyed by compute precision; then widened for float16 storage and for decoders other than torch-cpu.
# Each tolerance leaves about 2x room over the worst case measured against torch-cpu float32
# (benchmarks/RESULTS.md, "Decode paths and precisions").
_PRECISION_TOLERANCE = {
    "float32": Tolerance(0.99999, 2e-3, "float32 compute: float rounding only"),
    "float16-autocast": Tolerance(0.999, 5e-2, "float16 autocast: 11-bit mantissa through every layer"),
    "bfloat16-autocast": Tolerance(0.97, 0.4, "bfloat16 autocast: 8-bit mantissa through every layer"),
}
_FLOAT16_STORAGE = Tolerance(0.9999, 2e-3, "float16 storage: relative rounding 2^-11 per value")
_OTHER_DECODER = Tolerance(0.999, 2e-2, "another decoder: decoded pixels may differ by one 8-bit level")
# Of the order of float16 autocast's: nvJPEG's missing chroma interpolation moves pixels little on average.
_NVJPEG_CHROMA = Tolerance(0.999, 5e-2, "torch-gpu: nvJPEG without chroma interpolation (decode.py)")


def tolerance_for(record: dict | None, dtype: str) -> Tolerance:
    """The loosest of what the compute precision, the storage dtype and the decoder allow."""
    parts = [_PRECISION_TOLERANCE.get((record or {}).get("precision", "float32"), _PRECISION_TOLERANCE["float32"])]
    if dtype == "float16":
        parts.append(_FLOAT16_STORAGE)
    decoder = (record or {}).get("decoder", REFERENCE_DECODER)
    if decoder != REFERENCE_DECODER:
        parts.append(_NVJPEG_CHROMA if decoder == "torch-gpu" else _OTHER_DECODER)
    return Tolerance(min(p.min_cosine for p in parts), max(p.max_relative for p in parts),
                     "; ".join(p.why for p in parts))


class VerifyError(ValueError):
    """The verification could not run (missing data, unreadable file), with the reason."""


@dataclass
class OutputCheck:
    backbone: str
    output: str                # features, stages, or a descriptor name
    min_cosine: float
    max_abs: float
    scale: float               # max |reference|, what max_abs is relative to
    tolerance: Tolerance

    @property
    def ok(self) -> bool:
        return (self.min_cosine >= self.tolerance.min_cosine
                and self.max_abs <= self.tolerance.max_relative * max(self.scale, 1e-12))


@dataclass
class DecodeCheck:
    decoder: str
    max_abs: float | None      # None: that decoder does not run here
    tolerance: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.max_abs is None or self.max_abs <= self.tolerance


@dataclass
class VerifyReport:
    path: str
    rows: list[int]
    seed: int
    computed_with: str
    outputs: list[OutputCheck] = field(default_factory=list)
    decoded: list[DecodeCheck] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)   # rows that could not be recomputed

    @property
    def ok(self) -> bool:
        return not self.problems and all(c.ok for c in self.outputs) and all(d.ok for d in self.decoded)

    def lines(self) -> list[str]:
        out = [f"verify: {len(self.rows)} rows of {self.path} (seed {self.seed}) recomputed on the CPU reference "
               f"path ({REFERENCE_DECODER}, {REFERENCE_PRECISION}, torch {torch.__version__})",
               f"  file computed with: {self.computed_with}"]
        for d in self.decoded:
            if d.max_abs is None:
                out.append(f"  decoded tensors, {d.decoder}: not checked ({d.note})")
            else:
                out.append(f"  decoded tensors, {d.decoder} vs {REFERENCE_DECODER}: max |diff| {d.max_abs:.3g} "
                           f"(tolerance {d.tolerance:.3g}) {'ok' if d.ok else 'FAIL'}")
        for c in self.outputs:
            out.append(f"  {c.backbone} {c.output}: min cosine {c.min_cosine:.6f} (>= {c.tolerance.min_cosine}), "
                       f"max |diff| {c.max_abs:.3g} = {c.max_abs / max(c.scale, 1e-12):.2%} of max |value| "
                       f"{c.scale:.3g} (<= {c.tolerance.max_relative:.1%}) {'ok' if c.ok else 'FAIL'}")
        out += [f"  {p}" for p in self.problems]
        out.append("verify: " + ("passed" if self.ok else "FAILED: the file's features differ from the reference "
                                 "path beyond the tolerance above"))
        return out


def pick_rows(total: int, n: int, seed: int) -> list[int]:
    """n distinct rows of total, drawn with seed, in file order."""
    rng = np.random.default_rng(seed)
    return sorted(int(r) for r in rng.choice(total, size=min(n, total), replace=False))


def _cosine_and_abs(reference: np.ndarray, stored: np.ndarray) -> tuple[float, float, float]:
    ref = reference.reshape(-1, reference.shape[-1]).astype(np.float64)
    got = stored.reshape(-1, stored.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
    # Two all-zero vectors agree; one zero and one not do not.
    cosine = np.where(norms > 0, np.sum(ref * got, axis=1) / np.where(norms > 0, norms, 1.0),
                      np.where(np.linalg.norm(ref - got, axis=1) == 0, 1.0, 0.0))
    return float(cosine.min()), float(np.abs(ref - got).max()), float(np.abs(ref).max())


def _reference_runner(settings: dict, weights: dict[str, str] | None):
    from pipeline.backbones.registry import RebuildError, choose_weights
    from pipeline.features.extract import BackboneRunner

    try:
        chosen = choose_weights(settings, weights)
    except RebuildError as err:
        raise VerifyError(f"cannot rebuild the backbones to verify against: {err}") from err
    # The reference is the torch engine in float32, whatever the file used.
    return BackboneRunner(tuple(settings["backbones"]), chosen, torch.device("cpu"),
                          tuple(settings.get("descriptors", ())), precision=REFERENCE_PRECISION, engine="torch")


def _decoder_for(name: str, batch_size: int):
    """The decoder called `name` (e.g. dali-gpu) if it runs here, else (None, why not)."""
    from pipeline.images.dali_decoder import dali_available
    from pipeline.images.decoders import make_decoder

    family, _, where = name.partition("-")
    device = "cuda" if where == "gpu" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        return None, "no CUDA GPU here"
    if family == "dali" and not dali_available():
        return None, "DALI is not installed here"
    return make_decoder(family, device, batch_size), ""


def verify_file(path, data_dir=None, n: int = 32, seed: int = 0, weights: dict[str, str] | None = None,
                batch_size: int = 16, reference_batch_size: int | None = None) -> VerifyReport:
    """Recompute n seeded-random rows of the feature file at `path` on the reference path and compare.

    data_dir: the images' folder (default: the data_dir recorded in the file).
    reference_batch_size: the reference decoder's batch size (default batch_size);
    a different one makes the torch-cpu-against-itself check meaningful.
    """
    from pipeline.backbones.descriptors import dataset_path
    from pipeline.features.read import meta_problem, read_settings
    from pipeline.images.decoders import make_decoder

    path = Path(path)
    try:
        settings = read_settings(path)
    except (FileNotFoundError, ValueError) as err:
        raise VerifyError(str(err)) from err
    if settings.get("faces"):
        # The reference path decodes whole pictures; cut-out faces would need the face pipeline's crops too.
        raise VerifyError(f"{path} was featurized with faces cut out ({settings['faces']}); verify checks "
                          f"whole-picture files (--faces aligned) only, so far")
    with h5py.File(path, "r") as h5:
        meta_edited = meta_problem(h5)   # labels changed after writing: the features may still match
        total = len(h5["meta/age"])
        if total == 0:
            raise VerifyError(f"{path} holds no rows to verify")
        recorded_dir = h5.attrs.get("data_dir")
        data_dir = Path(data_dir or (recorded_dir.decode() if isinstance(recorded_dir, bytes) else recorded_dir or ""))
        ranges = provenance.read_ranges(h5.attrs, settings, total)
        rows = pick_rows(total, n, seed)
        files = [str(data_dir / p) for p in h5["meta/path"].asstr()[rows]]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise VerifyError(f"{missing[0]}: image not found ({len(missing)} of {len(files)} missing); "
                          f"pass the data folder the file was featurized from (--data)")

    report = VerifyReport(str(path), rows, seed, provenance.describe_all(settings))
    if meta_edited:
        report.problems.append(f"{path}: {meta_edited}")
    reference_decoder = make_decoder("torch", "cpu", reference_batch_size or batch_size)
    runner = _reference_runner(settings, weights)
    record_of_row = {}
    for entry in ranges:
        for row in rows:
            if entry["rows"][0] <= row < entry["rows"][1]:
                record_of_row.setdefault(row, provenance.range_record(entry))

    reference_views, kept = [], []
    for lo in range(0, len(files), reference_batch_size or batch_size):
        chunk = files[lo:lo + (reference_batch_size or batch_size)]
        decoded = reference_decoder.decode(chunk)
        for file, reason in decoded.failures:
            report.problems.append(f"{file}: in the file, but the reference decoder fails on it ({reason})")
        reference_views.append(decoded.views)
        kept += [lo + k for k in decoded.kept]
    views = torch.cat(reference_views) if reference_views else torch.empty(0)
    if not kept:
        return report

    # The decoders the rows were computed with, on the same files.
    by_decoder: dict[str, list[int]] = {}
    for position in kept:
        by_decoder.setdefault((record_of_row.get(rows[position]) or {}).get("decoder", REFERENCE_DECODER),
                              []).append(position)
    for name, positions in by_decoder.items():
        decoder, why = _decoder_for(name, batch_size)
        tolerance = DECODE_TOLERANCE.get(name, ONE_LEVEL)
        if decoder is None:
            report.decoded.append(DecodeCheck(name, None, tolerance, why))
            continue
        worst = 0.0
        for lo in range(0, len(positions), batch_size):
            chunk = positions[lo:lo + batch_size]
            decoded = decoder.decode([files[p] for p in chunk])
            if len(decoded.kept) != len(chunk):
                report.problems += [f"{f}: {name} fails on it now ({r})" for f, r in decoded.failures]
                continue
            index = torch.as_tensor([kept.index(p) for p in chunk])
            worst = max(worst, float((decoded.views.float().cpu() - views[index]).abs().max()))
        report.decoded.append(DecodeCheck(name, worst, tolerance))

    reference = {}
    for lo in range(0, len(kept), batch_size):
        for name, outputs in runner(views[lo:lo + batch_size]).items():
            for output, values in outputs.items():
                reference.setdefault(name, {}).setdefault(output, []).append(values)
    kept_rows = [rows[p] for p in kept]
    records = [record_of_row.get(r) for r in kept_rows]
    # One tolerance for the rows checked: the loosest of their records (a mixed file may hold several).
    tolerances = [tolerance_for(r, settings.get("dtype", "float16")) for r in records]
    tolerance = Tolerance(min(t.min_cosine for t in tolerances), max(t.max_relative for t in tolerances),
                          tolerances[0].why)
    with h5py.File(path, "r") as h5:
        for name in settings["backbones"]:
            for output, parts in reference[name].items():
                dataset = dataset_path(output, name)
                if dataset not in h5:
                    continue
                stored_values = h5[dataset][kept_rows].astype(np.float32)
                cosine, max_abs, scale = _cosine_and_abs(np.concatenate(parts), stored_values)
                report.outputs.append(OutputCheck(name, output, cosine, max_abs, scale, tolerance))
    return report


def report_json(report: VerifyReport) -> str:
    """The report as JSON (for benchmarks/gpu_featurize.sh and other scripts)."""
    return json.dumps({
        "path": report.path, "rows": report.rows, "seed": report.seed, "ok": report.ok,
        "computed_with": report.computed_with,
        "decoded": [{"decoder": d.decoder, "max_abs": d.max_abs, "tolerance": d.tolerance, "ok": d.ok,
                     "note": d.note} for d in report.decoded],
        "outputs": [{"backbone": c.backbone, "output": c.output, "min_cosine": c.min_cosine, "max_abs": c.max_abs,
                     "scale": c.scale, "tolerance_min_cosine": c.tolerance.min_cosine,
                     "tolerance_max_relative": c.tolerance.max_relative, "ok": c.ok} for c in report.outputs],
        "problems": report.problems,
    }, indent=1)
