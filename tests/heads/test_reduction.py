"""train-head --pca: the fit (principal directions of the standardized training rows), its cache beside the
feature file, and the head that carries its projection through training, saving and loading."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.train_head import main as train_head_main
from pipeline.heads.checkpoint import CheckpointError, load_checkpoint
from pipeline.heads.config import HeadConfig
from pipeline.heads.data import HeadData, load_head_inputs, load_training_data
from pipeline.heads.reduction import (
    ReductionCache,
    apply_blocks,
    block_components,
    fit_blocks,
    fit_pca,
    project,
)
from pipeline.heads.stack_ops import mlp_forward
from pipeline.heads.training import head_inputs, train_heads
from tests.support.synthetic import class_signal_arrays, make_feature_file

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def low_rank_rows(n=600, d=40, rank=6, seed=0):
    """Centred rows whose variance lies mostly in `rank` directions of known, distinct variances."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, rank, generator=g)).Q
    scales = torch.linspace(6.0, 2.0, rank)
    rows = (torch.randn(n, rank, generator=g) * scales) @ basis.T + 0.05 * torch.randn(n, d, generator=g)
    return rows - rows.mean(0)


def reduced_data(n=240, d=32, cache=None, seed=0) -> HeadData:
    features, groups, ages, splits = class_signal_arrays(n=n, d=d, seed=seed)
    data = HeadData.from_arrays(features, groups, ages, splits, (25, 50, 75, 116))
    data.reductions = cache
    return data


def test_fit_finds_the_top_principal_directions_scaled_to_mean_variance_one():
    rows = low_rank_rows()
    projection = fit_pca(rows, 4)
    assert projection.shape == (40, 4)
    projected = rows @ projection
    covariance = projected.T @ projected / (len(rows) - 1)
    variances = covariance.diagonal()
    assert torch.allclose(covariance, torch.diag(variances), atol=1e-3)   # uncorrelated components
    assert abs(float(variances.mean()) - 1) < 1e-3 and (variances.diff() < 0).all()   # falling, mean 1
    expected = torch.linspace(6.0, 2.0, 6)[:4] ** 2
    assert torch.allclose(variances, expected / expected.mean(), rtol=0.15)
    # The same subspace as the exact eigenvectors of the covariance (cosines of the principal angles = 1).
    exact = torch.linalg.eigh(rows.T.double() @ rows.double()).eigenvectors[:, -4:].float()
    directions = torch.linalg.qr(projection).Q
    cosines = torch.linalg.svdvals(exact.T @ directions)
    assert cosines.min() > 0.999


def test_fit_is_the_same_every_time_and_refuses_more_components_than_rows_allow():
    rows = low_rank_rows()
    assert torch.equal(fit_pca(rows, 5), fit_pca(rows, 5))
    with pytest.raises(ValueError, match="choose 1 to 40 components"):
        fit_pca(rows, 41)


def test_blocks_wider_than_n_are_reduced_and_the_others_pass_unchanged():
    assert block_components([1280, 488, 4160], 512) == [512, 488, 512]
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(50, 12, generator=g) * 3 + 5
    mean, std = rows.mean(0), rows.std(0)
    standardized = (rows - mean) / std
    fits = fit_blocks(standardized, [3, 9], 4)
    assert set(fits) == {"block1"} and fits["block1"].shape == (9, 4)
    expected = torch.cat([standardized[:, :3], standardized[:, 3:] @ fits["block1"]], dim=1)
    assert torch.allclose(apply_blocks(standardized, [3, 9], fits), expected)
    assert torch.equal(project(rows, mean, std, [3, 9], fits, chunk=7), apply_blocks(standardized, [3, 9], fits))


def test_pca_needs_standardized_features():
    with pytest.raises(ValueError, match="--pca needs --standardize on"):
        HeadConfig(pca=8)
    assert HeadConfig(pca=8, standardize=True).shape_key() != HeadConfig(pca=16, standardize=True).shape_key()


def test_a_stored_fit_is_reused_and_trains_the_same_head_bit_for_bit(tmp_path):
    cache = ReductionCache(tmp_path / "features.h5", {"rows": "abc"})
    config = HeadConfig(epochs=2, hidden=(16,), standardize=True, pca=8, seed=3)
    first = train_heads(reduced_data(cache=cache), [config])[0]
    stored = list((tmp_path / "features.h5.pca").iterdir())
    assert len(stored) == 1 and "stored in" in first.reduction["source"]
    again = train_heads(reduced_data(cache=cache), [config])[0]
    assert again.reduction["source"].startswith("reused from")
    assert torch.equal(first.reduction["block0"], again.reduction["block0"])
    for (w1, b1), (w2, b2) in zip(first.params, again.params):
        assert torch.equal(w1, w2) and torch.equal(b1, b2)
    # Other rows (another fingerprint) get a fit of their own.
    other = ReductionCache(tmp_path / "features.h5", {"rows": "xyz"})
    assert other.load((32,), 8) is None and cache.load((32,), 8) is not None


def test_the_head_carries_its_projection_and_computes_what_training_saw():
    data = reduced_data()
    result = train_heads(data, [HeadConfig(epochs=20, hidden=(16,), standardize=True, pca=6)])[0]
    assert result.feature_dim == 32 and result.params[0][0].shape[0] == 6 and result.reduction["blocks"] == [[32, 6]]
    head = result.to_head(data.group_edges)
    W = [w.unsqueeze(0) for w, _ in result.params]
    b = [bb.unsqueeze(0) for _, bb in result.params]
    _, val = head_inputs(data, result.config)
    with torch.no_grad():
        assert torch.allclose(head(data.val), mlp_forward(W, b, val, 0), atol=1e-4)
    accuracy = float((head(data.val).argmax(1) == data.val_group).float().mean())
    assert accuracy > 0.6   # the class signal survives the reduction (chance is 0.25)


def test_blocks_no_wider_than_n_are_fed_whole():
    data = reduced_data(d=12)
    data.blocks = (4, 8)
    result = train_heads(data, [HeadConfig(epochs=1, hidden=(8,), standardize=True, pca=6)])[0]
    assert result.reduction["blocks"] == [[4, 4], [8, 6]] and result.params[0][0].shape[0] == 10
    head = result.to_head(data.group_edges)
    assert set(head.block_projections()) == {"block1"}
    W = [w.unsqueeze(0) for w, _ in result.params]
    b = [bb.unsqueeze(0) for _, bb in result.params]
    with torch.no_grad():
        assert torch.allclose(head.raw(data.val), mlp_forward(W, b, head_inputs(data, result.config)[1], 0), atol=1e-5)


def test_train_head_pca_saves_a_head_that_loads_and_scores_raw_features(tmp_path):
    feature_file = make_feature_file(tmp_path / "features.h5", n=200, widths={"mobilenet_v2": (24, 8)})
    out = tmp_path / "head"
    result = CliRunner().invoke(train_head_main, [str(feature_file), "--backbones", "mobilenet_v2", "-o", str(out),
                                                  "--device", "cpu", "--threads", "1", "--hidden", "16",
                                                  "--epochs", "2", "--standardize", "on", "--pca", "10",
                                                  "--feature-kind", "both"])
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "head.json").read_text())
    assert meta["feature_dim"] == 32 and meta["reduction"]["components"] == 10
    assert meta["reduction"]["blocks"] == [[24, 10], [8, 8]]
    assert meta["reduction"]["source"].startswith("fitted on the training rows, stored in")
    assert f"principal components (--pca): {meta['reduction']['source']}" in result.output
    checkpoint = load_checkpoint(out)
    features = load_head_inputs(feature_file, meta)[:, 0]
    with torch.no_grad():
        scores = checkpoint.head(features)
    assert scores.shape == (200, 4) and torch.isfinite(scores).all()
    # The head's own projection is the cached fit's.
    loaded = load_training_data(feature_file, ["mobilenet_v2"], "both")
    stored = loaded.data.reductions.load((24, 8), 10)
    assert torch.equal(checkpoint.head.pca_block0, stored["block0"])
    assert np.isclose(meta["metrics"]["val_acc"], meta["history"][meta["best_epoch"] - 1]["val_acc"])
    # head.json's reduction is part of what the weights mean: an edit of it is refused, not half-loaded.
    for blocks, problem in (([[24, 12], [8, 8]], "does not match the head"), ([[20, 10], [8, 8]], "reduction blocks")):
        (out / "head.json").write_text(json.dumps({**meta, "reduction": {**meta["reduction"], "blocks": blocks}}))
        with pytest.raises(CheckpointError, match=problem):
            load_checkpoint(out)


def test_no_block_wider_than_n_means_no_reduction_and_the_standardized_head():
    data = reduced_data(d=12)
    data.blocks = (4, 8)
    config = HeadConfig(epochs=1, hidden=(8,), standardize=True, seed=2)
    plain = train_heads(data, [config])[0]
    wide_n = train_heads(data, [replace(config, pca=8)])[0]
    assert wide_n.reduction is None and wide_n.to_head(data.group_edges).reduction is None
    for (w1, b1), (w2, b2) in zip(plain.params, wide_n.params):
        assert torch.equal(w1, w2) and torch.equal(b1, b2)


def test_a_damaged_stored_fit_is_refitted_not_trusted(tmp_path):
    cache = ReductionCache(tmp_path / "features.h5", {"rows": "abc"})
    config = HeadConfig(epochs=1, hidden=(8,), standardize=True, pca=8)
    first = train_heads(reduced_data(cache=cache), [config])[0]
    cache.path((32,), 8).write_bytes(b"not a safetensors file")
    assert cache.load((32,), 8) is None
    again = train_heads(reduced_data(cache=cache), [config])[0]
    assert again.reduction["source"].startswith("fitted on the training rows, stored in")
    assert torch.equal(first.reduction["block0"], again.reduction["block0"])


def test_a_stored_fit_whose_numbers_were_edited_is_refitted_not_trusted(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cache = ReductionCache(tmp_path / "features.h5", {"rows": "abc"})
    config = HeadConfig(epochs=1, hidden=(8,), standardize=True, pca=8)
    first = train_heads(reduced_data(cache=cache), [config])[0]
    path = cache.path((32,), 8)
    stored, metadata = load_file(str(path)), safe_open(str(path), framework="pt").metadata()
    stored["block0"] = stored["block0"] * 2   # a valid file, same fields, other numbers
    save_file(stored, str(path), metadata=metadata)
    assert cache.load((32,), 8) is None
    again = train_heads(reduced_data(cache=cache), [config])[0]
    assert again.reduction["source"].startswith("fitted on the training rows, stored in")
    assert torch.equal(first.reduction["block0"], again.reduction["block0"])


def test_a_fit_that_cannot_be_stored_is_used_in_memory_and_the_reason_is_kept(tmp_path):
    blocked = tmp_path / "features.h5.pca"
    blocked.write_text("a file where the cache folder would go")
    cache = ReductionCache(tmp_path / "features.h5", {"rows": "abc"})
    result = train_heads(reduced_data(cache=cache), [HeadConfig(epochs=1, hidden=(8,), standardize=True, pca=8)])[0]
    assert result.reduction["source"].startswith("fitted on the training rows (could not store the fit in")
    assert result.reduction["block0"].shape == (32, 8) and blocked.read_text().startswith("a file")
