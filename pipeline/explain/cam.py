"""Grad-CAM on the full model (inference.full_model.FullModel: frozen backbone(s) -> pooled features -> head).

`explain_batch` gives one map per backbone at its registered target layer (`FrozenBackbone.cam_layer`).
Method "gradcam" is computed here: ReLU(sum_k mean_xy(dy_c/dA_k) * A_k), y_c the target group's pre-softmax
score, upsampled bilinearly to the model input and not normalized, so maps keep their scale. The other
methods come from pytorch-grad-cam, min-max normalized per image. Fusion heads get one map per backbone
from one backward pass. Heads on 'both' are explained through the last block only (gradients to the earlier
stages bypass the target layer); heads on 'stages' alone are refused. Maps and probabilities are those of
the plain view, so they can differ slightly from `evaluate --tta`. `cache_agreement` checks the rebuilt
model's logits against the head on cached features, within the cache's float16 rounding
(`fp16_logit_tolerance`). explain/job.py runs the command over files and folders; explain/overlays.py draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.inference.full_model import FullModel

# method name -> pytorch-grad-cam class name (None: computed here).
METHODS = {
    "gradcam": None,
    "gradcam++": "GradCAMPlusPlus",
    "xgradcam": "XGradCAM",
    "hirescam": "HiResCAM",
    "layercam": "LayerCAM",
    "eigencam": "EigenCAM",
    "eigengradcam": "EigenGradCAM",
    "scorecam": "ScoreCAM",
}


class CamError(ValueError):
    """A checkpoint or request that Grad-CAM cannot serve, with the reason."""


def require_last_block(meta: dict) -> None:
    """Maps sit at the last block; a head on feature kind 'stages' never sees it."""
    from pipeline.backbones.descriptors import kind_outputs

    # Only features, gem and grid come from the last block; stages and stage_grid come from earlier ones.
    if not set(kind_outputs(meta["feature_kind"])) & {"features", "gem", "grid"}:
        raise CamError(f"this head was trained on feature kind {meta['feature_kind']!r} (earlier stages only): "
                       "it never sees the last block, so a map at the last block would be empty. Explain heads trained "
                       "on 'last' or 'both'.")


def resolve_target(target: str | int | None, class_names: Sequence[str]) -> int | None:
    """None for 'predicted'; else the group index, given by name ('26-50') or index ('1')."""
    if target is None or str(target).lower() == "predicted":
        return None
    text = str(target).strip()
    if text in class_names:
        return list(class_names).index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(class_names):
        return int(text)
    raise CamError(f"unknown target group {target!r}; use 'predicted', one of {', '.join(class_names)}, "
                   f"or an index 0..{len(class_names) - 1}")


# --------------------------------------------------------------------------- Grad-CAM


@dataclass
class Explanation:
    """One batch explained by one model."""
    scores: np.ndarray            # [B, C] group scores (logits)
    probs: np.ndarray             # [B, C] softmax of the scores
    predicted: np.ndarray         # [B] argmax group
    target: np.ndarray            # [B] the group each map explains
    cams: dict[str, np.ndarray]   # backbone -> [B, S, S] float32 at model-input resolution
    features: np.ndarray | None = None  # [B, D_total] the head's inputs (gradcam only)


class _ActivationTaps:
    """Forward hooks that pass each target layer's output on as a leaf that requires grad.

    Needed because a frozen backbone fed an input that needs no grad builds no
    graph at all; detaching there also spares the backward pass through the
    rest of the backbone. Use as a context manager: hooks go with the block.
    """

    def __init__(self, layers: dict[str, nn.Module]):
        self.activations: dict[str, torch.Tensor] = {}
        self._handles = [layer.register_forward_hook(self._hook(name)) for name, layer in layers.items()]

    def _hook(self, name: str):
        def keep(module, inputs, output):
            leaf = output.detach().requires_grad_(True)
            self.activations[name] = leaf
            return leaf
        return keep

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.activations = {}


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] -> [B, H, W], bilinear (pixel centres aligned, as image resizing does)."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]


def _target_indices(scores: torch.Tensor, target: int | Sequence[int] | None) -> torch.Tensor:
    if target is None:
        return scores.argmax(dim=1)
    if isinstance(target, int):
        return torch.full((scores.shape[0],), target, dtype=torch.long, device=scores.device)
    return torch.as_tensor(list(target), dtype=torch.long, device=scores.device)


def grad_cam(model: FullModel, x: torch.Tensor, target: int | Sequence[int] | None = None) -> Explanation:
    """Grad-CAM of every backbone in `model` for a batch x [B, 3, S, S] (normalized, on the model's device)."""
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(False), torch.enable_grad(), _ActivationTaps(model.cam_layers) as taps:
        features = model.head_inputs(x)
        scores = model.head(features)
        chosen = _target_indices(scores, target)
        missing = [n for n in model.names if n not in taps.activations]
        if missing:
            raise RuntimeError(f"the target layer of {', '.join(missing)} did not run in the forward pass")
        activations = [taps.activations[n] for n in model.names]
        # Samples are independent (eval mode), so one backward of the summed targets gives each its own gradient.
        picked = scores.gather(1, chosen[:, None]).sum()
        grads = torch.autograd.grad(picked, activations, allow_unused=True)
        cams = {}
        for name, act, grad in zip(model.names, activations, grads):
            if grad is None:
                raise RuntimeError(f"no gradient reached {name}'s target layer: the head does not use its output")
            weights = grad.mean(dim=(2, 3), keepdim=True)
            cam = F.relu((weights.float() * act.float()).sum(dim=1))  # float32 maps under any autocast precision
            cams[name] = upsample(cam.detach(), tuple(x.shape[-2:])).cpu().numpy().astype(np.float32)
    scores = scores.detach().float()
    return Explanation(scores=scores.cpu().numpy(), probs=torch.softmax(scores, 1).cpu().numpy(),
                       predicted=scores.argmax(1).cpu().numpy(), target=chosen.cpu().numpy(), cams=cams,
                       features=features.detach().float().cpu().numpy())


def package_cam(model: FullModel, x: torch.Tensor, method: str, target: Sequence[int]) -> dict[str, np.ndarray]:
    """Maps from pytorch-grad-cam (min-max normalized per image), one run per backbone's target layer.

    Its hooks are released in a `finally`: pytorch-grad-cam's own `with` block swallows IndexError.
    """
    import pytorch_grad_cam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    cam_class = getattr(pytorch_grad_cam, METHODS[method])
    targets = [ClassifierOutputTarget(int(t)) for t in target]
    cams = {}
    for name, layer in model.cam_layers.items():
        cam = cam_class(model=model, target_layers=[layer])
        try:
            # Frozen parameters: without an input that requires grad no gradient reaches the layer.
            inputs = x.detach().clone().requires_grad_(True)
            with torch.inference_mode(False), torch.enable_grad():
                cams[name] = np.asarray(cam(input_tensor=inputs, targets=targets), dtype=np.float32)
        finally:
            cam.activations_and_grads.release()
    return cams


def explain_batch(model: FullModel, x: torch.Tensor, target: int | None = None, method: str = "gradcam") -> Explanation:
    """Scores, probabilities and one map per backbone for x [B, 3, S, S]; target None = predicted group."""
    if method not in METHODS:
        raise CamError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "gradcam":
        return grad_cam(model, x, target)
    with torch.no_grad():
        scores = model(x.contiguous(memory_format=torch.channels_last)).float()
    chosen = _target_indices(scores, target)
    cams = package_cam(model, x, method, chosen.tolist())
    return Explanation(scores=scores.cpu().numpy(), probs=torch.softmax(scores, 1).cpu().numpy(),
                       predicted=scores.argmax(1).cpu().numpy(), target=chosen.cpu().numpy(), cams=cams)


# --------------------------------------------------------------------------- the cache check


def fp16_logit_tolerance(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """[B, C]: how far each logit can move when every feature moves by one float16 step.

    First-order bound sum_i |d logit_c / d f_i| * ulp16(f_i): the logits of the
    rebuilt model and of the head on cached features may differ by this much
    when the cache's float16 rounding went the other way on every feature.
    """
    with torch.inference_mode(False), torch.enable_grad():
        f = features.detach().float().clone().requires_grad_(True)
        # float16 spacing: 2^(exponent - 10) for normal numbers, 2^-24 below the smallest normal (2^-14).
        ulp = torch.exp2(torch.floor(torch.log2(f.detach().abs().clamp(min=2.0 ** -14))) - 10)
        scores = head(f)
        columns = []
        for c in range(scores.shape[1]):
            (grad,) = torch.autograd.grad(scores[:, c].sum(), f, retain_graph=c + 1 < scores.shape[1])
            columns.append((grad.abs() * ulp).sum(dim=1))
    return torch.stack(columns, dim=1)


def cache_agreement(head: nn.Module, live_scores: np.ndarray, cached_features: np.ndarray) -> dict:
    """Compare the rebuilt model's logits with the head on cached features, per image.

    Returns max abs difference, the per-image tolerance, and which images exceed it.
    """
    cached = torch.from_numpy(np.asarray(cached_features, dtype=np.float32))
    device = next(head.parameters()).device
    with torch.no_grad():
        cached_scores = head(cached.to(device)).float().cpu()
    tolerance = fp16_logit_tolerance(head, cached.to(device)).cpu() + 1e-5
    diff = (torch.from_numpy(np.asarray(live_scores, dtype=np.float32)) - cached_scores).abs()
    ratio = (diff / tolerance).amax(dim=1)
    return {"max_abs_diff": diff.amax(dim=1).numpy(), "tolerance": tolerance.amax(dim=1).numpy(),
            "ratio": ratio.numpy(), "ok": (ratio <= 1.0).numpy(),
            "cached_predicted": cached_scores.argmax(1).numpy()}
