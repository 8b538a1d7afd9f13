"""Extra descriptors of a backbone's feature maps, computed in the same forward pass as the pooled features.

UTKFace crops are aligned, so a cell of the last feature map covers roughly the same facial region in every
image; average pooling over the whole map throws that away. Each descriptor is one more plain tensor
[B, width] that `registry.FrozenBackbone` returns beside "features" and "stages":
  gem         generalized-mean (p = 3) pooling of the last block, x clamped at 1e-6 first (EfficientNet's
              last block ends in SiLU); stresses the strongest responses (texture, wrinkles).
  grid        the last block averaged over a 2x2 and a 3x3 grid of adaptive_avg_pool2d's cells: 13 cells x C,
              the 2x2 cells first, each grid row by row, within a cell the C channels in order.
  stage_grid  the same grids of the last earlier stage (spec.stage_indices[-1]).
The cells are one matmul with a fixed cell-averaging matrix, because ONNX export of adaptive pooling
supports only sizes that divide the map (7 is prime); tests check both give the same numbers.
"""

from __future__ import annotations

import math

import torch

DESCRIPTORS = ("gem", "grid", "stage_grid")
GRID_SIZES = (2, 3)
GEM_P = 3.0
GEM_EPS = 1e-6
CELLS = sum(n * n for n in GRID_SIZES)   # 13


def parse_descriptors(text) -> tuple[str, ...]:
    """'gem,grid' / ['gem'] / '' / 'none' -> a validated tuple in the canonical order of DESCRIPTORS."""
    if text is None:
        return ()
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip() and n.strip().lower() != "none"]
    if names == ["all"]:
        return DESCRIPTORS
    unknown = [n for n in names if n not in DESCRIPTORS]
    if unknown:
        raise ValueError(f"unknown descriptor {unknown[0]!r}; choose from {', '.join(DESCRIPTORS)} (or all, none)")
    # Canonical order, so 'grid,gem' and 'gem,grid' make the same file (and fingerprint).
    return tuple(d for d in DESCRIPTORS if d in names)


def descriptor_width(spec, name: str) -> int:
    """Width of one descriptor for a registry.BackboneSpec."""
    if name == "gem":
        return spec.feature_width
    if name == "grid":
        return CELLS * spec.feature_width
    if name == "stage_grid":
        return CELLS * spec.stage_widths[-1]
    raise ValueError(f"unknown descriptor {name!r}")


def gem(x: torch.Tensor, p: float = GEM_P, eps: float = GEM_EPS) -> torch.Tensor:
    """[B, C, H, W] -> [B, C] generalized mean over positions."""
    return x.float().clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


def _bounds(size: int, cells: int) -> list[tuple[int, int]]:
    # adaptive_avg_pool2d's cells: start = floor(i * size / n), end = ceil((i + 1) * size / n)
    return [(math.floor(i * size / cells), math.ceil((i + 1) * size / cells)) for i in range(cells)]


def cell_weights(height: int, width: int, sizes=GRID_SIZES) -> torch.Tensor:
    """[H * W, cells]: column c averages the positions of cell c (1 / its area inside it, 0 elsewhere)."""
    columns = []
    for n in sizes:
        for top, bottom in _bounds(height, n):
            for left, right in _bounds(width, n):
                mask = torch.zeros(height, width)
                mask[top:bottom, left:right] = 1.0 / ((bottom - top) * (right - left))
                columns.append(mask.flatten())
    return torch.stack(columns, dim=1)


def grid(x: torch.Tensor, sizes=GRID_SIZES) -> torch.Tensor:
    """[B, C, H, W] -> [B, cells * C]: mean of each grid cell, grids in order, cells row by row.

    One matmul with a cell-averaging matrix rather than 13 sliced means: sliced means
    of tiny windows are overhead-bound on the CPU.
    """
    x = x.float()
    weights = cell_weights(x.shape[2], x.shape[3], sizes).to(x.device)
    cells = torch.matmul(x.flatten(2), weights)          # [B, C, cells]
    return cells.transpose(1, 2).flatten(1)              # cell-major: cell 0's C channels, then cell 1's, ...


def compute(names, last_map: torch.Tensor, last_stage_map: torch.Tensor) -> dict[str, torch.Tensor]:
    """The named descriptors from the last block's map and the last earlier stage's map."""
    out = {}
    for name in names:
        if name == "gem":
            out[name] = gem(last_map)
        elif name == "grid":
            out[name] = grid(last_map)
        elif name == "stage_grid":
            out[name] = grid(last_stage_map)
        else:
            raise ValueError(f"unknown descriptor {name!r}")
    return out


# --------------------------------------------------------------------------- feature kinds

# What a head reads, per backbone: a kind is one of these words or several joined
# with '+' (e.g. 'both+grid', 'last+gem'); the outputs are concatenated in that order.
KIND_WORDS = {"last": ("features",), "stages": ("stages",), "both": ("features", "stages"),
              **{d: (d,) for d in DESCRIPTORS}}


def kind_outputs(kind: str) -> tuple[str, ...]:
    """A feature kind -> the backbone outputs it concatenates, e.g. 'both+grid' -> (features, stages, grid)."""
    words = [w.strip() for w in str(kind).split("+")]
    unknown = [w for w in words if w not in KIND_WORDS]
    if unknown or not words:
        raise ValueError(f"unknown feature kind {kind!r}: use {', '.join(KIND_WORDS)}, or several joined "
                         f"with '+' (e.g. both+grid)")
    outputs = [o for w in words for o in KIND_WORDS[w]]
    if len(set(outputs)) != len(outputs):
        raise ValueError(f"feature kind {kind!r} names an output twice")
    return tuple(outputs)


def kind_descriptors(kind: str) -> tuple[str, ...]:
    """The descriptors a feature kind needs from the backbone (canonical order)."""
    return parse_descriptors([o for o in kind_outputs(kind) if o in DESCRIPTORS])


def dataset_path(output: str, backbone: str) -> str:
    """Where an output lives in a feature file: features/<b>, stages/<b>, descriptors/<name>/<b>."""
    if output in ("features", "stages"):
        return f"{output}/{backbone}"
    if output in DESCRIPTORS:
        return f"descriptors/{output}/{backbone}"
    raise ValueError(f"unknown output {output!r}")
