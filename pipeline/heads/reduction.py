"""A linear reduction of wide feature blocks (train-head --pca N), fitted once and cached beside the feature file.

A head's first layer costs rows x width x hidden multiply-adds per pass. --pca N replaces every block of the
features wider than N (a backbone's last block, its stages, a descriptor such as stage_grid) by its top N
principal components, fitted on the standardized training rows (both views; never val or test); narrower
blocks pass unchanged. The fit is stored in FEATURE_FILE.pca/ and reused by every later head and sweep on
the same rows; the head carries the projections as buffers, so head(features) stays the whole computation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pipeline.heads.digest import state_digest

METHOD = "pca-blocks/1"   # bump when the fit changes: cached fits of another method are not reused
FIT_SEED = 0


def block_components(widths, components: int) -> list[int]:
    """Columns each block keeps under --pca N: N for a block wider than N, the whole block otherwise."""
    return [min(int(w), int(components)) for w in widths]


def fit_pca(rows: torch.Tensor, components: int, seed: int = FIT_SEED, iterations: int = 2,
            oversample: int = 64) -> torch.Tensor:
    """[D, components] top principal directions of centred rows [N, D], by falling variance, scaled so
    the components' mean variance is 1 (the scale of the standardized columns they replace).

    Not whitened: every component keeps its share of the variance, as in the standardized block (whitening
    lifted the weak, noisy directions and cost validation accuracy). Halko et al.'s randomized range finder:
    a few [N, D] x [D, components + oversample] matmuls instead of a D x D covariance and its eigenvectors.
    """
    n, width = rows.shape
    if not 0 < components <= min(n, width):
        raise ValueError(f"--pca {components}: choose 1 to {min(n, width)} components "
                         f"({width} features, {n} training rows)")
    k = min(components + oversample, width, n)
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(width, k, generator=generator).to(rows.device)
    for _ in range(iterations):  # power iterations sharpen the basis towards the top directions
        basis = torch.linalg.qr(rows.T @ (rows @ basis)).Q
    small = rows @ basis                                          # [N, k]
    gram = (small.T @ small).double() / max(n - 1, 1)             # covariance within the basis
    variance, vectors = torch.linalg.eigh(gram)                   # ascending
    order = torch.argsort(variance, descending=True)[:components]
    directions = basis.double() @ vectors[:, order]               # [D, components], orthonormal columns
    # A fixed sign per direction (largest entry positive): eigenvectors' signs are otherwise arbitrary.
    signs = torch.sign(directions.gather(0, directions.abs().argmax(0, keepdim=True)))
    return (directions * signs / variance[order].clamp_min(1e-12).mean().sqrt()).float()


def fit_blocks(standardized: torch.Tensor, widths, components: int) -> dict[str, torch.Tensor]:
    """{"block{i}": [width_i, N]} for each block of [N, D] standardized rows that --pca N reduces."""
    fits, lo = {}, 0
    for i, (width, keep) in enumerate(zip(widths, block_components(widths, components))):
        if keep < width:
            fits[f"block{i}"] = fit_pca(standardized[:, lo:lo + width], keep)
        lo += width
    return fits


def apply_blocks(x: torch.Tensor, widths, projections) -> torch.Tensor:
    """[B, D] standardized rows -> [B, sum of kept columns]: each reduced block projected, the others as they are.

    projections: {"block{i}": [width_i, N]} (a dict or an nn.Module's buffers by those names).
    """
    parts, lo = [], 0
    for i, width in enumerate(widths):
        block = x[:, lo:lo + width]
        name = f"block{i}"
        parts.append(block @ projections[name] if name in projections else block)
        lo += width
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def project(rows: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, widths, projections,
            chunk: int = 4096) -> torch.Tensor:
    """apply_blocks(((rows - mean) / std)) for [N, D] rows, a chunk of rows at a time (no standardized copy)."""
    out = []
    for lo in range(0, rows.shape[0], chunk):
        out.append(apply_blocks((rows[lo:lo + chunk] - mean) / std, widths, projections))
    return torch.cat(out)


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


class ReductionCache:
    """Fitted projections of one feature file's rows, in FEATURE_FILE.pca/ (safetensors, one file per fit).

    fields: what the fit depends on (the file's fingerprint, the rows used, backbones, feature kind);
    a fit is reused only when they, the block widths and the number of components match.
    """

    def __init__(self, feature_file, fields: dict):
        self.folder = Path(f"{feature_file}.pca")
        self.fields = {**fields, "method": METHOD}

    def _fields(self, widths, components: int) -> dict:
        return {**self.fields, "widths": [int(w) for w in widths], "components": int(components)}

    def path(self, widths, components: int) -> Path:
        key = cache_key(self._fields(widths, components))
        return self.folder / f"pca{components}-{key}.safetensors"

    def load(self, widths, components: int) -> dict | None:
        """{"mean", "std", "block{i}"...} of a stored fit, or None."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        path = self.path(widths, components)
        if not path.is_file():
            return None
        try:
            stored = load_file(str(path))
            recorded = safe_open(str(path), framework="pt").metadata() or {}
        except (SafetensorError, OSError, ValueError):  # a damaged cache entry is refitted, never trusted
            return None
        reduced = {f"block{i}" for i, (w, k) in enumerate(zip(widths, block_components(widths, components)))
                   if k < w}
        # Reused only when it was fitted for these rows and its numbers are the ones stored (not edited since).
        intact = (recorded.get("fields") == json.dumps(self._fields(widths, components), sort_keys=True)
                  and recorded.get("sha256") == state_digest(stored))
        return stored if intact and set(stored) == {"mean", "std", *reduced} else None

    def save(self, widths, components: int, fit: dict) -> str | None:
        """Stores a fit (atomically); the reason it could not, or None."""
        from safetensors.torch import save_file

        path = self.path(widths, components)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tensors = {k: v.detach().cpu().contiguous() for k, v in fit.items()}
            fields = json.dumps(self._fields(widths, components), sort_keys=True)
            save_file(tensors, str(tmp), metadata={"fields": fields, "sha256": state_digest(tensors)})
            os.chmod(tmp, 0o644)  # readable by everyone who reads the feature file beside it
            tmp.replace(path)
        except OSError as err:
            return f"could not store the fit in {self.folder} ({err}); it is refitted next time"
        return None
