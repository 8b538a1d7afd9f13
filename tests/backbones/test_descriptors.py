"""Descriptors (GeM, grids) from the same forward pass: each equals a plain recomputation from the feature map."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.backbones.descriptors import (
    DESCRIPTORS,
    descriptor_width,
    grid,
    kind_descriptors,
    kind_outputs,
    parse_descriptors,
)
from pipeline.backbones.registry import REGISTRY, create_backbone, output_widths


def _reference_grid(feature_map: torch.Tensor) -> torch.Tensor:
    """torch's adaptive average pooling, 2x2 then 3x3, cell-major (row by row), channels inside a cell."""
    cells = [F.adaptive_avg_pool2d(feature_map.float(), n).flatten(2).transpose(1, 2).flatten(1) for n in (2, 3)]
    return torch.cat(cells, dim=1)


def _capture(module: torch.nn.Module, store: dict, key: str):
    return module.register_forward_hook(lambda _m, _i, out: store.__setitem__(key, out.detach().clone()))


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_descriptor_equals_a_recomputation_from_the_feature_map(name, calibrated_mobilenet):
    weights = str(calibrated_mobilenet) if name == "mobilenet_v2" else None
    model = create_backbone(name, weights, descriptors="all")
    spec = model.spec
    maps = {}
    # Forward hooks on the last block (the Grad-CAM layer) and on the module ending the last earlier stage.
    stage_module = (f"layer{spec.stage_indices[-1]}" if spec.layout == "resnet"
                    else f"features.{spec.stage_indices[-1]}")
    handles = [_capture(model.cam_layer, maps, "last"),
               _capture(model.model.get_submodule(stage_module), maps, "stage")]
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        out = model(x)
    for h in handles:
        h.remove()
    assert list(out) == list(model.output_names) == ["features", "stages", "gem", "grid", "stage_grid"]
    for key, width in output_widths(spec, DESCRIPTORS).items():
        assert out[key].shape == (2, width)

    last, stage = maps["last"], maps["stage"]
    assert last.shape[2:] == (7, 7)
    torch.testing.assert_close(out["features"], last.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    expected_gem = last.clamp(min=1e-6).pow(3).mean(dim=(2, 3)).pow(1 / 3)
    torch.testing.assert_close(out["gem"], expected_gem, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["grid"], _reference_grid(last), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["stage_grid"], _reference_grid(stage), rtol=1e-5, atol=1e-6)
    # GeM is not the mean: it weights the strong responses more (so the descriptor adds something).
    assert (out["gem"] >= out["features"].clamp(min=0) - 1e-5).all()
    assert not torch.allclose(out["gem"], out["features"], rtol=1e-2)


def test_descriptors_leave_features_and_stages_bit_identical(calibrated_mobilenet):
    plain = create_backbone("mobilenet_v2", str(calibrated_mobilenet))
    rich = plain.with_descriptors("gem,grid")
    assert rich.model is plain.model  # shares the weights, no copy
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        a, b = plain(x), rich(x)
    assert list(a) == ["features", "stages"] and list(b) == ["features", "stages", "gem", "grid"]
    assert torch.equal(a["features"], b["features"]) and torch.equal(a["stages"], b["stages"])


def test_grid_cells_are_the_adaptive_pooling_cells_on_odd_and_even_maps():
    torch.manual_seed(1)
    for size in (7, 14, 6):
        fmap = torch.randn(3, 5, size, size)
        torch.testing.assert_close(grid(fmap), _reference_grid(fmap))
    # Cell order: the top-left 2x2 cell first; its 5 channels are its first 5 numbers.
    fmap = torch.zeros(1, 5, 7, 7)
    fmap[:, :, :3, :3] = 1.0  # only the top-left corner lit
    cells = grid(fmap).reshape(13, 5)
    assert cells[0].gt(0).all() and cells[1:4].eq(0).all()  # 2x2: rows 0-3 cols 0-3 is the only lit cell
    assert cells[4].eq(1).all()                              # 3x3: top-left cell covers rows/cols 0-3


def test_parse_and_kinds():
    assert parse_descriptors("grid, gem") == ("gem", "grid")  # canonical order: same file either way
    assert parse_descriptors("none") == parse_descriptors("") == ()
    assert parse_descriptors("all") == DESCRIPTORS
    with pytest.raises(ValueError, match="unknown descriptor 'sift'"):
        parse_descriptors("gem,sift")
    assert kind_outputs("both+grid") == ("features", "stages", "grid")
    assert kind_outputs("last") == ("features",)
    assert kind_descriptors("both+stage_grid+gem") == ("gem", "stage_grid")
    with pytest.raises(ValueError, match="unknown feature kind"):
        kind_outputs("last+fancy")
    with pytest.raises(ValueError, match="twice"):
        kind_outputs("both+last")
    assert descriptor_width(REGISTRY["resnet50"], "stage_grid") == 13 * 1024


@pytest.mark.slow
def test_featurize_stores_each_descriptor_and_train_head_reads_it(utk_folder, tmp_path, fast):
    """featurize --descriptors writes descriptors/<name>/<backbone>; a default run keeps its fingerprint."""
    from click.testing import CliRunner

    from pipeline.cli.featurize import main as featurize
    from pipeline.features.read import read_features, read_meta, read_settings
    from pipeline.images.decoders import make_decoder

    plain_out, rich_out = tmp_path / "plain.h5", tmp_path / "rich.h5"
    runner = CliRunner()
    for out, extra in ((plain_out, []), (rich_out, ["--descriptors", "gem,grid,stage_grid"])):
        result = runner.invoke(featurize, [str(utk_folder), "-o", str(out), "--device", "cpu", *fast, *extra])
        assert result.exit_code == 0, result.output
    plain, rich = read_settings(plain_out), read_settings(rich_out)
    assert "descriptors" not in plain and rich["descriptors"] == ["gem", "grid", "stage_grid"]
    assert plain["fingerprint"] != rich["fingerprint"]
    with h5py.File(rich_out) as h5:
        assert h5["descriptors/grid/mobilenet_v2"].shape[1:] == (2, 13 * 1280)
        assert h5["descriptors/stage_grid/mobilenet_v2"].shape[1:] == (2, 13 * 320)
    # Features and stages do not depend on whether descriptors were asked for.
    for kind in ("last", "stages"):
        np.testing.assert_array_equal(read_features(plain_out, "mobilenet_v2", kind),
                                      read_features(rich_out, "mobilenet_v2", kind))
    # The stored descriptors are the backbone's own, on these files' plain and mirrored views.
    meta = read_meta(rich_out)
    weights = fast[fast.index("--weights") + 1]
    model = create_backbone("mobilenet_v2", weights, descriptors="all")
    views = make_decoder("torch", "cpu").decode([utk_folder / p for p in meta["path"][:3]]).views
    with torch.inference_mode():
        out = model(views.flatten(0, 1))
    for name in DESCRIPTORS:
        expected = out[name].reshape(3, 2, -1).numpy()
        stored = read_features(rich_out, "mobilenet_v2", name)[:3]
        np.testing.assert_allclose(stored, expected, rtol=2e-3, atol=2e-3 * np.abs(expected).max())
    combined = read_features(rich_out, "mobilenet_v2", "both+grid")
    assert combined.shape[2] == 1280 + REGISTRY["mobilenet_v2"].stages_width + 13 * 1280
    with pytest.raises(ValueError, match="no grid descriptor.*--descriptors grid"):
        read_features(plain_out, "mobilenet_v2", "last+grid")


@pytest.mark.slow
def test_heads_on_descriptors_train_and_their_full_models_rebuild_them(utk_folder, tmp_path, fast):
    """train-head --features last+gem+grid; the full model (predict, explain) recomputes those descriptors live."""
    from click.testing import CliRunner

    from pipeline.cli.featurize import main as featurize
    from pipeline.cli.train_head import main as train_head
    from pipeline.features.read import read_meta
    from pipeline.heads.checkpoint import load_checkpoint
    from pipeline.heads.data import load_head_inputs
    from pipeline.images.decoders import make_decoder
    from pipeline.inference.full_model import load_full_model
    from pipeline.inference.predictor import Predictor

    weights = fast[fast.index("--weights") + 1]
    features = tmp_path / "rich.h5"
    runner = CliRunner()
    result = runner.invoke(featurize, [str(utk_folder), "-o", str(features), "--device", "cpu", *fast,
                                       "--descriptors", "gem,grid"])
    assert result.exit_code == 0, result.output
    paths = read_meta(features)["path"]
    split_file = tmp_path / "split.csv"
    split_file.write_text("file,split\n" + "".join(f"{p},{'train' if i < 8 else 'val' if i < 10 else 'test'}\n"
                                                   for i, p in enumerate(paths)))
    heads = {}
    for kind, target in (("last+gem+grid", "ordinal"), ("last", "soft")):
        out = tmp_path / f"head_{target}"
        result = runner.invoke(train_head, [str(features), "--backbones", "mobilenet_v2", "-o", str(out),
                                            "--features", kind, "--target", target, "--epochs", "2",
                                            "--hidden", "8", "--device", "cpu", "--split-file", str(split_file),
                                            "--quiet"])
        assert result.exit_code == 0, result.output
        heads[kind] = load_checkpoint(out)
        assert heads[kind].meta["feature_kind"] == kind and heads[kind].meta["target"] == target
    assert heads["last+gem+grid"].meta["feature_dim"] == 1280 * (1 + 1 + 13)

    views = make_decoder("torch", "cpu").decode([utk_folder / p for p in paths[:4]]).views
    cached = {kind: load_head_inputs(features, ckpt.meta)[:4] for kind, ckpt in heads.items()}
    expected = {kind: torch.softmax(ckpt.head(cached[kind][:, 0]), 1) for kind, ckpt in heads.items()}
    model, _ = load_full_model(heads["last+gem+grid"], weights={"mobilenet_v2": weights})
    with torch.no_grad():
        live = torch.softmax(model(views[:, 0]), 1)
        live_inputs = model.head_inputs(views[:, 0])
    reference = cached["last+gem+grid"][:, 0]
    torch.testing.assert_close(live_inputs, reference, rtol=2e-3, atol=2e-3 * float(reference.abs().max()))
    torch.testing.assert_close(live, expected["last+gem+grid"], rtol=0, atol=5e-3)  # float16 cache rounding
    # Two heads, one shared backbone: it computes the union of the descriptors the heads need.
    predictor = Predictor([heads["last"], heads["last+gem+grid"]], weights={"mobilenet_v2": weights}, device="cpu")
    (shared,) = predictor.backbones.values()
    assert shared.descriptors == ("gem", "grid")
    probs, ages = predictor(views)
    mean = (expected["last"] + expected["last+gem+grid"]) / 2
    np.testing.assert_allclose(probs, mean.numpy(), rtol=0, atol=5e-3)
    assert ages is None

    # evaluate reads the head's descriptor kind from the file and scores what the head scores.
    import json

    from pipeline.cli.evaluate import main as evaluate

    result = runner.invoke(evaluate, [str(tmp_path / "head_ordinal"), "--features", str(features), "--split", "val",
                                      "--split-file", str(split_file), "-o", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    (got,) = json.loads((tmp_path / "eval" / "metrics.json").read_text())["checkpoints"].values()
    val = [i for i in range(len(paths)) if 8 <= i < 10]
    inputs = load_head_inputs(features, heads["last+gem+grid"].meta)[val, 0]
    groups = read_meta(features)["group"][val]
    pred = heads["last+gem+grid"].head(inputs).argmax(1).numpy()
    assert got["n"] == 2 and got["accuracy"] == pytest.approx(float(np.mean(pred == groups)))


@pytest.mark.slow
def test_merged_shards_keep_the_descriptors(utk_folder, tmp_path, fast):
    """featurize --shard i/n with descriptors, then merge: the same descriptors as a single run."""
    from click.testing import CliRunner

    from pipeline.cli.featurize import main as featurize
    from pipeline.features.read import read_features, read_settings

    runner = CliRunner()
    single = tmp_path / "single.h5"
    common = ["--device", "cpu", *fast, "--descriptors", "gem,stage_grid"]
    assert runner.invoke(featurize, [str(utk_folder), "-o", str(single), *common]).exit_code == 0
    shards = tmp_path / "sharded.h5"
    for i in range(2):
        result = runner.invoke(featurize, [str(utk_folder), "-o", str(shards), "--shard", f"{i}/2", *common])
        assert result.exit_code == 0, result.output
    merged = tmp_path / "merged.h5"
    parts = [str(tmp_path / f"sharded.shard-{i}-of-2.h5") for i in range(2)]
    result = runner.invoke(featurize, ["merge", *parts, "-o", str(merged)])
    assert result.exit_code == 0, result.output
    assert read_settings(merged)["descriptors"] == ["gem", "stage_grid"]
    for kind in ("gem", "stage_grid", "last"):
        np.testing.assert_array_equal(read_features(merged, "mobilenet_v2", kind),
                                      read_features(single, "mobilenet_v2", kind))


@pytest.mark.slow
def test_join_keeps_each_backbones_descriptors_and_needs_the_same_ones(utk_folder, tmp_path, fast):
    from click.testing import CliRunner

    from pipeline.cli.featurize import main as featurize
    from pipeline.features.read import read_features

    runner = CliRunner()
    mnv2, eff, eff_plain = tmp_path / "mnv2.h5", tmp_path / "eff.h5", tmp_path / "eff_plain.h5"
    common = ["--device", "cpu", "--quiet", "--engine", "torch"]
    runs = ((mnv2, [*fast, "--descriptors", "gem"]),
            (eff, ["--backbones", "efficientnet_b0", "--weights", "none", "--descriptors", "gem"]),
            (eff_plain, ["--backbones", "efficientnet_b0", "--weights", "none"]))
    for out, extra in runs:
        result = runner.invoke(featurize, [str(utk_folder), "-o", str(out), *common, *extra])
        assert result.exit_code == 0, result.output
    joined = tmp_path / "joined.h5"
    result = runner.invoke(featurize, ["join", str(mnv2), str(eff), "-o", str(joined)])
    assert result.exit_code == 0, result.output
    for name, source in (("mobilenet_v2", mnv2), ("efficientnet_b0", eff)):
        np.testing.assert_array_equal(read_features(joined, name, "last+gem"), read_features(source, name, "last+gem"))
    # A file without the descriptors is not the same kind of file: join names the difference.
    result = runner.invoke(featurize, ["join", str(mnv2), str(eff_plain), "-o", str(tmp_path / "bad.h5")])
    assert result.exit_code != 0 and "descriptors" in result.output


def test_grad_cam_refuses_heads_that_never_see_the_last_block():
    from pipeline.explain.cam import CamError, require_last_block

    with pytest.raises(CamError, match="'stages\\+stage_grid'"):
        require_last_block({"feature_kind": "stages+stage_grid"})
    for kind in ("stages+grid", "gem", "both+stage_grid"):
        require_last_block({"feature_kind": kind})  # these read the last block: no error
