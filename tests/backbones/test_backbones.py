"""The backbone registry: widths, frozen eval mode, Grad-CAM layer, weights errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torchvision

from pipeline.backbones.registry import (
    REGISTRY,
    WeightsUnavailable,
    create_backbone,
    fuse_conv_bn,
    parse_backbones,
)
from tests.support.paths import real_data_reason


@pytest.mark.parametrize("name", list(REGISTRY))
def test_output_widths_and_frozen(name):
    model = create_backbone(name, None)
    spec = REGISTRY[name]
    model.train()  # frozen: must stay in eval mode whatever the caller does
    assert not model.training and not any(m.training for m in model.modules())
    assert not any(p.requires_grad for p in model.parameters())
    with torch.inference_mode():
        out = model(torch.randn(2, 3, 224, 224))
    assert list(out) == list(model.output_names) == ["features", "stages"]
    assert out["features"].shape == (2, spec.feature_width)
    assert out["stages"].shape == (2, spec.stages_width)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_pooled_equals_torchvision_classifier_input(name):
    """The pooled features are exactly what torchvision feeds its classifier."""
    model = create_backbone(name, None)
    captured = {}
    classifier = model.model.fc if name == "resnet50" else model.model.classifier
    handle = classifier.register_forward_pre_hook(lambda _, args: captured.setdefault("x", args[0]))
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        model.model(x)
        pooled = model(x)["features"]
    handle.remove()
    torch.testing.assert_close(pooled, captured["x"], rtol=1e-5, atol=1e-5)


def test_cam_layer_is_last_conv_block():
    mnv2 = create_backbone("mobilenet_v2", None)
    assert mnv2.cam_layer is mnv2.model.features[-1]
    r50 = create_backbone("resnet50", None)
    assert r50.cam_layer is r50.model.layer4
    eff = create_backbone("efficientnet_b0", None)
    assert eff.cam_layer is eff.model.features[-1]


def test_random_init_is_the_same_everywhere_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = create_backbone("mobilenet_v2", None)
    after = torch.rand(1)
    b = create_backbone("mobilenet_v2", None)
    assert torch.equal(before, after)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_channels_last_changes_features_only_by_float_rounding():
    model = create_backbone("mobilenet_v2", None)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        plain = model(x)
        fast = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert list(plain) == list(fast)
    for key in plain:
        torch.testing.assert_close(plain[key], fast[key], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["mobilenet_v2", "resnet50"])
def test_folding_batchnorm_changes_features_only_by_float_rounding(name):
    model = create_backbone(name, None)
    # Give BatchNorm non-trivial statistics, or folding would be an identity.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        reference = model(x)
        fused = fuse_conv_bn(model)(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for key, a in reference.items():
        torch.testing.assert_close(fused[key], a, rtol=1e-4, atol=1e-4 * a.abs().max().item())


def test_parse_backbones():
    assert parse_backbones("resnet50, mobilenet_v2") == ("resnet50", "mobilenet_v2")
    with pytest.raises(ValueError, match="unknown backbone 'vgg16'"):
        parse_backbones("vgg16")
    with pytest.raises(ValueError, match="twice"):
        parse_backbones("resnet50,resnet50")


def test_weights_from_state_dict_file(tmp_path):
    source = create_backbone("mobilenet_v2", None)
    torch.manual_seed(5)
    with torch.no_grad():
        source.model.classifier[1].weight.normal_()
    path = tmp_path / "mine.pth"
    torch.save(source.model.state_dict(), path)
    loaded = create_backbone("mobilenet_v2", str(path))
    assert loaded.weights_id.startswith("file:mine.pth:sha256=")
    assert torch.equal(loaded.model.classifier[1].weight, source.model.classifier[1].weight)


def test_weights_errors_are_readable(tmp_path, monkeypatch):
    with pytest.raises(WeightsUnavailable, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        create_backbone("resnet50", "IMAGENET9K")
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        create_backbone("resnet50", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(create_backbone("mobilenet_v2", None).model.state_dict(), wrong)
    with pytest.raises(WeightsUnavailable, match="not a resnet50 state dict"):
        create_backbone("resnet50", str(wrong))

    # An offline machine without the cached file: the message says how to fix it.
    def offline(weights=None):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    spec = REGISTRY["resnet50"]
    monkeypatch.setitem(REGISTRY, "resnet50", dataclasses.replace(spec, builder=offline))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsUnavailable) as info:
        create_backbone("resnet50", "IMAGENET1K_V1")
    message = str(info.value)
    assert "resnet50-0676ba61.pth" in message and "TORCH_HOME" in message and "--weights" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message


@pytest.mark.skipif(real_data_reason() is not None, reason=str(real_data_reason()))
@pytest.mark.parametrize("name", list(REGISTRY))
def test_real_weights_load_offline_and_classify(name):
    """The ImageNet weights load from TORCH_HOME and give a confident class for a real photo-like input."""
    from pipeline.images.views import load_rgb, preprocess_rgb
    from tests.support.paths import REAL_IMAGES

    model = create_backbone(name, "IMAGENET1K_V1")
    assert model.weights_id == "IMAGENET1K_V1"
    image = preprocess_rgb([load_rgb(sorted(REAL_IMAGES.glob("30_*"))[0])])
    with torch.inference_mode():
        probs = model.model(image).softmax(-1)
    assert probs.max() > 0.05  # random init gives ~0.001 per class
    assert isinstance(model.model, torchvision.models.ResNet) == (name == "resnet50")
