"""Post-hoc temperature scaling (train-head --calibrate temperature): the fit, the saved head, and where T applies."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.evaluate import main as evaluate_main
from pipeline.cli.train_head import main as train_head_main
from pipeline.heads.calibration import (
    calibration_summary,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
)
from pipeline.heads.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.heads.config import HeadConfig
from pipeline.heads.data import HeadData
from pipeline.heads.model import AgeHead
from pipeline.heads.training import train_heads
from tests.support.synthetic import class_signal_arrays, make_feature_file

EDGES = (25, 50, 75, 116)
SMALL = {"mobilenet_v2": (24, 12)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest: tiny matmuls, one thread


def sampled_labels(true_logits: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Groups drawn from softmax(true_logits): true_logits are calibrated for them by construction."""
    g = torch.Generator().manual_seed(seed)
    return torch.multinomial(torch.softmax(true_logits, 1), 1, generator=g).squeeze(1)


# --------------------------------------------------------------------------- the fit


@pytest.mark.parametrize("factor", [3.0, 0.5])
def test_temperature_recovers_a_known_overconfidence_factor(factor):
    g = torch.Generator().manual_seed(1)
    true_logits = 1.5 * torch.randn(20000, 4, generator=g)
    groups = sampled_labels(true_logits)
    fitted = fit_temperature(true_logits * factor, groups)
    # The fit can only be as exact as 20,000 sampled labels allow (a few percent).
    assert fitted == pytest.approx(factor, rel=0.05)
    assert fit_temperature(true_logits, groups) == pytest.approx(1.0, rel=0.05)


def test_fitted_temperature_is_the_nll_minimum():
    g = torch.Generator().manual_seed(2)
    scores = 4 * torch.randn(3000, 4, generator=g)
    groups = sampled_labels(scores / 2.5, seed=3)
    t = fit_temperature(scores, groups)
    at = negative_log_likelihood(scores, groups, t)
    for step in (0.98, 0.995, 1.005, 1.02):
        assert negative_log_likelihood(scores, groups, t * step) > at
    # Independent check: autograd + LBFGS on log T reaches the same minimum.
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(scores.double() / log_t.exp(), groups)
        loss.backward()
        return loss

    opt.step(closure)
    assert t == pytest.approx(float(log_t.detach().exp()), rel=1e-4)


def test_uninformative_scores_give_t_1_and_bad_scores_are_refused():
    assert fit_temperature(torch.zeros(10, 4), torch.arange(10) % 4) == 1.0
    with pytest.raises(ValueError, match="not finite"):
        fit_temperature(torch.tensor([[0.0, float("nan")]]), torch.tensor([0]))
    with pytest.raises(ValueError, match="need scores"):
        fit_temperature(torch.zeros(3, 4), torch.zeros(2, dtype=torch.long))


# --------------------------------------------------------------------------- a trained, overconfident head


def noisy_arrays(n=600, d=16, seed=0):
    """A weak class signal in noise: a wide head trained long without dropout memorizes it and gets overconfident.

    40% train, 30% val, 30% held-out test.
    """
    return class_signal_arrays(n=n, d=d, signal=0.6, seed=seed, train=0.4, val=0.3)


def noisy_data(**kwargs) -> HeadData:
    return HeadData.from_arrays(*noisy_arrays(**kwargs), EDGES)


@pytest.fixture(scope="module")
def overconfident():
    arrays = noisy_arrays(n=1000)
    data = HeadData.from_arrays(*arrays, EDGES)
    cfg = HeadConfig(hidden=(64,), dropout=0.0, epochs=60, lr=3e-3, flip=False, class_weights=True)
    result, = train_heads(data, [cfg], keep="last", calibrate="temperature")
    features, groups, _, splits = arrays
    test = splits == "test"
    return data, result, torch.from_numpy(features[test, 0]), groups[test]


def test_calibrated_ece_is_lower_and_argmax_is_unchanged(overconfident):
    data, result, test_x, test_y = overconfident
    head = result.to_head(EDGES)
    assert result.calibration == "temperature"
    assert result.calibration_temperature > 1.5   # an overconfident head is cooled down
    with torch.no_grad():
        raw, scaled = head.uncalibrated(data.val), head(data.val)
    torch.testing.assert_close(scaled, raw / result.calibration_temperature)
    assert torch.equal(raw.argmax(1), scaled.argmax(1))
    before = expected_calibration_error(data.val_group.numpy(), torch.softmax(raw, 1).numpy())
    after = expected_calibration_error(data.val_group.numpy(), torch.softmax(scaled, 1).numpy())
    assert after < before / 2 and before > 0.1
    summary = calibration_summary(head, data.val, data.val_group)
    assert summary["val_ece_before"] == pytest.approx(before) and summary["val_ece_after"] == pytest.approx(after)
    assert summary["val_nll_after"] < summary["val_nll_before"]
    # Held-out rows the temperature was not fitted on gain as well: it generalizes, it did not memorize.
    with torch.no_grad():
        test_raw, test_scaled = head.uncalibrated(test_x), head(test_x)
    test_before = expected_calibration_error(test_y, torch.softmax(test_raw, 1).numpy())
    test_after = expected_calibration_error(test_y, torch.softmax(test_scaled, 1).numpy())
    assert test_after < test_before / 2


@pytest.mark.parametrize("target", ["soft", "ordinal", "age"])
def test_every_target_is_scaled_the_same_way(target):
    data = noisy_data(n=300, seed=1)
    cfg = HeadConfig(hidden=(16,), dropout=0.0, epochs=8, target=target)
    result, = train_heads(data, [cfg], calibrate="temperature")
    head = result.to_head(EDGES)
    t = result.calibration_temperature
    assert 0.01 <= t <= 100 and math.isfinite(t)
    with torch.no_grad():
        raw, scaled = head.uncalibrated(data.val), head(data.val)
    assert torch.equal(raw.argmax(1), scaled.argmax(1))
    # T is the validation NLL minimum of exactly these scores.
    nll = negative_log_likelihood(raw, data.val_group, t)
    assert nll <= negative_log_likelihood(raw, data.val_group, t * 1.02) + 1e-12
    assert nll <= negative_log_likelihood(raw, data.val_group, t / 1.02) + 1e-12


def test_calibrate_off_leaves_t_1_and_rejects_unknown_methods():
    data = noisy_data(n=200)
    result, = train_heads(data, [HeadConfig(hidden=(8,), epochs=1)])
    assert result.calibration == "off" and result.calibration_temperature == 1.0
    assert "calibration_temperature" not in result.metrics
    with pytest.raises(ValueError, match="calibrate must be one of off, temperature"):
        train_heads(data, [HeadConfig(hidden=(8,), epochs=1)], calibrate="platt")


# --------------------------------------------------------------------------- the saved head


def minimal_meta(dim: int, calibration=None) -> dict:
    meta = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "none"}, "feature_kind": "last",
            "feature_dim": dim, "hidden": [8], "group_edges": list(EDGES), "target": "group"}
    if calibration is not None:
        meta["calibration"] = calibration
    return meta


def test_t_round_trips_and_an_old_head_without_t_loads_with_t_1(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    torch.manual_seed(0)
    head = AgeHead(6, (8,)).eval()
    head.calibration_temperature.fill_(2.5)
    save_checkpoint(tmp_path / "new", head, minimal_meta(6, {"method": "temperature", "temperature": 2.5}))
    loaded = load_checkpoint(tmp_path / "new")
    assert float(loaded.head.calibration_temperature) == 2.5
    x = torch.randn(5, 6)
    torch.testing.assert_close(loaded.head(x), head.uncalibrated(x) / 2.5)

    # A head saved before calibration existed: no buffer in the weights, no "calibration" in head.json.
    old = tmp_path / "old"
    save_checkpoint(old, head, minimal_meta(6, {"method": "temperature", "temperature": 2.5}))
    with safe_open(str(old / "head.safetensors"), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != "calibration_temperature"}
        stored_meta = {k: v for k, v in f.metadata().items() if k != "head_sha256"}  # older: no digest
    save_file(state, str(old / "head.safetensors"), metadata=stored_meta)
    meta = json.loads((old / "head.json").read_text())
    del meta["calibration"], meta["head_sha256"]
    (old / "head.json").write_text(json.dumps(meta))
    before = load_checkpoint(old)
    assert float(before.head.calibration_temperature) == 1.0
    torch.testing.assert_close(before.head(x), head.uncalibrated(x))


def test_a_head_json_whose_t_was_edited_is_refused(tmp_path):
    head = AgeHead(6, (8,)).eval()
    head.calibration_temperature.fill_(2.5)
    save_checkpoint(tmp_path, head, minimal_meta(6, {"method": "temperature", "temperature": 2.5}))
    meta = json.loads((tmp_path / "head.json").read_text())
    meta["calibration"]["temperature"] = 1.0
    (tmp_path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError,
                       match="calibration temperature: head.safetensors holds 2.5, head.json says 1.0"):
        load_checkpoint(tmp_path)
    meta["calibration"]["temperature"] = -3
    (tmp_path / "head.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="edited after training"):
        load_checkpoint(tmp_path)


# --------------------------------------------------------------------------- the commands


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return make_feature_file(tmp_path_factory.mktemp("f") / "features.h5", n=400, signal=0.35, widths=SMALL)


@pytest.fixture(scope="module")
def calibrated_head(feature_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("heads") / "weighted"
    result = CliRunner().invoke(train_head_main, [
        str(feature_file), "--backbones", "mobilenet_v2", "-o", str(out), "--device", "cpu", "--threads", "1",
        "--hidden", "64", "--dropout", "0", "--epochs", "40", "--lr", "3e-3", "--class-weights", "on",
        "--keep", "last", "--calibrate", "temperature"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_train_head_prints_and_records_t_and_the_validation_ece(calibrated_head):
    out, output = calibrated_head
    meta = json.loads((out / "head.json").read_text())
    c = meta["calibration"]
    assert c["method"] == "temperature" and c["fitted_on"] == "val" and c["temperature"] > 1
    assert c["val_ece_after"] < c["val_ece_before"] and c["val_nll_after"] < c["val_nll_before"]
    assert (f"T = {c['temperature']:.4g}, fitted on the validation split (60 rows): "
            f"ECE {100 * c['val_ece_before']:.2f}% -> {100 * c['val_ece_after']:.2f}%") in output
    with (out / "results.csv").open() as handle:
        row = next(csv.DictReader(handle))
    assert float(row["calibration_temperature"]) == pytest.approx(c["temperature"])
    assert float(load_checkpoint(out).head.calibration_temperature) == pytest.approx(c["temperature"])


def test_evaluate_reports_the_calibrated_probabilities(calibrated_head, feature_file, tmp_path):
    out, _ = calibrated_head
    result = CliRunner().invoke(evaluate_main, [str(out), "--features", str(feature_file), "--split", "test",
                                                "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    with (tmp_path / "eval" / "weighted" / "predictions.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    reported = np.array([[float(r[k]) for k in r if k.startswith("p_")] for r in rows])
    # Independently: the MLP on standardized features, divided by head.json's T, softmax.
    from pipeline.heads.data import effective_splits, load_head_inputs

    ckpt = load_checkpoint(out)
    t = json.loads((out / "head.json").read_text())["calibration"]["temperature"]
    x = load_head_inputs(feature_file, ckpt.meta)[np.flatnonzero(effective_splits(feature_file) == "test"), 0]
    with torch.no_grad():
        logits = ckpt.head.mlp((x - ckpt.head.feature_mean) / ckpt.head.feature_std)
    expected = torch.softmax(logits / t, 1).numpy()
    np.testing.assert_allclose(reported, expected, atol=2e-6)
    assert np.abs(reported - torch.softmax(logits, 1).numpy()).max() > 0.05   # T really moved them
    assert (reported.argmax(1) == logits.argmax(1).numpy()).all()
    summary = json.loads((tmp_path / "eval" / "weighted" / "metrics.json").read_text())
    assert summary["calibration_temperature"] == pytest.approx(t)


def test_predict_reports_the_calibrated_probabilities(tmp_path):
    """predict (the full model: backbone, then the head) divides the head's scores by its T, as evaluate does."""
    from pipeline.backbones.registry import create_backbone
    from pipeline.cli.predict import main as predict_main
    from pipeline.constants import group_names
    from pipeline.images.views import load_rgb, preprocess_rgb
    from tests.support.folders import write_utk_folder

    images = write_utk_folder(tmp_path / "faces", [5, 30, 60, 90])
    backbone = create_backbone("mobilenet_v2", None)
    with torch.no_grad():
        feats = torch.cat(list(backbone(preprocess_rgb([load_rgb(p) for p in images])).values()), 1)
    torch.manual_seed(1)
    head = AgeHead(feats.shape[1], (16,), 0.0, EDGES).eval()
    with torch.no_grad():
        head.feature_mean.copy_(feats.mean(0))
        head.feature_std.copy_(feats.std(0) + 1e-3)
        head.mlp[-1].weight.mul_(30.0)   # confident, so that T visibly moves the probabilities
        head.calibration_temperature.fill_(2.5)
    meta = {**minimal_meta(feats.shape[1], {"method": "temperature", "temperature": 2.5}), "hidden": [16],
            "feature_kind": "both", "class_names": group_names(EDGES), "preprocessing": {}}
    save_checkpoint(tmp_path / "head", head, meta)
    out = tmp_path / "predictions.csv"
    result = CliRunner().invoke(predict_main, [str(tmp_path / "faces"), "--checkpoint", str(tmp_path / "head"),
                                               "--decoder", "torch", "--device", "cpu", "--engine", "torch",
                                               "-o", str(out)])
    assert result.exit_code == 0, result.output
    with out.open() as handle:
        rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(handle)}
    got = np.array([[float(rows[p.name][f"p_{n}"]) for n in group_names(EDGES)] for p in images])
    with torch.no_grad():
        logits = head.mlp((feats - head.feature_mean) / head.feature_std)
    np.testing.assert_allclose(got, torch.softmax(logits / 2.5, 1).numpy(), atol=1e-5)
    assert np.abs(got - torch.softmax(logits, 1).numpy()).max() > 0.05
