"""Grad-CAM on the full model: frozen backbone(s) -> pooled features -> trained head.

`load_full_model` rebuilds, from a head checkpoint, the model whose logits the
head was trained to produce: the backbone(s) named in the checkpoint with the
same weights id, the featurize preprocessing (`decode.preprocess_rgb`), global
average pooling, `heads.assemble_features`, then the head. On an image its
logits equal the head applied to the image's cached (plain-view) features,
up to the float16 rounding of the cache (`fp16_logit_tolerance`).

`explain_batch` computes one map per backbone at the backbone's registered
target layer (`FrozenBackbone.cam_layer`: MobileNetV2 features[-1], ResNet50
layer4, EfficientNet-B0 features[-1]):

* method "gradcam" is computed here: ReLU(sum_k mean_xy(dy_c/dA_k) * A_k),
  with y_c the target group's score (pre-softmax), upsampled bilinearly to
  the model input (224 x 224), *not* normalized, so maps keep their scale.
  The backbone is frozen (no parameter requires grad), so a forward hook hands
  the target layer's output on as a fresh leaf tensor that requires grad:
  gradients then reach the layer without any backward pass through the rest of
  the backbone, and without touching the frozen parameters or eval mode.
* the other methods ("gradcam++", "layercam", ...) come from pytorch-grad-cam.
  Its maps are min-max normalized to [0, 1] per image. Frozen backbones give
  it no gradient unless the input requires grad, so the input is made to; its
  hooks are released in a `finally` (its `with` block swallows IndexError).

Fusion heads (several backbones) get one map per backbone from one backward
pass: each shows where that backbone's features pushed the fused decision.
Heads on feature kind 'both' (last block + earlier stages) are explained
through the last block only: gradients to the earlier stages' pooled features
bypass the target layer, so the map shows the part of the decision that flows
through the last block. Heads on 'stages' alone never see the last block and
are refused.

Maps are of the plain view only. The head's probabilities shown are those of
the plain view, so they can differ slightly from `evaluate --tta`, which
averages the plain and the mirrored view.

`explain_images` is the command's job for files and folders: one model load
per checkpoint, batches, overlays, optional .npy maps, and a grid figure.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .backbones import FrozenBackbone, create_backbone, resolve_weights_id
from .constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from .dataset import IMAGE_SUFFIXES as DATASET_IMAGE_SUFFIXES, find_images
from .device import resolve_device
from .heads import HeadCheckpoint, assemble_features, load_checkpoint

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
IMAGE_SUFFIXES = tuple(sorted(DATASET_IMAGE_SUFFIXES))


class CamError(ValueError):
    """A checkpoint or request that Grad-CAM cannot serve, with the reason."""


# --------------------------------------------------------------------------- the full model


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

    def head_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """[B, D_total] raw features, in the layout the head was trained on."""
        pooled = {name: self.backbones[name](x) for name in self.names}
        return assemble_features(pooled, self.names, self.feature_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_inputs(x))


def check_preprocessing(recorded: dict | None) -> None:
    """Refuse a checkpoint whose features were made with other preprocessing than decode's."""
    if not recorded:
        return
    problems = []
    if "size" in recorded and int(recorded["size"]) != IMAGE_SIZE:
        problems.append(f"size {recorded['size']} (explain uses {IMAGE_SIZE})")
    for key, ours in (("mean", IMAGENET_MEAN), ("std", IMAGENET_STD)):
        if key in recorded and not np.allclose(recorded[key], ours):
            problems.append(f"{key} {recorded[key]} (explain uses {list(ours)})")
    if "resize" in recorded and recorded["resize"] != "bilinear-antialias":
        problems.append(f"resize {recorded['resize']!r} (explain uses 'bilinear-antialias')")
    if problems:
        raise CamError("the checkpoint's features were made with other preprocessing: " + "; ".join(problems))


def choose_weights(meta: dict, overrides: dict[str, str] | None = None) -> dict[str, str | None]:
    """The weights to rebuild each backbone with: the recorded id, or an override whose id matches it."""
    overrides = overrides or {}
    chosen = {}
    for name in meta["backbones"]:
        recorded = str(meta["weights"][name])
        given = overrides.get(name)
        if given is None:
            if recorded.startswith("file:"):
                raise CamError(f"{name} was featurized with weights from a file ({recorded}); "
                               f"pass --weights {name}=/path/to/that/file")
            given = None if recorded == "none" else recorded
        found = resolve_weights_id(name, given)
        if found != recorded:
            raise CamError(f"{name}: the head was trained on features from weights {recorded!r}; "
                           f"{given!r} has id {found!r}")
        chosen[name] = given
    return chosen


def load_full_model(checkpoint: str | Path | HeadCheckpoint, weights: dict[str, str] | None = None,
                    device: str | torch.device = "cpu") -> tuple[FullModel, HeadCheckpoint]:
    """Rebuild backbone(s) + pooling + head from a head checkpoint (a path or a loaded one).

    Raises CamError when the checkpoint cannot be explained (feature kind
    'stages', other preprocessing, weights that cannot be matched), and
    WeightsUnavailable when the backbone weights cannot be loaded.
    """
    ckpt = checkpoint if isinstance(checkpoint, HeadCheckpoint) else load_checkpoint(checkpoint)
    meta = ckpt.meta
    if meta["feature_kind"] == "stages":
        raise CamError("this head was trained on feature kind 'stages' (pooled earlier stages only): it never "
                       "sees the last block, so a map at the last block would be empty. Explain heads trained "
                       "on 'last' or 'both'.")
    check_preprocessing(meta.get("preprocessing"))
    chosen = choose_weights(meta, weights)
    backbones = {name: create_backbone(name, chosen[name]) for name in meta["backbones"]}
    model = FullModel(backbones, ckpt.head, meta["feature_kind"], meta.get("class_names") or [])
    # channels_last: 1.3-1.9x faster convolutions on CPU and GPU (see extract.BackboneRunner).
    model = model.to(device).to(memory_format=torch.channels_last)
    return model, ckpt


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
            cam = F.relu((weights * act).sum(dim=1))
            cams[name] = upsample(cam.detach(), tuple(x.shape[-2:])).cpu().numpy().astype(np.float32)
    scores = scores.detach().float()
    return Explanation(scores=scores.cpu().numpy(), probs=torch.softmax(scores, 1).cpu().numpy(),
                       predicted=scores.argmax(1).cpu().numpy(), target=chosen.cpu().numpy(), cams=cams,
                       features=features.detach().float().cpu().numpy())


def package_cam(model: FullModel, x: torch.Tensor, method: str, target: Sequence[int]) -> dict[str, np.ndarray]:
    """Maps from pytorch-grad-cam (min-max normalized per image), one run per backbone's target layer."""
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


# --------------------------------------------------------------------------- pictures


def resize_map(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    """One map [h, w] -> [height, width], bilinear."""
    return upsample(torch.from_numpy(np.asarray(cam, np.float32))[None], (height, width))[0].numpy()


def overlay_rgb(rgb: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """HxWx3 uint8: the picture blended with the map (jet colours, scaled to its own maximum)."""
    from matplotlib import colormaps

    cam = np.asarray(cam, np.float32)
    if cam.shape != rgb.shape[:2]:
        cam = resize_map(cam, *rgb.shape[:2])
    top = float(cam.max())
    scaled = cam / top if top > 0 else np.zeros_like(cam)
    colours = colormaps["jet"](np.clip(scaled, 0, 1))[..., :3] * 255.0
    return np.clip((1 - alpha) * rgb.astype(np.float32) + alpha * colours, 0, 255).round().astype(np.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def title_band_height(width: int, lines: int) -> int:
    return lines * (max(10, width // 18) + 3) + 4


def save_overlay(path: Path, rgb: np.ndarray, cam: np.ndarray, title_lines: Sequence[str]) -> Path:
    """PNG of W x (band + H): a title band above the overlay, which keeps the picture's own size.

    The title also goes into the PNG's "Title" text field.
    """
    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    height, width = rgb.shape[:2]
    band = title_band_height(width, len(title_lines))
    canvas = Image.new("RGB", (width, band + height), (255, 255, 255))
    canvas.paste(Image.fromarray(overlay_rgb(rgb, cam)), (0, band))
    draw = ImageDraw.Draw(canvas)
    size = max(10, width // 18)
    for i, line in enumerate(title_lines):
        draw.text((2, 2 + i * (size + 3)), line, fill=(0, 0, 0), font=_font(size))
    info = PngInfo()
    info.add_text("Title", " | ".join(title_lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, "PNG", pnginfo=info)
    return path


@dataclass
class GridCell:
    overlay: np.ndarray   # HxWx3 uint8
    caption: str


def save_grid(path: Path, originals: list[np.ndarray], names: list[str], columns: list[str],
              cells: list[list[GridCell]]) -> Path:
    """Rows are images, the first column the picture, then one overlay per backbone (the paper's Figure 4)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = len(originals), len(columns) + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.3 * rows), squeeze=False)
    for r in range(rows):
        axes[r][0].imshow(originals[r])
        axes[r][0].set_ylabel(names[r][:28], fontsize=7)
        for c in range(cols - 1):
            axes[r][c + 1].imshow(cells[r][c].overlay)
            axes[r][c + 1].set_xlabel(cells[r][c].caption, fontsize=8)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("image", fontsize=9)
    for c, column in enumerate(columns):
        axes[0][c + 1].set_title(column, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- reading pictures


def list_images(inputs: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files as given, folders expanded to their .jpg/.jpeg/.png files (recursively, as featurize does).

    Returns (paths, problems) where problems are (input, reason) for inputs that do not exist.
    """
    paths, problems = [], []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            found = find_images(item)
            if not found:
                problems.append((str(item), "folder holds no .jpg, .jpeg or .png files"))
            paths += found
        elif item.exists():
            paths.append(item)
        else:
            problems.append((str(item), "no such file or folder"))
    return paths, problems


def read_pictures(paths: Sequence[Path]) -> tuple[list[int], list[np.ndarray], list[tuple[str, str]]]:
    """(positions that loaded, HxWx3 uint8 pictures, (path, reason) failures), with featurize's file checks."""
    from .decode import encoded_problem, load_rgb

    kept, pictures, failures = [], [], []
    for position, path in enumerate(paths):
        try:
            problem = encoded_problem(np.fromfile(path, dtype=np.uint8))
            if problem:
                raise ValueError(problem)
            pictures.append(load_rgb(path))
            kept.append(position)
        except Exception as err:  # one bad file must not stop the others
            failures.append((str(path), f"cannot read image: {err}"))
    return kept, pictures, failures


def to_model_input(pictures: list[np.ndarray], device: torch.device) -> torch.Tensor:
    from .decode import preprocess_rgb

    return preprocess_rgb(pictures, device=device)


# --------------------------------------------------------------------------- the explain job


@dataclass
class Column:
    """One map per image: a checkpoint and one of its backbones."""
    label: str
    model_index: int
    backbone: str


def checkpoint_labels(metas: list[dict], paths: list[Path]) -> list[str]:
    """Backbone name(s) per checkpoint; the checkpoint's folder name is added where two would clash."""
    base = ["+".join(m["backbones"]) for m in metas]
    labels = []
    for label, path in zip(base, paths):
        if base.count(label) > 1:
            folder = Path(path) if Path(path).is_dir() else Path(path).parent
            label = f"{label}-{folder.name}"
        labels.append(label)
    return labels


def columns_for(labels: list[str], metas: list[dict]) -> list[Column]:
    columns = []
    for index, (label, meta) in enumerate(zip(labels, metas)):
        for name in meta["backbones"]:
            text = label if len(meta["backbones"]) == 1 else f"{label}:{name}"
            columns.append(Column(text, index, name))
    return columns


def image_key(path: Path) -> str:
    """The file name without its image suffixes: 1_0_0_2017...jpg.chip.jpg -> 1_0_0_2017..."""
    name = path.name
    while True:
        stem, dot, suffix = name.rpartition(".")
        if dot and ("." + suffix.lower()) in IMAGE_SUFFIXES + (".chip",):
            name = stem
        else:
            return name or path.name


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_+." else "_" for ch in text)


@dataclass
class ExplainConfig:
    inputs: list[Path]
    checkpoints: list[Path]
    out_dir: Path
    target: str = "predicted"
    method: str = "gradcam"
    save_npy: bool = False
    batch_size: int = 16
    device: str = "auto"
    weights: dict[str, str] = field(default_factory=dict)
    grid_rows: int = 20


def load_models(checkpoints: Sequence[Path], weights: dict[str, str], device: torch.device,
                target: str | None = None, settings: dict | None = None
                ) -> tuple[list[FullModel], list[HeadCheckpoint], int | None]:
    """One full model per checkpoint, and the target group index (None: predicted).

    Everything cheap is checked before any backbone is built: the heads agree
    on their groups, the target names one, the weights can be matched, and
    (given a feature file's `settings`) the heads fit those features.
    """
    ckpts = [load_checkpoint(path) for path in checkpoints]
    if settings is not None:
        for ckpt in ckpts:
            ckpt.check_compatible(settings)  # HeadMismatch names what differs
    names = [tuple(c.meta.get("class_names") or []) for c in ckpts]
    if len(set(names)) > 1:
        raise CamError(f"the checkpoints predict different groups: {sorted(set(names))}")
    chosen = resolve_target(target, names[0])
    for ckpt in ckpts:
        choose_weights(ckpt.meta, weights)
    models = [load_full_model(ckpt, weights, device)[0] for ckpt in ckpts]
    return models, ckpts, chosen


def explain_images(config: ExplainConfig, log: Callable[[str], None] = print,
                   warn: Callable[[str], None] = print) -> dict:
    """Explain every picture with every checkpoint; write overlays (+ .npy), a grid and an index CSV.

    Pictures that cannot be read are reported through `warn` and skipped; the
    rest are explained. Returns {explained, failures, files}.
    """
    device = resolve_device(config.device)
    if config.method not in METHODS:
        raise CamError(f"unknown method {config.method!r}; choose from {', '.join(METHODS)}")
    paths, failures = list_images(config.inputs)
    for path, reason in failures:
        warn(f"error: {path}: {reason}")
    if not paths:
        raise CamError("no images to explain")
    models, ckpts, target = load_models(config.checkpoints, config.weights, device, config.target)
    class_names = list(ckpts[0].meta.get("class_names") or [])
    labels = checkpoint_labels([c.meta for c in ckpts], list(config.checkpoints))
    columns = columns_for(labels, [c.meta for c in ckpts])
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log(f"explaining {len(paths)} image(s) with {', '.join(labels)} ({config.method}, "
        f"target {config.target}) on {device}")

    used_keys: dict[str, int] = {}
    index_rows, files = [], []
    grid_pictures, grid_names, grid_cells = [], [], []
    explained = 0
    for start in range(0, len(paths), config.batch_size):
        batch_paths = paths[start:start + config.batch_size]
        kept, pictures, bad = read_pictures(batch_paths)
        for path, reason in bad:
            warn(f"error: {path}: {reason}")
        failures += bad
        if not kept:
            continue
        x = to_model_input(pictures, device)
        results = [explain_batch(model, x, target, config.method) for model in models]
        for i, position in enumerate(kept):
            path = batch_paths[position]
            key = image_key(path)
            used_keys[key] = used_keys.get(key, 0) + 1
            if used_keys[key] > 1:
                key = f"{key}-{used_keys[key]}"
            rgb = pictures[i]
            row_cells = []
            for column in columns:
                result = results[column.model_index]
                pred, tgt = int(result.predicted[i]), int(result.target[i])
                probs = result.probs[i]
                cam = resize_map(result.cams[column.backbone][i], *rgb.shape[:2])
                lines = [column.label, f"pred {class_names[pred]}  p={probs[pred]:.2f}"]
                if tgt != pred:
                    lines.append(f"map for {class_names[tgt]}  p={probs[tgt]:.2f}")
                stem = f"{key}_{_safe(column.label)}_{_safe(config.method)}"
                png = save_overlay(out / f"{stem}.png", rgb, cam, lines)
                files.append(png)
                npy = ""
                if config.save_npy:
                    npy = out / f"{stem}.npy"
                    np.save(npy, cam.astype(np.float32))
                    files.append(npy)
                index_rows.append({"image": str(path), "model": column.label, "backbone": column.backbone,
                                   "predicted": class_names[pred], "probability": f"{probs[pred]:.4f}",
                                   "target": class_names[tgt], "target_probability": f"{probs[tgt]:.4f}",
                                   "overlay": png.name, "npy": Path(npy).name if npy else ""})
                if len(grid_pictures) < config.grid_rows:
                    caption = f"{class_names[pred]} {probs[pred]:.2f}"
                    row_cells.append(GridCell(overlay_rgb(rgb, cam), caption))
            if len(grid_pictures) < config.grid_rows:
                grid_pictures.append(rgb)
                grid_names.append(path.name)
                grid_cells.append(row_cells)
            explained += 1
        log(f"  {min(start + config.batch_size, len(paths))}/{len(paths)}")

    if index_rows:
        index_path = out / "explanations.csv"
        with open(index_path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(index_rows[0]))
            writer.writeheader()
            writer.writerows(index_rows)
        files.append(index_path)
    if len(columns) > 1 and grid_pictures:
        grid = save_grid(out / f"grid_{_safe(config.method)}.png", grid_pictures, grid_names,
                         [c.label for c in columns], grid_cells)
        files.append(grid)
        if explained > len(grid_pictures):
            log(f"grid shows the first {len(grid_pictures)} of {explained} images (--grid-rows)")
    return {"explained": explained, "failures": failures, "files": files}
