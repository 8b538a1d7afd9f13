"""The full model of a head checkpoint: frozen backbone(s) -> pooled features -> head.

`load_full_model` rebuilds, from a head checkpoint, the model whose scores the
head was trained to produce: the backbone(s) named in the checkpoint with the
same weights id, the featurize preprocessing (`images.views.preprocess_rgb`), global
average pooling, `heads.data.assemble_features`, then the head. On an image its
scores equal the head applied to the image's cached features, up to the
float16 rounding of the cache. predict and explain both use it, through
`load_full_models` when several heads share backbones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from pipeline.backbones.descriptors import kind_descriptors
from pipeline.backbones.registry import (
    FrozenBackbone,
    RebuildError,
    choose_weights,
    create_backbone,
    fuse_conv_bn,
)
from pipeline.constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from pipeline.device import compute_precision
from pipeline.heads.checkpoint import HeadCheckpoint, load_checkpoint
from pipeline.heads.data import assemble_features


class FullModel(nn.Module):
    """Image [B, 3, S, S] (normalized) -> group scores [B, C]: backbone(s), pooling, head.

    Always in eval mode and never trainable: `train()` is a no-op, the head's
    parameters are frozen like the backbones'.
    """

    def __init__(self, backbones: dict[str, FrozenBackbone], head: nn.Module, feature_kind: str,
                 class_names: Sequence[str] = ()):
        super().__init__()
        self.names = list(backbones)
        self.backbones = nn.ModuleDict(backbones)
        self.head = head
        self.feature_kind = feature_kind
        self.class_names = list(class_names)
        for p in self.head.parameters():
            p.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True):
        return super().train(False)  # dropout off, BatchNorm statistics fixed, whatever the caller does

    @property
    def cam_layers(self) -> dict[str, nn.Module]:
        return {name: self.backbones[name].cam_layer for name in self.names}

    # device.compute_precision setting: "auto" computes as featurize and predict do on the same device.
    precision = "auto"

    def head_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D_total] raw features (float32), in the layout the head was trained on."""
        with compute_precision(x.device, self.precision):
            pooled = {name: self.backbones[name](x) for name in self.names}
        return assemble_features(pooled, self.names, self.feature_kind).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_inputs(x))


def check_preprocessing(recorded: dict | None) -> None:
    """Refuse a checkpoint whose features were made with other preprocessing than the decoders'."""
    if not recorded:
        return
    problems = []
    if "size" in recorded and int(recorded["size"]) != IMAGE_SIZE:
        problems.append(f"size {recorded['size']} (decode uses {IMAGE_SIZE})")
    for key, ours in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        if key in recorded and not np.allclose(recorded[key], ours):
            problems.append(f"{key} {recorded[key]} (decode uses {list(ours)})")
    if "resize" in recorded and recorded["resize"] != "bilinear-antialias":
        problems.append(f"resize {recorded['resize']!r} (decode uses 'bilinear-antialias')")
    if problems:
        raise RebuildError("the checkpoint's features were made with other preprocessing: " + "; ".join(problems))


def load_full_model(checkpoint: str | Path | HeadCheckpoint, weights: dict[str, str] | None = None,
                    device: str | torch.device = "cpu",
                    shared: dict[tuple[str, str], FrozenBackbone] | None = None) -> tuple[FullModel, HeadCheckpoint]:
    """Rebuild backbone(s) + pooling + head from a head checkpoint (a path or a loaded one).

    shared: {(backbone, weights id): backbone} built for earlier checkpoints; reused, and
    filled with the backbones built here, so that several heads hold one copy of each.
    Raises RebuildError when the checkpoint's features cannot be reproduced
    (other preprocessing, weights that cannot be matched), and
    WeightsUnavailable when the backbone weights cannot be loaded.
    """
    ckpt = checkpoint if isinstance(checkpoint, HeadCheckpoint) else load_checkpoint(checkpoint)
    meta = ckpt.meta
    check_preprocessing(meta.get("preprocessing"))
    chosen = choose_weights(meta, weights)
    shared = {} if shared is None else shared
    backbones = {}
    for name in meta["backbones"]:
        key = (name, str(meta["weights"][name]))  # choose_weights checked that the weights have this id
        needed = kind_descriptors(meta["feature_kind"])  # e.g. grid for a 'both+grid' head
        if key not in shared:
            # BatchNorm folded as in featurize (extract.BackboneRunner): the same graph gives the same
            # features under autocast too, where an unfolded one would not.
            shared[key] = fuse_conv_bn(create_backbone(name, chosen[name], needed))
        else:  # the same module, now also returning this head's descriptors (weights are not copied)
            shared[key] = shared[key].with_descriptors(needed)
        backbones[name] = shared[key]
    model = FullModel(backbones, ckpt.head, meta["feature_kind"], meta.get("class_names") or [])
    # channels_last: faster convolutions on CPU and GPU (see extract.BackboneRunner).
    model = model.to(device).to(memory_format=torch.channels_last)
    return model, ckpt


def load_full_models(checkpoints: Sequence[HeadCheckpoint], weights: dict[str, str] | None = None,
                     device: str | torch.device = "cpu", labels: Sequence[str] | None = None,
                     shared: dict[tuple[str, str], FrozenBackbone] | None = None) -> list[FullModel]:
    """The full models of several heads, sharing each (backbone, weights id) they have in common.

    Every head's preprocessing and weights are checked before any backbone is
    built (building one may mean loading weights). labels: names for the heads,
    put in front of a RebuildError's reason. shared: as for load_full_model.
    """
    for i, ckpt in enumerate(checkpoints):
        try:
            check_preprocessing(ckpt.meta.get("preprocessing"))
            choose_weights(ckpt.meta, weights)
        except RebuildError as err:
            if labels is None:
                raise
            raise RebuildError(f"{labels[i]}: {err}") from err
    shared = {} if shared is None else shared
    return [load_full_model(ckpt, weights, device, shared)[0] for ckpt in checkpoints]
