"""A head's checkpoint: safetensors weights and a JSON header, saved, loaded and checked against features.

The header (head.json, repeated in the safetensors metadata) holds a sha256 of the weight tensors, and every
value the head is built from is range-checked when it is loaded, not only when it is trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.files import input_problem
from pipeline.heads.digest import state_digest
from pipeline.heads.model import AgeHead, HeadMismatch

FORMAT = "utkface-age-head/1"


WEIGHTS_FILE = "head.safetensors"


META_FILE = "head.json"


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or not in the safe format."""


@dataclass
class HeadCheckpoint:
    head: AgeHead          # eval mode; forward(raw features [B, D]) -> group scores [B, C]
    meta: dict

    def check_compatible(self, settings: dict) -> None:
        """Raise HeadMismatch, naming every difference, unless features made with `settings` fit this head."""
        check_compatible(self.meta, settings)

    def predict_age(self, features: torch.Tensor) -> torch.Tensor | None:
        """Predicted age in years for 'age' heads; None for group heads."""
        if self.meta.get("target") != "age":
            return None
        with torch.no_grad():
            return self.head.predict_age(features)


def check_compatible(meta: dict, settings: dict) -> None:
    """Compare a head's meta with a feature file's settings (read_settings) or live settings."""
    problems = []
    have = list(settings.get("backbones", []))
    missing = [b for b in meta["backbones"] if b not in have]
    if missing:
        problems.append(f"backbones: the head was trained on {', '.join(meta['backbones'])} features; "
                        f"these features are from {', '.join(have) or 'no backbone'} (missing {', '.join(missing)})")
    weights = settings.get("weights", {}) or {}
    for name in meta["backbones"]:
        if name in have and str(weights.get(name)) != str(meta["weights"].get(name)):
            problems.append(f"weights of {name}: the head was trained on features from weights "
                            f"{meta['weights'].get(name)!r}; these features come from {weights.get(name)!r}")
    mine_sha, their_sha = meta.get("weights_sha256") or {}, settings.get("weights_sha256") or {}
    for name in meta["backbones"]:  # heads and files made before the weights' sha256 was recorded carry none
        if name in mine_sha and name in their_sha and mine_sha[name] != their_sha[name]:
            problems.append(f"weights of {name}: the head was trained on features from weights with sha256 "
                            f"{str(mine_sha[name])[:12]}...; these features come from {str(their_sha[name])[:12]}... "
                            f"(same id {weights.get(name)!r}, other bytes)")
    edges = [int(e) for e in settings.get("group_edges", [])]
    if edges != [int(e) for e in meta["group_edges"]]:
        problems.append(f"group_edges (bins): the head predicts groups {meta['group_edges']}; "
                        f"these features are labelled with {edges}")
    mine, theirs = meta.get("preprocessing"), settings.get("preprocessing")
    if mine and theirs and mine != theirs:
        problems.append(f"preprocessing: the head was trained on features made with {mine}; these use {theirs}")
    # Face handling (featurize --faces): absent on either side means whole aligned crops, the only mode before.
    mine_faces, their_faces = meta.get("faces"), settings.get("faces")
    if mine_faces != their_faces:
        problems.append(f"face handling (--faces): the head was trained on features made with "
                        f"{mine_faces or 'aligned crops'}; these use {their_faces or 'aligned crops'}")
    if problems:
        raise HeadMismatch("this head does not fit these features:\n  " + "\n  ".join(problems))
    _warn_other_compute(meta, settings)


class ComputeWarning(UserWarning):
    """The head's training features and these features were computed differently (device, precision, ...)."""


def _warn_other_compute(meta: dict, settings: dict) -> None:
    """Allowed, with a warning: same backbones, weights and preprocessing, computed another way.

    The features then differ within featurize --verify's tolerance (e.g. float16
    autocast on a GPU against float32 on the CPU), which a head tolerates; what
    is refused is mixing computations inside one feature file (provenance.py).
    """
    from pipeline.features import provenance

    mine, theirs = meta.get("compute"), settings.get("compute")
    if mine is None or theirs is None or mine == theirs:
        return  # heads and files from before compute records carry none
    import warnings

    mixed = " (a file that mixes computations, made with --allow-mixed)" if provenance.is_mixed(settings) else ""
    warnings.warn(f"the head was trained on features computed with {provenance.describe_all({'compute': mine})}; "
                  f"these were computed with {provenance.describe_all(settings)}{mixed}. Allowed: they agree "
                  f"within featurize --verify's tolerance, but scores can move slightly.", ComputeWarning, stacklevel=3)


def _checkpoint_paths(path) -> tuple[Path, Path]:
    path = Path(path)
    folder = path if path.is_dir() or path.suffix not in (".safetensors", ".json") else path.parent
    return folder / WEIGHTS_FILE, folder / META_FILE


def save_checkpoint(out, head: AgeHead, meta: dict) -> Path:
    """Write OUT/head.safetensors + OUT/head.json (weights first, meta last, each atomically)."""
    from safetensors.torch import save_file

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    weights_path, meta_path = folder / WEIGHTS_FILE, folder / META_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    bad = _non_finite(state)
    if bad:
        raise ValueError(f"refusing to save a head to {folder}: {bad} holds values that are not finite "
                         f"(did training diverge?)")
    tmp = weights_path.with_name(weights_path.name + ".tmp")
    digest = state_digest(state)
    # The weights file repeats what the head was trained on, so that an edited head.json is caught at load.
    save_file(state, str(tmp), metadata={"format": FORMAT, "identity": json.dumps(_identity(meta), sort_keys=True),
                                         DIGEST_KEY: digest})
    tmp.replace(weights_path)
    full = {"format": FORMAT, **meta, DIGEST_KEY: digest}
    tmp = meta_path.with_name(meta_path.name + ".tmp")
    tmp.write_text(json.dumps(_jsonable(full), indent=1, sort_keys=True))
    tmp.replace(meta_path)
    return folder


def load_checkpoint(path, device: str | torch.device = "cpu") -> HeadCheckpoint:
    """Load a head safely: tensors via safetensors, meta via JSON; nothing is unpickled."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    weights_path, meta_path = _checkpoint_paths(path)
    for p in (weights_path, meta_path):
        problem = input_problem(p)
        if problem == "does not exist":
            raise CheckpointError(f"{path} is not a head checkpoint: {p} is missing "
                                  f"(a checkpoint is a folder with {WEIGHTS_FILE} and {META_FILE})")
        if problem:
            raise CheckpointError(f"{p} {problem}")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a head checkpoint (format {FORMAT!r} expected)")
    missing = [k for k in IDENTITY_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path} is damaged: it lacks {', '.join(missing)}")
    try:
        state = load_file(str(weights_path), device="cpu")
        stored = safe_open(str(weights_path), framework="pt").metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{weights_path} is not a safetensors file ({err}); "
                              f"pickled checkpoints are refused because loading them can run code") from err
    if "identity" in stored:  # checkpoints saved before this check carry none
        trained_on, described = json.loads(stored["identity"]), _identity(meta)
        changed = [f"{k}: {WEIGHTS_FILE} was trained on {trained_on.get(k)!r}, {META_FILE} says {described.get(k)!r}"
                   for k in IDENTITY_KEYS if trained_on.get(k) != described.get(k)]
        if changed:
            raise CheckpointError(f"{meta_path} was edited after training and no longer describes its weights:\n  "
                                  + "\n  ".join(changed))
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"{weights_path}: {bad} holds values that are not finite; this head cannot be used")
    recorded = [(name, d) for name, d in ((META_FILE, meta.get(DIGEST_KEY)), (WEIGHTS_FILE, stored.get(DIGEST_KEY)))
                if d is not None]   # heads saved before the digest carry none
    found = state_digest(state)
    for name, digest in recorded:
        if digest != found:
            raise CheckpointError(f"{weights_path}: its weights were changed after training (their sha256 is "
                                  f"{found[:12]}..., {name} records {str(digest)[:12]}...); this head cannot be used")
    # Heads saved before temperature scaling existed hold no temperature: they are uncalibrated, T = 1.
    state.setdefault("calibration_temperature", torch.ones(()))
    stored_t, described_t = float(state["calibration_temperature"]), calibration_temperature(meta)
    if described_t is None or not math.isclose(stored_t, described_t, rel_tol=1e-6):
        raise CheckpointError(f"{meta_path} was edited after training and no longer describes its weights:\n  "
                              f"calibration temperature: {WEIGHTS_FILE} holds {stored_t!r}, {META_FILE} says "
                              f"{described_t!r}")
    problem = header_problem(meta, state)
    if problem:
        raise CheckpointError(f"{meta_path}: {problem}; this head cannot be used")
    head = AgeHead(meta["feature_dim"], meta["hidden"], 0.0, meta["group_edges"], meta["target"],
                   reduction=(meta.get("reduction") or {}).get("blocks"))  # --pca heads project
    try:
        head.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights_path} does not match the head described in {meta_path}: {err}") from err
    head.eval().to(device)
    for p in head.parameters():
        p.requires_grad_(False)
    return HeadCheckpoint(head, meta)


DIGEST_KEY = "head_sha256"   # head.json and the safetensors metadata: sha256 of the head's own tensors


def _positive_ints(value, at_least: int = 1) -> bool:
    return (isinstance(value, list) and len(value) >= at_least
            and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))


def header_problem(meta: dict, state: dict) -> str | None:
    """What is out of range in a head's header and buffers (None when all is in range).

    Checked at every load: the temperature in calibration.T_RANGE, feature_std > 0, every buffer finite,
    widths and groups positive and consistent. A value out of range would load and silently give NaN or
    flipped answers (feature_std 0: NaN; temperature 1e30: every probability equal).
    """
    from pipeline.heads.calibration import T_RANGE
    from pipeline.heads.model import TARGETS

    dim = meta.get("feature_dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        return f"feature_dim {dim!r} is not a positive whole number"
    reduction = meta.get("reduction")
    if reduction is not None:   # a --pca head: [block width, columns kept] over the features in order
        blocks = reduction.get("blocks") if isinstance(reduction, dict) else None
        if (not isinstance(blocks, list) or not blocks
                or not all(_positive_ints(b, 2) and len(b) == 2 and b[1] <= b[0] for b in blocks)
                or sum(b[0] for b in blocks) != dim):
            return f"reduction blocks {blocks!r} are not [width, kept] pairs over its {dim} features"
    if not _positive_ints(meta.get("hidden"), 0):
        return f"hidden {meta.get('hidden')!r} is not a list of positive widths"
    edges = meta.get("group_edges")
    if not _positive_ints(edges) or any(b <= a for a, b in zip(edges, edges[1:])):
        return f"group_edges {edges!r} are not increasing positive ages"
    if meta.get("target") not in TARGETS:
        return f"target {meta.get('target')!r} is not one of {', '.join(TARGETS)}"
    names = meta.get("class_names")
    if names is not None and (not isinstance(names, list) or len(names) != len(edges)):
        return f"class_names {names!r} do not name its {len(edges)} groups"
    low, high = T_RANGE
    t = calibration_temperature(meta)
    if t is None or not low * (1 - 1e-6) <= t <= high * (1 + 1e-6):
        return (f"calibration temperature {(meta.get('calibration') or {}).get('temperature')!r} is outside "
                f"[{low:g}, {high:g}]")
    std = state.get("feature_std")
    if std is None or std.shape != (dim,) or not bool((std > 0).all()):
        return f"feature_std is not {dim} positive values"
    mean = state.get("feature_mean")
    if mean is None or mean.shape != (dim,):
        return f"feature_mean is not {dim} values"
    for name in ("age_scale", "temperature"):   # age heads: years = out * age_scale + shift; ordinal scores / T
        if name in state and not float(state[name]) > 0:
            return f"{name} {float(state[name])!r} is not above 0"
    return None


def calibration_temperature(meta: dict) -> float | None:
    """The temperature head.json records (meta["calibration"]["temperature"]); 1 when it records no calibration.

    None when the record is there but not a positive number (a damaged or edited file).
    """
    calibration = meta.get("calibration")
    if calibration is None:
        return 1.0
    value = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        return None
    return float(value)


# What a head's weights mean: checked between head.json and head.safetensors at load.
IDENTITY_KEYS = ("backbones", "weights", "feature_kind", "feature_dim", "hidden", "group_edges", "target")


def _identity(meta: dict) -> dict:
    return {k: _jsonable(meta.get(k)) for k in IDENTITY_KEYS}


def _non_finite(state: dict) -> str | None:
    """The name of the first tensor holding NaN or Inf, or None."""
    return next((name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()), None)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    return value
