"""Grad-CAM on the full model, the cache check, overlays, the explain command and the report metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from torch import nn

from pipeline.backbones.registry import BackboneSpec, FrozenBackbone, RebuildError
from pipeline.explain.attribution import (
    FACE_REGION,
    FaceRegion,
    curve_auc,
    deletion_curves,
    deletion_order,
    face_focus,
    random_map,
    summarize,
)
from pipeline.explain.cam import (
    CamError,
    cache_agreement,
    explain_batch,
    grad_cam,
    require_last_block,
    resolve_target,
)
from pipeline.explain.job import image_key, read_pictures, to_model_input
from pipeline.explain.overlays import overlay_rgb, title_band_height
from pipeline.heads.checkpoint import save_checkpoint
from pipeline.heads.model import AgeHead
from pipeline.inference.full_model import FullModel, load_full_model
from tests.support.imagefactory import (
    asymmetric_rgb,
    write_garbage,
    write_jpeg,
    write_png,
    write_truncated_jpeg,
)

UTKFACE = Path(__file__).resolve().parents[3] / "shared" / "data" / "utkface"
CLASSES = ["0-25", "26-50", "51-75", "76-116"]


# --------------------------------------------------------------------------- a tiny model


class TinyNet(nn.Module):
    """Shaped like the torchvision nets FrozenBackbone expects: a `features` Sequential."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.Conv2d(5, 6, 3, stride=2, padding=1))


def tiny_model(kind: str = "last", seed: int = 0) -> FullModel:
    torch.manual_seed(seed)
    spec = BackboneSpec(name="tiny", builder=TinyNet, weights_enum=None, feature_width=6, stage_widths=(5,),
                        stage_indices=(1,), cam_layer="features.2")
    backbone = FrozenBackbone(spec, TinyNet(), "none")
    width = 6 if kind == "last" else 11
    head = AgeHead(width, hidden=(8,), dropout=0.3)
    head.feature_mean.normal_()
    head.feature_std.uniform_(0.5, 2.0)
    for p in head.parameters():
        p.data.normal_()
    return FullModel({"tiny": backbone}, head.eval(), kind, CLASSES)


def independent_grad_cam(model: FullModel, x: torch.Tensor, target=None):
    """Textbook Grad-CAM by hand: autograd to the layer's activation, no hooks."""
    net = model.backbones["tiny"].model
    x = x.clone().requires_grad_(True)  # frozen weights: the graph comes from the input
    early = net.features[1](net.features[0](x))
    activation = net.features[2](early)
    activation.retain_grad()
    parts = {"last": [activation.mean((2, 3))], "both": [activation.mean((2, 3)), early.mean((2, 3))]}
    scores = model.head(torch.cat(parts[model.feature_kind], dim=1))
    chosen = scores.argmax(1) if target is None else torch.full((len(x),), target)
    scores[torch.arange(len(x)), chosen].sum().backward()
    weights = activation.grad.mean(dim=(2, 3))
    cam = torch.relu((weights[:, :, None, None] * activation).sum(1))
    return F.interpolate(cam[:, None], size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0].detach(), chosen


@pytest.mark.parametrize("kind", ["last", "both"])
def test_grad_cam_matches_independent_computation(kind):
    model = tiny_model(kind)
    x = torch.randn(5, 3, 24, 20)
    result = grad_cam(model, x)
    expected, chosen = independent_grad_cam(model, x)
    assert result.cams["tiny"].shape == (5, 24, 20)
    assert np.array_equal(result.target, chosen.numpy())
    assert result.cams["tiny"].max() > 0
    np.testing.assert_allclose(result.cams["tiny"], expected.numpy(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(result.scores, model(x).numpy(), rtol=1e-5, atol=1e-6)


def test_fusion_head_gets_one_map_per_backbone():
    torch.manual_seed(1)
    specs = [BackboneSpec(name=n, builder=TinyNet, weights_enum=None, feature_width=6, stage_widths=(5,),
                          stage_indices=(1,), cam_layer="features.2") for n in ("left", "right")]
    backbones = {s.name: FrozenBackbone(s, TinyNet(), "none") for s in specs}
    head = AgeHead(12, hidden=(8,)).eval()
    model = FullModel(backbones, head, "last", CLASSES)
    x = torch.randn(3, 3, 16, 16, requires_grad=True)
    activations = {n: b.model.features[2](b.model.features[1](b.model.features[0](x))) for n, b in backbones.items()}
    for a in activations.values():
        a.retain_grad()
    scores = head(torch.cat([activations[n].mean((2, 3)) for n in ("left", "right")], dim=1))
    chosen = scores.argmax(1)
    scores[torch.arange(3), chosen].sum().backward()
    result = grad_cam(model, x.detach())
    assert set(result.cams) == {"left", "right"}
    for name, a in activations.items():
        cam = torch.relu((a.grad.mean((2, 3))[:, :, None, None] * a).sum(1))
        expected = F.interpolate(cam[:, None], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
        np.testing.assert_allclose(result.cams[name], expected.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(result.cams["left"], result.cams["right"])


def test_grad_cam_agrees_with_pytorch_grad_cam_up_to_its_normalization():
    pytest.importorskip("pytorch_grad_cam")
    model = tiny_model()
    x = torch.randn(4, 3, 24, 24)
    ours = grad_cam(model, x).cams["tiny"]
    theirs = explain_batch(model, x, method="gradcam++")  # runs the package path end to end
    assert theirs.cams["tiny"].shape == ours.shape
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    predicted = grad_cam(model, x).predicted
    cam = GradCAM(model=model, target_layers=[model.cam_layers["tiny"]])
    try:
        package = cam(input_tensor=x.clone().requires_grad_(True),
                      targets=[ClassifierOutputTarget(int(t)) for t in predicted])
    finally:
        cam.activations_and_grads.release()
    for mine, pkg in zip(ours, package):
        if mine.max() > 0:  # the package min-max normalizes each map
            scaled = (mine - mine.min()) / (mine.max() - mine.min())
            np.testing.assert_allclose(pkg, scaled, atol=2e-3)


def test_target_group_selection():
    model = tiny_model(seed=3)
    x = torch.randn(6, 3, 16, 16)
    predicted = grad_cam(model, x).predicted
    other = int((np.bincount(predicted, minlength=4).argmax() + 1) % 4)  # a group most images did not get
    result = explain_batch(model, x, target=other)
    assert (result.target == other).all()
    assert np.array_equal(result.predicted, predicted)
    expected, _ = independent_grad_cam(model, x, target=other)
    np.testing.assert_allclose(result.cams["tiny"], expected.numpy(), rtol=1e-5, atol=1e-6)
    differs = predicted != other
    assert differs.any()
    assert not np.allclose(result.cams["tiny"][differs], grad_cam(model, x).cams["tiny"][differs])
    assert resolve_target("predicted", CLASSES) is None
    assert resolve_target("51-75", CLASSES) == 2
    assert resolve_target("3", CLASSES) == 3
    for bad in ("4", "30-40", "-1"):
        with pytest.raises(CamError, match="unknown target group"):
            resolve_target(bad, CLASSES)


def test_hooks_released_and_model_stays_frozen_even_on_error():
    model = tiny_model()
    layer = model.cam_layers["tiny"]
    x = torch.randn(2, 3, 16, 16)
    model.train()  # must not unfreeze anything
    assert not model.training and not model.head.training
    grad_cam(model, x)
    with pytest.raises(RuntimeError):
        grad_cam(model, x, target=[0, 9])  # index out of range inside the hooked pass
    assert len(layer._forward_hooks) == 0
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    with torch.inference_mode():  # callers in inference mode still get gradients
        assert grad_cam(model, x).cams["tiny"].shape == (2, 16, 16)


def test_stages_heads_are_refused():
    meta = {"feature_kind": "stages", "backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "none"}}
    with pytest.raises(CamError, match="stages"):
        require_last_block(meta)


# --------------------------------------------------------------------------- the real pipeline


def _faces(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = asymmetric_rgb(200, 200).astype(np.int16) + rng.integers(-40, 40, (200, 200, 3))
        paths.append(write_jpeg(folder / f"{10 + 25 * i}_{i % 2}_0_2017010{i}000000000.jpg.chip.jpg",
                                np.clip(base, 0, 255).astype(np.uint8)))
    return paths


def _calibrated_mobilenet(path: Path, pictures: list[Path]) -> Path:
    """Random-init MobileNetV2 whose BatchNorm statistics are set on the test pictures, saved as a state dict.

    Plain random init shrinks activations layer by layer (pooled features ~1e-8,
    zero in float16); calibrated statistics keep them near unit scale, and the
    net is 13x cheaper than ResNet50.
    """
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(weights=None)
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = None  # cumulative average: one batch sets the statistics
    _, rgb, _ = read_pictures(pictures)
    net.train()
    with torch.no_grad():
        net(to_model_input(rgb, torch.device("cpu")))
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """A feature file made by featurize from a weights file, and two head checkpoints on it."""
    from pipeline.features.extract import FeaturizeConfig, run
    from pipeline.features.read import read_features, read_meta, read_settings

    root = tmp_path_factory.mktemp("cam")
    data = root / "faces"
    pictures = _faces(data, 4)
    weights = _calibrated_mobilenet(root / "mobilenet_v2_test.pth", pictures)
    features = root / "features.h5"
    run(FeaturizeConfig(data_dir=data, out=features, backbones=("mobilenet_v2",),
                        weights={"mobilenet_v2": str(weights)}, batch_size=4, device="cpu", decoder="torch"),
        log=lambda *_: None)
    settings, meta = read_settings(features), read_meta(features)
    cache = read_features(features, "mobilenet_v2", "last")
    assert np.abs(cache).max() > 0.1  # features far from float16 underflow
    torch.manual_seed(0)
    head = AgeHead(1280)
    head.feature_mean.copy_(torch.from_numpy(cache[:, 0].mean(0)))
    head.feature_std.copy_(torch.from_numpy(cache[:, 0].std(0) + 1e-3))
    checkpoints = []
    for name in ("a", "b"):
        checkpoints.append(save_checkpoint(root / f"head_{name}", head, {
            "backbones": ["mobilenet_v2"], "weights": settings["weights"], "feature_kind": "last",
            "group_edges": settings["group_edges"], "class_names": CLASSES, "target": "group",
            "feature_fingerprint": settings["fingerprint"], "preprocessing": settings["preprocessing"],
            "feature_dim": 1280, "hidden": [512, 256], "config": {}, "history": [], "best_epoch": 0}))
    return {"root": root, "data": data, "features": features, "meta": meta, "cache": cache,
            "checkpoints": checkpoints, "weights": {"mobilenet_v2": str(weights)}}


@pytest.mark.slow
def test_rebuilt_model_equals_head_on_cached_features(cached):
    with pytest.raises(RebuildError, match="--weights mobilenet_v2="):
        load_full_model(cached["checkpoints"][0])
    with pytest.raises(RebuildError, match="has id"):
        load_full_model(cached["checkpoints"][0], weights={"mobilenet_v2": "IMAGENET1K_V1"})
    model, ckpt = load_full_model(cached["checkpoints"][0], weights=cached["weights"], device="cpu")
    assert all(not p.requires_grad for p in model.parameters())
    paths = [cached["data"] / p for p in cached["meta"]["path"]]
    kept, pictures, failures = read_pictures(paths)
    assert not failures and kept == list(range(len(paths)))
    result = explain_batch(model, to_model_input(pictures, torch.device("cpu")))
    plain = cached["cache"][:, 0]
    # Features: the cache is the float16 rounding of what the rebuilt backbone computes.
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(result.features), 2.0 ** -14))) - 10)
    assert (np.abs(result.features - plain) <= ulp).all()
    check = cache_agreement(model.head, result.scores, plain)
    assert check["ok"].all(), check
    assert np.array_equal(check["cached_predicted"], result.predicted)
    # The check can fail: the mirrored view's features are not this image's plain view.
    mirrored = cache_agreement(model.head, result.scores, cached["cache"][:, 1])
    assert not mirrored["ok"].any()


def test_explain_command_writes_overlays_npy_grid_and_survives_bad_files(cached):
    from pipeline.cli.explain import main

    folder = cached["root"] / "mixed"
    good = _faces(folder, 2)
    write_png(folder / "small.png", asymmetric_rgb(60, 90))
    write_truncated_jpeg(folder / "cut.jpg", asymmetric_rgb())
    write_garbage(folder / "noise.jpg")
    out = cached["root"] / "out"
    a, b = (str(c) for c in cached["checkpoints"])
    result = CliRunner().invoke(main, [str(folder), "-c", a, "-c", b, "-o", str(out), "--save-npy",
                                       "--device", "cpu", "--batch-size", "2",
                                       "--weights", f"mobilenet_v2={cached['weights']['mobilenet_v2']}"])
    assert result.exit_code == 3, result.output  # finished, some inputs skipped (pipeline/cli/exit_codes.py)
    assert "cut.jpg" in result.output and "truncated" in result.output
    assert "noise.jpg" in result.output and "not a JPEG or PNG" in result.output
    assert "explained 3 image(s)" in result.output
    for picture in good + [folder / "small.png"]:
        rgb = np.asarray(Image.open(picture).convert("RGB"))
        height, width = rgb.shape[:2]
        for label in ("mobilenet_v2-head_a", "mobilenet_v2-head_b"):
            png = out / f"{image_key(picture)}_{label}_gradcam.png"
            with Image.open(png) as image:
                band = title_band_height(width, 2)
                assert image.size == (width, height + band)
                assert image.text["Title"].startswith(label)
                shown = np.asarray(image.convert("RGB"))[band:]
            cam = np.load(png.with_suffix(".npy"))
            assert cam.shape == (height, width) and cam.min() >= 0
            assert np.array_equal(shown, overlay_rgb(rgb, cam))
    grid = out / "grid_gradcam.png"
    assert grid.is_file() and Image.open(grid).size[0] > 400
    rows = (out / "explanations.csv").read_text().splitlines()
    assert len(rows) == 1 + 3 * 2


def test_explain_target_group_in_title(cached):
    from pipeline.cli.explain import main

    out = cached["root"] / "out_target"
    picture = cached["data"] / cached["meta"]["path"][0]
    result = CliRunner().invoke(main, [str(picture), "-c", str(cached["checkpoints"][0]), "-o", str(out),
                                       "--target", "76-116", "--device", "cpu",
                                       "--weights", f"mobilenet_v2={cached['weights']['mobilenet_v2']}"])
    assert result.exit_code == 0, result.output
    (png,) = out.glob("*.png")
    title = Image.open(png).text["Title"]
    assert "pred " in title and ("76-116" in title)
    bad = CliRunner().invoke(main, [str(picture), "-c", str(cached["checkpoints"][0]), "-o", str(out),
                                    "--target", "90-99"])
    assert bad.exit_code != 0 and "unknown target group" in bad.output


def test_report_end_to_end(cached):
    from pipeline.explain.report import ReportConfig, run_report

    split = str(cached["meta"]["split"][0])
    out = cached["root"] / "report"
    report = run_report(ReportConfig(checkpoints=[cached["checkpoints"][0]], features=cached["features"],
                                     data_dir=cached["data"], out_dir=out, split=split, limit=2, steps=2,
                                     device="cpu", weights=cached["weights"]), log=lambda *_: None, warn=pytest.fail)
    n = min(2, int((cached["meta"]["split"] == split).sum()))
    assert report["images"] == n
    assert report["models"][0]["cache_check"]["images_within_tolerance"] == n
    summary = report["columns"][0]["summary"]
    assert summary["all"]["n"] == n == summary["correct"]["n"] + summary["wrong"]["n"]
    assert 0.0 <= summary["all"]["face_focus_mean"] <= 1.0
    assert json.loads((out / "report.json").read_text())["images"] == n
    assert "| mobilenet_v2 | all |" in (out / "report.md").read_text()


def test_report_scores_a_head_on_other_bins_against_the_regrouped_ages(cached, tmp_path):
    """A head on other age groups (as train-head --bins makes) is scored against the file's ages regrouped."""
    from pipeline.constants import group_names
    from pipeline.explain.report import ReportConfig, run_report
    from pipeline.heads.checkpoint import load_checkpoint, save_checkpoint
    from pipeline.ingest.dataset import age_to_group

    edges = [20, 40, 60, 116]
    trained = load_checkpoint(cached["checkpoints"][0])
    head = save_checkpoint(tmp_path / "head_other_groups", trained.head,
                           {**trained.meta, "group_edges": edges, "class_names": group_names(edges)})
    split = str(cached["meta"]["split"][0])
    report = run_report(ReportConfig(checkpoints=[head], features=cached["features"], data_dir=cached["data"],
                                     out_dir=tmp_path / "report", split=split, limit=3, steps=2, device="cpu",
                                     weights=cached["weights"]), log=lambda *_: None, warn=lambda *_: None)
    age_of = dict(zip(map(str, cached["meta"]["path"]), cached["meta"]["age"]))
    assert report["class_names"] == group_names(edges) and report["records"]
    for record in report["records"]:
        assert record["true"] == int(age_to_group(np.asarray([age_of[record["path"]]]), edges)[0])


# --------------------------------------------------------------------------- metrics by hand


def test_face_focus_by_hand():
    cam = np.full((4, 4), 1.0)
    cam[[0, 0, 3, 3], [0, 3, 0, 3]] = 5.0  # the corners, outside the ellipse
    mask = FaceRegion(0.5, 0.5, 0.5, 0.5).mask(4, 4)
    assert mask.sum() == 12 and not mask[0, 0] and mask[0, 1]
    assert face_focus(cam, mask) == pytest.approx(12 / 32)
    hand = np.zeros((4, 4), bool)
    hand[1:3, 1:3] = True
    both = np.stack([cam, np.zeros((4, 4))])
    focus = face_focus(both, hand)
    assert focus[0] == pytest.approx(4 / 32) and np.isnan(focus[1])
    assert FACE_REGION.mask(224, 224).mean() == pytest.approx(FACE_REGION.area, abs=0.005)


def test_deletion_curve_and_auc_by_hand():
    x = torch.tensor([[[0.4, 0.3], [0.2, 0.1]]])  # [1 channel, 2, 2]

    def predict(batch):  # probability of group 0 = the pixel mass left
        s = batch.sum(dim=(1, 2, 3))
        return torch.stack([s, 1 - s], dim=1)

    cam = np.array([[9.0, 5.0], [2.0, 0.0]])
    order = deletion_order(cam, np.random.default_rng(0))
    assert order.tolist() == [0, 1, 2, 3]
    curves = deletion_curves(predict, torch.stack([x, x]), [order, order[::-1]], np.array([0, 0]), steps=4)
    np.testing.assert_allclose(curves[0], [1.0, 0.6, 0.3, 0.1, 0.0], atol=1e-6)
    np.testing.assert_allclose(curves[1], [1.0, 0.9, 0.7, 0.4, 0.0], atol=1e-6)
    np.testing.assert_allclose(curve_auc(curves), [0.375, 0.625], atol=1e-6)
    summary = summarize(np.array([0.5, 0.7, np.nan]), np.array([0.2, 0.4, 0.3]), np.array([0.5, 0.5, 0.5]),
                        np.array([True, False, True]))
    assert summary["all"]["n"] == 3 and summary["all"]["empty_maps"] == 1
    assert summary["all"]["face_focus_mean"] == pytest.approx(0.6)
    assert summary["correct"]["face_focus_mean"] == pytest.approx(0.5)
    assert summary["correct"]["auc_gap"] == pytest.approx(((0.5 - 0.2) + (0.5 - 0.3)) / 2)
    assert summary["wrong"]["auc_gap"] == pytest.approx(0.1)


def test_random_map_is_a_smooth_grid_map():
    a = random_map((7, 7), 224, 224, np.random.default_rng(0))
    assert a.shape == (224, 224)
    np.testing.assert_array_equal(a, random_map((7, 7), 224, 224, np.random.default_rng(0)))
    # Bilinear upsampling from 7 x 7: neighbouring pixels differ by at most 1/32 of the value range.
    assert np.abs(np.diff(a, axis=0)).max() <= 1 / 32 + 1e-6 and np.abs(np.diff(a, axis=1)).max() <= 1 / 32 + 1e-6
    order = deletion_order(a, np.random.default_rng(0))
    first = np.zeros(224 * 224, bool)
    first[order[:224 * 224 // 10]] = True  # the first tenth removed forms few large blobs, not scattered pixels
    first = first.reshape(224, 224)
    assert (first[1:] == first[:-1]).mean() > 0.97


def test_deletion_order_breaks_ties_at_random():
    cam = np.zeros((3, 3))
    cam[1, 1] = 1.0
    a, b = (deletion_order(cam, np.random.default_rng(s)) for s in (0, 1))
    assert a[0] == b[0] == 4
    assert sorted(a) == list(range(9)) and a.tolist() != b.tolist()


# --------------------------------------------------------------------------- real pictures


@pytest.mark.skipif(not UTKFACE.is_dir(), reason="UTKFace not present at ../shared/data/utkface")
def test_real_utkface_pictures_keep_their_size(cached, tmp_path):
    from pipeline.explain.job import ExplainConfig, explain_images

    pictures = sorted(UTKFACE.glob("*.jpg"))[:2]
    config = ExplainConfig(inputs=pictures, checkpoints=[cached["checkpoints"][0]], out_dir=tmp_path, save_npy=True,
                           device="cpu", weights=cached["weights"])
    summary = explain_images(config, log=lambda *_: None, warn=pytest.fail)
    assert summary["explained"] == 2
    for picture in pictures:
        (npy,) = tmp_path.glob(f"{image_key(picture)}_*.npy")
        assert np.load(npy).shape == np.asarray(Image.open(picture)).shape[:2]
