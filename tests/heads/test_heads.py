"""Heads: the paper's shape, the batched trainer, checkpoints and their safety, the CLI."""

from __future__ import annotations

import csv
import json
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pipeline.cli.train_head import main as train_head_main
from pipeline.features.read import read_features, read_meta, read_settings
from pipeline.heads.checkpoint import (
    CheckpointError,
    HeadMismatch,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.heads.config import HeadConfig, expand_grid, result_meta
from pipeline.heads.data import (
    HeadData,
    assemble_features,
    load_features,
    load_head_inputs,
    load_training_data,
)
from pipeline.heads.model import AgeHead, count_parameters, ordinal_scores
from pipeline.heads.stack_ops import (
    dropout_generator,
    dropout_keep,
    dropout_scale,
    epoch_plan,
    init_params,
)
from pipeline.heads.targets import HUBER_YEARS
from pipeline.heads.training import train_heads
from tests.support.synthetic import class_signal_arrays as synthetic_arrays
from tests.support.synthetic import make_feature_file

SMALL = {"mobilenet_v2": (32, 16), "resnet50": (40, 24), "efficientnet_b0": (32, 16)}
TINY = (24, 12)  # hidden widths that keep the trainer tests fast


@pytest.fixture(scope="module")
def feature_file(tmp_path_factory):
    return make_feature_file(tmp_path_factory.mktemp("f") / "features.h5", n=400,
                             backbones=("mobilenet_v2", "resnet50"), widths=SMALL)


@pytest.fixture(scope="module")
def loaded(feature_file):
    return load_training_data(feature_file, ["mobilenet_v2"], "last")


def synthetic_data(**kwargs) -> HeadData:
    return HeadData.from_arrays(*synthetic_arrays(**kwargs), (25, 50, 75, 116))


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest: tiny matmuls, one thread


def flat_params(result):
    return [t for pair in result.params for t in pair]


# --------------------------------------------------------------------------- the module


@pytest.mark.parametrize("d", [1280, 2048])
def test_head_has_the_papers_shape_and_parameter_count(d):
    head = AgeHead(d)
    assert count_parameters(head) == d * 512 + 512 + 512 * 256 + 256 + 256 * 4 + 4
    kinds = [type(m).__name__ for m in head.mlp]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(d, 512), (512, 256), (256, 4)]
    assert all(m.p == 0.3 for m in head.mlp if isinstance(m, torch.nn.Dropout))
    assert HeadConfig() == HeadConfig(lr=1e-3, epochs=10, batch_size=32, dropout=0.3, hidden=(512, 256))


def test_ordinal_scores_argmax_is_the_group_of_the_age():
    ages = torch.tensor([0.0, 25.0, 25.6, 50.4, 50.6, 75.9, 116.0])
    scores = ordinal_scores(ages, torch.tensor([25.5, 50.5, 75.5]), 4.0)
    assert scores.argmax(1).tolist() == [0, 0, 1, 1, 2, 3, 3]
    probs = torch.softmax(scores, 1)
    assert torch.allclose(probs.sum(1), torch.ones(len(ages)))


# --------------------------------------------------------------------------- the trainer


def reference_train(data: HeadData, cfg: HeadConfig) -> tuple[list[torch.Tensor], list[float]]:
    """The recipe with autograd, torch.optim and F.cross_entropy, using the trainer's random streams.

    Returns the final weights and each epoch's training loss (mean of batch losses, by batch size)."""
    g = torch.Generator().manual_seed(cfg.seed)
    out = data.n_classes if cfg.target == "group" else 1
    ps = [t.clone().requires_grad_() for pair in init_params(g, [data.dim, *cfg.hidden, out]) for t in pair]
    opt = (torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay
           else torch.optim.Adam(ps, lr=cfg.lr))
    train, _ = data.tables(cfg.standardize)
    n, batch = train.shape[0], cfg.batch_size
    total = math.ceil(n / batch) * cfg.epochs
    factor = (lambda t: 0.5 * (1 + math.cos(math.pi * t / total))) if cfg.schedule == "cosine" else (lambda t: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    drop = dropout_generator(cfg.seed, "cpu")
    losses = []
    for _ in range(cfg.epochs):
        total_loss = 0.0
        order, views = epoch_plan(g, n, cfg.flip)
        for lo in range(0, n, batch):
            x = train[order[lo:lo + batch], views[lo:lo + batch]]
            keep = dropout_keep(drop, len(x), sum(cfg.hidden), cfg.dropout)
            col = 0
            for layer, width in enumerate(cfg.hidden):
                x = F.relu(x @ ps[2 * layer] + ps[2 * layer + 1])
                x = x * keep[:, col:col + width] * dropout_scale(cfg.dropout)
                col += width
            z, rows = x @ ps[-2] + ps[-1], order[lo:lo + batch]
            weight = data.class_weights() if cfg.class_weights else None
            if cfg.target == "group":
                loss = F.cross_entropy(z, data.train_group[rows], weight=weight, label_smoothing=cfg.label_smoothing)
            else:  # Huber (smooth L1) on standardized age, class-weighted mean
                shift, scale = data.train_age.mean(), data.train_age.std().clamp_min(1.0)
                per = F.smooth_l1_loss(z[:, 0], (data.train_age[rows] - shift) / scale, reduction="none",
                                       beta=float(HUBER_YEARS / scale))
                w = weight[data.train_group[rows]] if weight is not None else torch.ones_like(per)
                loss = (per * w).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(x)
        losses.append(total_loss / n)
    return [p.detach() for p in ps], losses


@pytest.mark.parametrize("cfg", [
    HeadConfig(epochs=1, hidden=TINY),
    HeadConfig(epochs=2, hidden=(25, 13), lr=3e-3, dropout=0.5, label_smoothing=0.1, class_weights=True,
               weight_decay=0.01, schedule="cosine", standardize=True, seed=3, batch_size=7),
    HeadConfig(epochs=2, hidden=TINY, target="age", class_weights=True, seed=1, batch_size=16),
])
def test_hand_written_step_matches_autograd_and_torch_optim(cfg):
    data = synthetic_data(n=200, d=12)
    # Keep the last epoch's weights, whatever validation says, to compare with the reference.
    result = train_heads(data, [cfg], keep="last")[0]
    weights, losses = reference_train(data, cfg)
    assert result.best_epoch == cfg.epochs
    assert [h["train_loss"] for h in result.history] == pytest.approx(losses, rel=1e-5)
    for mine, ref in zip(flat_params(result), weights):
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-6)


def test_training_reduces_loss_and_separates_the_signal(loaded):
    result = train_heads(loaded.data, [HeadConfig(epochs=4)])[0]
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0]
    assert result.metrics["val_acc"] > 0.9
    assert not any(key.startswith("test") for key in result.metrics)  # the test split is evaluate's
    # The same rows with shuffled labels carry no signal: the head learns nothing.
    data = loaded.data
    shuffled = data.train_group[torch.randperm(len(data.train_group), generator=torch.Generator().manual_seed(0))]
    blind = HeadData(data.train, shuffled, data.train_age, data.val, data.val_group, data.val_age)
    assert train_heads(blind, [HeadConfig(epochs=4)])[0].metrics["val_acc"] < 0.5


def test_best_epoch_is_the_first_best_validation_epoch_and_its_weights_are_kept():
    # Few noisy rows and a large step: validation accuracy peaks early, then falls as the head overfits.
    data = synthetic_data(n=120, d=64, signal=0.35, seed=4)
    cfg = HeadConfig(epochs=8, lr=1e-2, hidden=(64, 32), dropout=0.0)
    result = train_heads(data, [cfg])[0]
    accs = [h["val_acc"] for h in result.history]
    assert result.best_epoch == int(np.argmax(accs)) + 1  # argmax takes the first of ties
    assert result.best_epoch < cfg.epochs, f"setup no longer overfits: {accs}"
    assert max(accs) > accs[-1]
    # The kept weights are those of that epoch: a run stopped there ends with the same weights...
    stopped = train_heads(data, [HeadConfig(epochs=result.best_epoch, lr=1e-2, hidden=(64, 32), dropout=0.0)])[0]
    assert stopped.best_epoch == result.best_epoch
    for a, b in zip(flat_params(result), flat_params(stopped)):
        assert torch.equal(a, b)
    # ...and they score the recorded validation accuracy.
    head = result.to_head(data.group_edges)
    with torch.no_grad():
        acc = (head(data.val).argmax(1) == data.val_group).double().mean().item()
    assert acc == pytest.approx(result.history[result.best_epoch - 1]["val_acc"])


def test_batched_sweep_equals_each_configuration_alone():
    data = synthetic_data(n=160, d=20)
    configs = expand_grid(HeadConfig(epochs=2, hidden=TINY), lr=[1e-3, 3e-3], dropout=[0.3, 0.5], seed=[0, 1])
    configs += [HeadConfig(epochs=2, hidden=TINY, label_smoothing=0.1, class_weights=True, seed=2),
                HeadConfig(epochs=2, hidden=TINY, weight_decay=0.05, schedule="cosine", flip=False, seed=5)]
    together = train_heads(data, configs, max_stack=len(configs))
    # Two worker threads, each training stacks of up to 3: the same heads again.
    workers = train_heads(data, configs, max_stack=3, threads=2)
    for cfg, joint, worker in zip(configs, together, workers):
        alone = train_heads(data, [cfg])[0]
        for other in (joint, worker):
            assert other.config == cfg
            assert other.best_epoch == alone.best_epoch
            assert [h["val_acc"] for h in other.history] == [h["val_acc"] for h in alone.history]
            for a, b in zip(flat_params(other), flat_params(alone)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Different seeds really are different heads.
    assert not torch.equal(together[0].params[0][0], together[1].params[0][0])


def test_flip_sampling_draws_both_views():
    order, views = epoch_plan(torch.Generator().manual_seed(0), 10_000, flip=True)
    assert sorted(order.tolist()) == list(range(10_000))
    assert 0.45 < views.float().mean().item() < 0.55
    assert epoch_plan(torch.Generator().manual_seed(0), 100, flip=False)[1].sum() == 0
    # Only the mirrored view carries the signal: a head trained with flips learns it, one without cannot.
    features, groups, ages, splits = synthetic_arrays(n=400, d=16, signal=2.0, views_signal=(False, True))
    data = HeadData.from_arrays(features, groups, ages, splits, (25, 50, 75, 116))
    mirrored_val = torch.from_numpy(features[splits == "val", 1])
    flipped, plain = train_heads(data, [HeadConfig(epochs=3, hidden=TINY, lr=1e-2),
                                        HeadConfig(epochs=3, hidden=TINY, lr=1e-2, flip=False)])
    acc = {}
    for name, res in (("flip", flipped), ("plain", plain)):
        with torch.no_grad():
            acc[name] = (res.to_head(data.group_edges)(mirrored_val).argmax(1) == data.val_group).double().mean()
    assert acc["flip"] > 0.8, acc
    assert acc["plain"] < 0.5, acc


def test_dropout_masks_keep_the_configured_share():
    g = torch.Generator().manual_seed(0)
    for p in (0.0, 0.3, 0.5):
        keep = dropout_keep(g, 64, 509, p)  # 509: not a multiple of the 3 lanes per random word
        assert keep.shape == (64, 509)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.01
        assert dropout_scale(p) == pytest.approx(1 / (1 - p), rel=1e-4)
    a, b = dropout_keep(g, 32, 100, 0.3), dropout_keep(g, 32, 100, 0.3)
    assert not torch.equal(a, b)  # a fresh mask every step


def test_deterministic_on_cpu_for_a_seed():
    data = synthetic_data(n=160, d=16)
    cfg = HeadConfig(epochs=2, hidden=TINY)
    a, b = train_heads(data, [cfg])[0], train_heads(data, [cfg])[0]
    assert a.history == b.history
    for x, y in zip(flat_params(a), flat_params(b)):
        assert torch.equal(x, y)
    c = train_heads(data, [HeadConfig(epochs=2, hidden=TINY, seed=1)])[0]
    assert not torch.equal(a.params[0][0], c.params[0][0])


def test_age_target_predicts_years_and_derives_groups(loaded):
    result = train_heads(loaded.data, [HeadConfig(epochs=4, target="age")])[0]
    data = loaded.data
    constant_mae = (data.val_age - data.train_age.median()).abs().mean().item()
    assert result.metrics["val_mae"] < 0.8 * constant_mae
    assert result.metrics["val_acc"] > 0.8
    head = result.to_head(data.group_edges)
    with torch.no_grad():
        ages = head.predict_age(data.val)
        scores = head(data.val)
    derived = torch.bucketize(ages, torch.tensor([25.5, 50.5, 75.5]))
    assert torch.equal(scores.argmax(1), derived)
    assert result.metrics["val_mae"] == pytest.approx((ages - data.val_age).abs().mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- features and splits


def test_assemble_features_matches_the_training_layout(feature_file):
    names = ["resnet50", "mobilenet_v2"]
    cached = load_features(feature_file, names, "both")[:5, 0]
    pooled = {n: {"features": torch.from_numpy(read_features(feature_file, n, "last")[:5, 0]),
                  "stages": torch.from_numpy(read_features(feature_file, n, "stages")[:5, 0])} for n in names}
    assert torch.equal(assemble_features(pooled, names, "both"), torch.from_numpy(cached))
    assert assemble_features(pooled, names, "last").shape == (5, 40 + 32)
    assert assemble_features(pooled, names, "stages").shape == (5, 24 + 16)


def test_split_file_overrides_which_rows_train(feature_file, tmp_path):
    meta = read_meta(feature_file)
    chosen = list(range(0, 60))
    path = tmp_path / "split.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "split"])
        for i in chosen:
            writer.writerow([meta["path"][i], "train" if i < 40 else "val" if i < 50 else "test"])
    default = load_training_data(feature_file, ["mobilenet_v2"], "last")
    override = load_training_data(feature_file, ["mobilenet_v2"], "last", split_file=path)
    assert override.counts == {"train": 40, "val": 10, "test": 10, "unused": 340}
    features = load_features(feature_file, ["mobilenet_v2"], "last")
    assert torch.equal(override.data.train, torch.from_numpy(features[:40]))
    assert torch.equal(override.data.val, torch.from_numpy(features[40:50, 0]))
    assert default.data.train.shape[0] == 280
    assert override.rows_fingerprint != default.rows_fingerprint


# --------------------------------------------------------------------------- checkpoints


def _saved(tmp_path, loaded, **config):
    result = train_heads(loaded.data, [HeadConfig(epochs=1, hidden=TINY, **config)])[0]
    folder = save_checkpoint(tmp_path / "ckpt", result.to_head(loaded.group_edges), result_meta(loaded, result))
    return folder, result


def test_checkpoint_round_trip_keeps_weights_and_metadata(tmp_path, loaded, feature_file):
    folder, result = _saved(tmp_path, loaded, standardize=True)
    ckpt = load_checkpoint(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["head.json", "head.safetensors"]
    meta = ckpt.meta
    assert meta["backbones"] == ["mobilenet_v2"] and meta["weights"] == {"mobilenet_v2": "none"}
    assert meta["group_edges"] == [25, 50, 75, 116] and meta["feature_kind"] == "last"
    assert meta["feature_fingerprint"] == read_settings(feature_file)["fingerprint"]
    assert meta["config"]["lr"] == 1e-3 and meta["best_epoch"] == result.best_epoch
    assert set(meta["history"][0]) >= {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
    assert not ckpt.head.training
    inputs = load_head_inputs(feature_file, meta)[:, 0]  # raw features: standardization lives in the head
    with torch.no_grad():
        expected = result.to_head(loaded.group_edges)(inputs)
        assert torch.equal(ckpt.head(inputs), expected)
    assert ckpt.predict_age(inputs) is None
    assert load_checkpoint(folder / "head.json").meta == meta  # either file of the pair works


def test_heads_refuse_other_backbones_weights_and_bins(tmp_path, loaded, feature_file):
    folder, _ = _saved(tmp_path, loaded)
    ckpt = load_checkpoint(folder)
    settings = read_settings(feature_file)
    ckpt.check_compatible(settings)  # its own features are fine
    other = tmp_path / "other"
    other.mkdir()
    cases = {
        "backbones": make_feature_file(other / "b.h5", n=40, backbones=("resnet50",), widths=SMALL),
        "weights": make_feature_file(other / "w.h5", n=40, widths=SMALL, weights="IMAGENET1K_V1"),
        "group_edges": make_feature_file(other / "g.h5", n=40, widths=SMALL, edges=(20, 40, 60, 116)),
    }
    for what, path in cases.items():
        with pytest.raises(HeadMismatch, match=what):
            ckpt.check_compatible(read_settings(path))
        with pytest.raises(HeadMismatch, match=what):
            load_head_inputs(path, ckpt.meta)
    with pytest.raises(HeadMismatch):
        ckpt.head(torch.zeros(2, 7))  # wrong width


class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickled_checkpoint_is_not_executed(tmp_path, loaded):
    folder, _ = _saved(tmp_path, loaded)
    marker = tmp_path / "pwned"
    payload = {"mlp.0.weight": _Marker(marker)}
    with open(folder / "head.safetensors", "wb") as handle:
        pickle.dump(payload, handle)
    torch.save(payload, folder / "also_a_pickle.pt")
    for target in (folder, folder / "head.safetensors"):
        with pytest.raises(CheckpointError, match="safetensors"):
            load_checkpoint(target)
    assert not marker.exists()
    # torch.save's zip format in the weights slot is refused too.
    (folder / "also_a_pickle.pt").replace(folder / "head.safetensors")
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    assert not marker.exists()
    # And a pickle in the meta slot is not read as anything but (invalid) JSON.
    with open(folder / "head.json", "wb") as handle:
        pickle.dump(payload, handle)
    with pytest.raises(CheckpointError):
        load_checkpoint(folder)
    assert not marker.exists()


# --------------------------------------------------------------------------- CLI


def test_cli_trains_a_sweep_and_writes_checkpoint_and_table(tmp_path, feature_file):
    out = tmp_path / "out"
    result = CliRunner().invoke(train_head_main, [
        str(feature_file), "--backbones", "mobilenet_v2,resnet50", "-o", str(out), "--epochs", "2",
        "--hidden", "24,12", "--lr", "1e-3,3e-3", "--seed", "0,1", "--save-all", "--quiet"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["000", "001", "002", "003"]
    assert {float(r["lr"]) for r in rows} == {1e-3, 3e-3} and {r["seed"] for r in rows} == {"0", "1"}
    accs = [float(r["val_acc"]) for r in rows]
    assert accs == sorted(accs, reverse=True)
    ckpt = load_checkpoint(out)
    assert ckpt.meta["backbones"] == ["mobilenet_v2", "resnet50"] and ckpt.meta["feature_dim"] == 32 + 40
    assert ckpt.meta["history"][ckpt.meta["best_epoch"] - 1]["val_acc"] == pytest.approx(accs[0])
    assert "val_acc" in result.output
    # Single run, the paper's recipe but 1 epoch; a bad option is a clean error.
    single = CliRunner().invoke(train_head_main, [str(feature_file), "--backbones", "mobilenet_v2", "-o",
                                                  str(tmp_path / "one"), "--epochs", "1"])
    assert single.exit_code == 0, single.output
    assert json.loads((tmp_path / "one" / "head.json").read_text())["config"]["hidden"] == [512, 256]
    bad = CliRunner().invoke(train_head_main, [str(feature_file), "--backbones", "efficientnet_b0", "-o",
                                               str(tmp_path / "bad")])
    assert bad.exit_code != 0 and "efficientnet_b0" in bad.output


@pytest.mark.gpu  # conftest: runs only where CUDA is, and is the one test here allowed to use it
def test_gpu_training_matches_cpu_closely():
    data = synthetic_data(n=160, d=16)
    cfg = HeadConfig(epochs=2, hidden=TINY, dropout=0.0)
    cpu = train_heads(data, [cfg])[0]
    gpu = train_heads(data.to("cuda"), [cfg])[0]
    for a, b in zip(flat_params(cpu), flat_params(gpu)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
