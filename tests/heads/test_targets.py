"""Heads that use the age: soft targets and the CORAL ordinal head, checked against autograd; checkpoints and scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.heads.checkpoint import load_checkpoint, save_checkpoint
from pipeline.heads.config import HeadConfig
from pipeline.heads.data import HeadData
from pipeline.heads.model import AgeHead, ordinal_group_probs, soft_group_targets
from pipeline.heads.stack_ops import (
    dropout_generator,
    dropout_keep,
    dropout_scale,
    epoch_plan,
    init_params,
)
from pipeline.heads.training import train_heads

EDGES = (25, 50, 75, 116)


pytestmark = pytest.mark.usefixtures("one_torch_thread")   # conftest: tiny matmuls, one thread


def synthetic_data(n=200, d=12, seed=0, years_per_unit=30.0) -> HeadData:
    """Features that carry the age (a direction scaled by it) plus noise; 50/25/25 split."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(1, 100, n)
    groups = np.searchsorted(np.asarray(EDGES[:-1]), ages, side="left")
    direction = rng.normal(size=d)
    features = rng.normal(size=(n, 2, d)) + (ages[:, None, None] / years_per_unit) * direction
    splits = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4), dtype=object)
    return HeadData.from_arrays(features.astype(np.float32), groups, ages, splits, EDGES)


def test_soft_targets_are_a_gaussian_over_years_summed_into_groups():
    q = soft_group_targets(torch.tensor([25.0, 26.0, 40.0, 110.0]), EDGES, sigma=3.0)
    assert torch.allclose(q.sum(1), torch.ones(4))
    # 25 is the last year of 0-25: more than half its mass stays there, a good part spills into 26-50.
    assert 0.5 < q[0, 0] < 0.65 and q[0, 1] > 0.35
    assert q[1, 1] > 0.5 and q[1, 0] > 0.3          # 26: the mirror image
    assert q[2, 1] > 0.999                          # 40 is deep inside 26-50
    assert q[3, 3] > 0.999
    # By hand for one age: the normalized Gaussian weights of years 0..116, summed per group.
    years = torch.arange(117.0)
    w = torch.exp(-0.5 * ((years - 25.0) / 3.0) ** 2)
    by_hand = torch.stack([w[:26].sum(), w[26:51].sum(), w[51:76].sum(), w[76:].sum()]) / w.sum()
    torch.testing.assert_close(q[0], by_hand)


def test_ordinal_group_probs_are_the_differences_of_the_cumulative_probabilities():
    z = torch.tensor([[3.0, -1.0, -4.0], [-5.0, -6.0, -7.0]])
    p = ordinal_group_probs(z)
    s = torch.sigmoid(z)
    expected = torch.stack([1 - s[:, 0], s[:, 0] - s[:, 1], s[:, 1] - s[:, 2], s[:, 2]], dim=1)
    torch.testing.assert_close(p, expected)
    assert p.argmax(1).tolist() == [1, 0]


def reference_train(data: HeadData, cfg: HeadConfig):
    """The recipe with autograd and torch.optim: soft cross-entropy, or CORAL as written in its paper
    (one shared weight vector, C-1 biases); the trainer's random streams. Returns final params and losses."""
    C = data.n_classes
    g = torch.Generator().manual_seed(cfg.seed)
    out = C - 1 if cfg.target == "ordinal" else C
    init = [t.clone() for pair in init_params(g, [data.dim, *cfg.hidden, out]) for t in pair]
    if cfg.target == "ordinal":
        prevalence = (data.train_group.unsqueeze(1) > torch.arange(C - 1)).float().mean(0)
        init[-2] = init[-2][:, :1].clone()                       # the one shared weight vector [h, 1]
        init[-1] = torch.logit(prevalence.clamp(1e-4, 1 - 1e-4))  # C-1 biases
    ps = [t.requires_grad_() for t in init]
    opt = (torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay
           else torch.optim.Adam(ps, lr=cfg.lr))
    train, _ = data.tables(cfg.standardize)
    n, batch = train.shape[0], cfg.batch_size
    total = math.ceil(n / batch) * cfg.epochs
    factor = (lambda t: 0.5 * (1 + math.cos(math.pi * t / total))) if cfg.schedule == "cosine" else (lambda t: 1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    drop = dropout_generator(cfg.seed, "cpu")
    class_w = data.class_weights() if cfg.class_weights else torch.ones(C)
    losses = []
    for _ in range(cfg.epochs):
        total_loss = 0.0
        order, views = epoch_plan(g, n, cfg.flip)
        for lo in range(0, n, batch):
            rows = order[lo:lo + batch]
            x = train[rows, views[lo:lo + batch]]
            keep = dropout_keep(drop, len(x), sum(cfg.hidden), cfg.dropout)
            col = 0
            for layer, width in enumerate(cfg.hidden):
                x = F.relu(x @ ps[2 * layer] + ps[2 * layer + 1])
                x = x * keep[:, col:col + width] * dropout_scale(cfg.dropout)
                col += width
            y = data.train_group[rows]
            w = class_w[y]
            if cfg.target == "ordinal":
                z = x @ ps[-2] + ps[-1]                           # [b, 1] + [C-1]: the shared score plus each bias
                above = (y.unsqueeze(1) > torch.arange(C - 1)).float()
                per = F.binary_cross_entropy_with_logits(z, above, reduction="none").sum(1)
            else:
                z = x @ ps[-2] + ps[-1]
                q = soft_group_targets(data.train_age[rows], data.group_edges, cfg.soft_sigma)
                per = -(q * F.log_softmax(z, dim=1)).sum(1)
            loss = (per * w).sum() / w.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(x)
        losses.append(total_loss / n)
    return [p.detach() for p in ps], losses


@pytest.mark.parametrize("cfg", [
    HeadConfig(epochs=2, hidden=(24, 12), target="soft", soft_sigma=3.0, batch_size=16),
    HeadConfig(epochs=2, hidden=(25, 13), target="soft", soft_sigma=1.5, lr=3e-3, dropout=0.5, class_weights=True,
               weight_decay=0.01, schedule="cosine", standardize=True, seed=3, batch_size=7),
    HeadConfig(epochs=2, hidden=(24, 12), target="ordinal", batch_size=16),
    HeadConfig(epochs=2, hidden=(25, 13), target="ordinal", lr=3e-3, dropout=0.5, class_weights=True,
               weight_decay=0.01, schedule="cosine", standardize=True, seed=3, batch_size=7),
])
def test_hand_written_step_matches_autograd(cfg):
    """The stacked trainer's hand-written gradients for the new losses equal autograd's, step after step."""
    data = synthetic_data()
    result = train_heads(data, [cfg], keep="last")[0]
    weights, losses = reference_train(data, cfg)
    assert [h["train_loss"] for h in result.history] == pytest.approx(losses, rel=1e-5)
    mine = [t for pair in result.params for t in pair]
    if cfg.target == "ordinal":
        w_last = mine[-2]
        assert torch.equal(w_last, w_last[:, :1].expand_as(w_last))  # the columns stayed one shared vector
        mine[-2] = w_last[:, :1]
    for a, b in zip(mine, weights):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("target", ["soft", "ordinal"])
def test_new_targets_learn_and_their_checkpoint_scores_like_the_trainer(target, tmp_path):
    data = synthetic_data(n=600, d=8, seed=1, years_per_unit=8.0)
    cfg = HeadConfig(epochs=20, hidden=(32,), target=target, standardize=True, lr=1e-2)
    result = train_heads(data, [cfg])[0]
    majority = float((data.val_group == data.train_group.mode().values).double().mean())
    assert result.metrics["val_acc"] > max(0.75, majority + 0.3)
    head = result.to_head(EDGES)
    meta = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "none"}, "feature_kind": "last",
            "feature_dim": data.dim, "hidden": list(cfg.hidden), "group_edges": list(EDGES), "target": target}
    loaded = load_checkpoint(save_checkpoint(tmp_path / target, head, meta))
    assert loaded.head.target == target
    with torch.no_grad():
        scores = loaded.head(data.val)
    probs = torch.softmax(scores, 1)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)))
    accuracy = float((scores.argmax(1) == data.val_group).double().mean())
    assert accuracy == pytest.approx(result.metrics["val_acc"])  # the head scores what the trainer measured
    assert loaded.predict_age(data.val) is None


def test_config_refuses_label_smoothing_or_bad_sigma_for_the_new_targets():
    with pytest.raises(ValueError, match="label smoothing applies to the group target only"):
        HeadConfig(target="ordinal", label_smoothing=0.1)
    with pytest.raises(ValueError, match="soft sigma"):
        HeadConfig(target="soft", soft_sigma=0.0)
    with pytest.raises(ValueError, match="target must be one of"):
        HeadConfig(target="coral")
    assert AgeHead(8, (4,), target="ordinal").mlp[-1].out_features == 3


def test_train_head_compares_targets_in_one_sweep(tmp_path):
    """--target group,soft,ordinal,age: one row per head (sigma only multiplies the soft heads); the best is saved."""
    import csv

    from click.testing import CliRunner

    from pipeline.cli.train_head import main as train_head
    from tests.support.synthetic import make_feature_file

    features = make_feature_file(tmp_path / "f.h5", n=300, widths={"mobilenet_v2": (16, 8)})
    out = tmp_path / "sweep"
    result = CliRunner().invoke(train_head, [str(features), "--backbones", "mobilenet_v2", "-o", str(out),
                                             "--target", "group,soft,ordinal,age", "--soft-sigma", "2,4",
                                             "--epochs", "2", "--hidden", "8", "--device", "cpu", "--save-all",
                                             "--quiet"])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert sorted((r["target"], r["soft_sigma"]) for r in rows) == [
        ("age", "2.0"), ("group", "2.0"), ("ordinal", "2.0"), ("soft", "2.0"), ("soft", "4.0")]
    assert [bool(r["val_mae"]) for r in rows] == [r["target"] == "age" for r in rows]
    best = load_checkpoint(out)
    assert best.meta["target"] == rows[0]["target"]
    assert best.meta["config"]["loss"] == {"group": "cross_entropy", "soft": "soft_cross_entropy", "age": "huber",
                                           "ordinal": "coral_binary_cross_entropy"}[rows[0]["target"]]
