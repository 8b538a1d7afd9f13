"""Registry of frozen ImageNet backbones: name -> model, widths, Grad-CAM layer.

Every backbone is made through `create_backbone(name, weights, descriptors=())`,
which returns a `FrozenBackbone`: an eval-mode module whose forward returns a
dict of plain tensors, in the order of `backbone.output_names`:
  "features"  the globally average-pooled output of the last conv stage (the paper's)
  "stages"    from the same pass, the pooled outputs of the earlier resolution stages
  then one entry per requested descriptor (descriptors.py: gem, grid, stage_grid).
Plain tensors keyed by name, so an ONNX export can use the keys as output names.
Adding a backbone means adding one `BackboneSpec` to `REGISTRY`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn

from pipeline.backbones.descriptors import compute as compute_descriptors
from pipeline.backbones.descriptors import descriptor_width, parse_descriptors


class WeightsUnavailable(RuntimeError):
    """Pretrained weights could not be loaded (offline, missing file, bad enum)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    builder: Callable[..., nn.Module]   # torchvision.models constructor
    weights_enum: type                  # torchvision weights enum class
    feature_width: int                  # width of the final pooled features
    stage_widths: tuple[int, ...]       # widths of the earlier stages' pooled outputs
    stage_indices: tuple[int, ...]      # where those stages end: indices into `features`, or ResNet layer numbers
    cam_layer: str                      # attribute path of the Grad-CAM target layer
    layout: str = "features"            # "features": a torchvision `features` Sequential; "resnet": stem + layer1..4

    @property
    def stages_width(self) -> int:
        return sum(self.stage_widths)


# Stage ends are the last block at each spatial resolution before the final one
# (112, 56, 28, 14 and, for the inverted-residual nets, the 7x7 blocks before the
# 1x1 head conv). Age lives in texture as well as shape, so heads can use these.
REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            name="mobilenet_v2",
            builder=torchvision.models.mobilenet_v2,
            weights_enum=torchvision.models.MobileNet_V2_Weights,
            feature_width=1280,
            stage_widths=(16, 24, 32, 96, 320),
            stage_indices=(1, 3, 6, 13, 17),
            cam_layer="features.18",
        ),
        BackboneSpec(
            name="resnet50",
            builder=torchvision.models.resnet50,
            weights_enum=torchvision.models.ResNet50_Weights,
            feature_width=2048,
            stage_widths=(256, 512, 1024),
            stage_indices=(1, 2, 3),  # layer1..layer3
            cam_layer="layer4",
            layout="resnet",
        ),
        BackboneSpec(
            name="efficientnet_b0",
            builder=torchvision.models.efficientnet_b0,
            weights_enum=torchvision.models.EfficientNet_B0_Weights,
            feature_width=1280,
            stage_widths=(16, 24, 40, 112, 320),
            stage_indices=(1, 2, 3, 5, 7),
            cam_layer="features.8",
        ),
    )
}

DEFAULT_BACKBONES = tuple(REGISTRY)
DEFAULT_WEIGHTS = "IMAGENET1K_V1"


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(REGISTRY)}") from None


def parse_backbones(text: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """'a,b' or ['a', 'b'] -> validated tuple of names, order kept, no repeats."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    for name in names:
        get_spec(name)
    if len(set(names)) != len(names):
        raise ValueError(f"backbone listed twice in {names}")
    return tuple(names)


def _pool(x: torch.Tensor) -> torch.Tensor:
    return x.float().mean(dim=(2, 3))


class FrozenBackbone(nn.Module):
    """A torchvision classifier reduced to its pooled features, frozen.

    forward(x) -> {"features": [B, feature_width], "stages": [B, stages_width],
    <descriptor>: [B, width], ...} in the order of `output_names`.
    `cam_layer` is the module whose activations Grad-CAM uses.
    """

    def __init__(self, spec: BackboneSpec, model: nn.Module, weights_id: str, descriptors=()):
        super().__init__()
        self.spec = spec
        self.weights_id = weights_id
        self.descriptors = parse_descriptors(descriptors)
        self.model = model
        self.model.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("features", "stages") + self.descriptors

    @property
    def output_widths(self) -> dict[str, int]:
        return output_widths(self.spec, self.descriptors)

    def with_descriptors(self, descriptors) -> "FrozenBackbone":
        """This backbone (the same module, weights shared, not copied) returning these descriptors too."""
        wanted = parse_descriptors(tuple(self.descriptors) + tuple(parse_descriptors(descriptors)))
        if wanted == self.descriptors:
            return self
        return FrozenBackbone(self.spec, self.model, self.weights_id, wanted)

    @property
    def cam_layer(self) -> nn.Module:
        # Looked up, not stored: storing it would register the layer twice in state_dict.
        return self.model.get_submodule(self.spec.cam_layer)

    def train(self, mode: bool = True):
        # Frozen means BatchNorm statistics never move, whatever the caller does.
        return super().train(False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.spec.layout == "resnet":
            last, stage_maps = self._maps_resnet(x)
        else:
            last, stage_maps = self._maps_sequential(x)
        out = {"features": _pool(last), "stages": torch.cat([_pool(m) for m in stage_maps], dim=1)}
        out.update(compute_descriptors(self.descriptors, last, stage_maps[-1]))
        return out

    def _maps_sequential(self, x):
        """(last block's map, [each earlier stage's map])."""
        stage_maps = []
        for i, block in enumerate(self.model.features):
            x = block(x)
            if i in self.spec.stage_indices:
                stage_maps.append(x)
        return x, stage_maps

    def _maps_resnet(self, x):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        stage_maps = []
        for number, layer in enumerate((m.layer1, m.layer2, m.layer3, m.layer4), start=1):
            x = layer(x)
            if number in self.spec.stage_indices:
                stage_maps.append(x)
        return x, stage_maps


def output_widths(spec: BackboneSpec, descriptors=()) -> dict[str, int]:
    """{output name: width} of a backbone with these descriptors, in output order."""
    widths = {"features": spec.feature_width, "stages": spec.stages_width}
    widths.update({d: descriptor_width(spec, d) for d in parse_descriptors(descriptors)})
    return widths


def fuse_conv_bn(module: nn.Module) -> nn.Module:
    """Fold each eval-mode BatchNorm into the conv registered just before it, in place.

    In these torchvision models a BatchNorm always directly follows its conv in
    registration order. Folding changes outputs only by float rounding and makes
    the CPU forward faster (BatchNorm is a memory-bound pass of its own).
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for parent in list(module.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, norm = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d):
                parent._modules[first] = fuse_conv_bn_eval(conv, norm)
                parent._modules[second] = nn.Identity()
    return module


def is_weights_file(weights) -> bool:
    return weights is not None and (Path(str(weights)).suffix in {".pth", ".pt", ".bin", ".safetensors"}
                                    or Path(str(weights)).exists())


def resolve_weights_id(name: str, weights: str | None) -> str:
    """The id that create_backbone would record, without building the model."""
    spec = get_spec(name)
    if weights is None or str(weights).lower() == "none":
        return "none"
    if is_weights_file(weights):
        if not Path(weights).is_file():
            raise WeightsUnavailable(f"{name}: weights file {weights} does not exist")
        return weights_file_id(Path(weights))
    if str(weights) not in spec.weights_enum.__members__:
        options = ", ".join(m.name for m in spec.weights_enum)
        raise WeightsUnavailable(
            f"{name}: unknown weights {weights!r}; use one of {options}, or a path to a state-dict file")
    return str(weights)


def create_backbone(name: str, weights: str | None = DEFAULT_WEIGHTS, descriptors=()) -> FrozenBackbone:
    """Build a frozen backbone.

    weights: a weights-enum member name (e.g. "IMAGENET1K_V1"), a path to a
    local state-dict file, or None / "none" for random init (tests).
    descriptors: extra outputs (descriptors.DESCRIPTORS) computed in the same pass.
    """
    spec = get_spec(name)
    if weights is None or str(weights).lower() == "none":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random-init models are the same in every process
            model = spec.builder(weights=None)
        return FrozenBackbone(spec, model, "none", descriptors)
    weights_id = resolve_weights_id(name, weights)
    if is_weights_file(weights):
        return FrozenBackbone(spec, _model_from_file(spec, Path(weights)), weights_id, descriptors)
    enum_member = spec.weights_enum[weights_id]
    try:
        model = spec.builder(weights=enum_member)
    except Exception as err:  # offline, blocked download, corrupt cache
        raise WeightsUnavailable(weights_help(name, enum_member, err)) from err
    return FrozenBackbone(spec, model, enum_member.name, descriptors)


def _model_from_file(spec: BackboneSpec, path: Path) -> nn.Module:
    if not path.is_file():
        raise WeightsUnavailable(f"{spec.name}: weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsUnavailable(f"{spec.name}: cannot read weights file {path}: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    model = spec.builder(weights=None)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise WeightsUnavailable(f"{spec.name}: {path} is not a {spec.name} state dict: {err}") from err
    return model


def weights_file_id(path: Path) -> str:
    """Identify a weights file by content, so a renamed copy still matches."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return f"file:{path.name}:sha256={digest}"


def weights_help(name: str, enum_member, err: Exception) -> str:
    import os

    cache = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    filename = Path(enum_member.url).name
    return (
        f"cannot load {name} weights {enum_member.name} ({type(err).__name__}: {err}).\n"
        f"torchvision looks for {cache / filename} and otherwise downloads {enum_member.url}.\n"
        f"Offline? Put that file there, or set TORCH_HOME to a folder holding hub/checkpoints/{filename}\n"
        f"(on the project's machines: export TORCH_HOME=$PWD/../shared/torch),\n"
        f"or pass --weights /path/to/{name}_state_dict.pth."
    )


class RebuildError(ValueError):
    """The checkpoint's features cannot be reproduced here (preprocessing or weights), with the reason."""


def choose_weights(meta: dict, overrides: dict[str, str] | None = None) -> dict[str, str | None]:
    """The weights to rebuild each backbone with: the recorded id, or an override whose id matches it."""
    overrides = overrides or {}
    chosen = {}
    for name in meta["backbones"]:
        recorded = str(meta["weights"][name])
        given = overrides.get(name)
        if given is None:
            if recorded.startswith("file:"):
                raise RebuildError(f"{name} was featurized with weights from a file ({recorded}); "
                                   f"pass --weights {name}=/path/to/file")
            given = None if recorded == "none" else recorded
        found = resolve_weights_id(name, given)
        if found != recorded:
            raise RebuildError(f"{name}: the head was trained on features from weights {recorded!r}; "
                               f"{given!r} has id {found!r}")
        chosen[name] = given
    return chosen
