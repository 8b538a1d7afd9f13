"""How features were computed is recorded, and mixes are refused unless asked for (issue 10, items 4 and 7).

Every test runs on the CPU; the GPU-vs-CPU mix is played by the CPU's two
precisions (float32 and bfloat16 autocast), which also differ beyond float
rounding.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli.featurize import main as featurize_main
from pipeline.features import provenance
from pipeline.features.extract import FeaturizeConfig, run
from pipeline.features.read import read_features, read_meta, read_settings
from pipeline.features.settings import SettingsMismatch
from pipeline.heads.checkpoint import (
    ComputeWarning,
    HeadMismatch,
    check_compatible,
    save_checkpoint,
)
from pipeline.heads.model import AgeHead


def _cli(*args):
    return CliRunner().invoke(featurize_main, [str(a) for a in args])


def _common(weights):
    return ["--device", "cpu", "--decoder", "torch", "--engine", "torch", "--dtype", "float32",
            "--backbones", "mobilenet_v2", "--weights", weights, "--quiet"]


def _ranges(path):
    with h5py.File(path, "r") as h5:
        return json.loads(h5.attrs["compute_ranges"]), json.loads(h5.attrs["decoder_fallbacks"])


@pytest.mark.slow
def test_a_file_records_how_it_was_computed_and_a_rerun_another_way_is_refused(utk_folder, tmp_path,
                                                                                calibrated_mobilenet):
    out = tmp_path / "f.h5"
    common = _common(calibrated_mobilenet)
    first = _cli(utk_folder, "-o", out, *common)
    assert first.exit_code == 0, first.output
    assert "computed with: cpu float32, decoder torch-cpu, torch " in first.output
    compute = read_settings(out)["compute"]
    assert compute == {"device": "cpu", "precision": "float32", "decoder": "torch-cpu", "engine": "torch",
                       "engine_version": torch.__version__}
    ranges, fallbacks = _ranges(out)
    assert ranges == [{"rows": [0, 12], "backbones": ["mobilenet_v2"], **compute}]
    assert fallbacks == {"count": 0, "reasons": {}, "examples": []}  # the CPU decoder hands nothing over

    other = _cli(utk_folder, "-o", out, *common, "--precision", "bfloat16")
    assert other.exit_code == 1
    assert "compute:" in other.output and "cpu bfloat16-autocast" in other.output and "--allow-mixed" in other.output
    accepted = _cli(utk_folder, "-o", out, *common, "--precision", "bfloat16", "--allow-mixed")
    assert accepted.exit_code == 0 and "nothing to do" in accepted.output
    assert read_settings(out)["compute"] == compute  # left alone


def _stop_after_first_batch(total, initial):
    class Bar:
        def update(self, n):
            raise KeyboardInterrupt

        def close(self):
            pass

    return Bar()


@pytest.mark.slow
def test_resume_in_another_precision_is_refused_then_recorded_range_by_range(utk_folder, tmp_path,
                                                                              calibrated_mobilenet):
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    config = dict(data_dir=utk_folder, backbones=("mobilenet_v2",), weights=weights, batch_size=5, device="cpu",
                  decoder="torch", dtype="float32", engine="torch")
    plain = tmp_path / "plain.h5"
    run(FeaturizeConfig(out=plain, **config), log=lambda *_: None)
    mixed = tmp_path / "mixed.h5"
    with pytest.raises(KeyboardInterrupt):
        run(FeaturizeConfig(out=mixed, **config), progress=_stop_after_first_batch, log=lambda *_: None)
    assert len(list((tmp_path / "mixed.h5.parts").glob("rows-*.npz"))) == 1

    with pytest.raises(SettingsMismatch, match="unfinished job.*\n.*compute.*\n(.*\n)*.*--allow-mixed"):
        run(FeaturizeConfig(out=mixed, precision="bfloat16", **config), log=lambda *_: None)
    summary = run(FeaturizeConfig(out=mixed, precision="bfloat16", allow_mixed=True, **config), log=lambda *_: None)
    assert summary["written"] == 12

    settings = read_settings(mixed)
    assert provenance.is_mixed(settings)
    assert [r["precision"] for r in settings["compute"]] == ["float32", "bfloat16-autocast"]
    ranges, _ = _ranges(mixed)
    assert [(r["rows"], r["precision"]) for r in ranges] == [([0, 5], "float32"), ([5, 12], "bfloat16-autocast")]
    # The stored numbers are what the ranges say: float32 rows equal the float32 run's, the others moved.
    ours, reference = read_features(mixed, "mobilenet_v2"), read_features(plain, "mobilenet_v2")
    assert np.array_equal(ours[:5], reference[:5])
    assert np.abs(ours[5:] - reference[5:]).max() > 1e-3
    # A mixed file is not "the same settings" as a uniform one: refused again without the flag.
    again = _cli(utk_folder, "-o", mixed, *_common(calibrated_mobilenet), "--batch-size", "5")
    assert again.exit_code == 1 and "--allow-mixed" in again.output


def test_merge_refuses_shards_computed_differently_unless_allowed(utk_folder, tmp_path, calibrated_mobilenet):
    common = _common(calibrated_mobilenet)
    out = tmp_path / "s.h5"
    assert _cli(utk_folder, "-o", out, *common, "--shard", "0/2").exit_code == 0
    assert _cli(utk_folder, "-o", out, *common, "--shard", "1/2", "--precision", "bfloat16").exit_code == 0
    shards = [tmp_path / "s.shard-0-of-2.h5", tmp_path / "s.shard-1-of-2.h5"]
    refused = _cli("merge", *shards, "-o", tmp_path / "m.h5")
    assert refused.exit_code == 1 and "bfloat16-autocast" in refused.output and "--allow-mixed" in refused.output
    assert not (tmp_path / "m.h5").exists()
    merged = _cli("merge", *shards, "-o", tmp_path / "m.h5", "--allow-mixed")
    assert merged.exit_code == 0, merged.output
    ranges, _ = _ranges(tmp_path / "m.h5")
    assert [(r["rows"], r["precision"]) for r in ranges] == [([0, 6], "float32"), ([6, 12], "bfloat16-autocast")]
    assert provenance.is_mixed(read_settings(tmp_path / "m.h5"))


@pytest.mark.slow
def test_join_refuses_backbones_computed_differently_unless_allowed(utk_folder, tmp_path, calibrated_mobilenet):
    one, two = tmp_path / "mnv2.h5", tmp_path / "effb0.h5"
    assert _cli(utk_folder, "-o", one, *_common(calibrated_mobilenet)).exit_code == 0
    made = _cli(utk_folder, "-o", two, "--device", "cpu", "--decoder", "torch", "--engine", "torch", "--dtype",
                "float32", "--backbones", "efficientnet_b0", "--weights", "none", "--quiet", "--precision", "bfloat16")
    assert made.exit_code == 0, made.output
    refused = _cli("join", one, two, "-o", tmp_path / "j.h5")
    assert refused.exit_code == 1 and "compute" in refused.output and "--allow-mixed" in refused.output
    joined = _cli("join", one, two, "-o", tmp_path / "j.h5", "--allow-mixed")
    assert joined.exit_code == 0, joined.output
    ranges, _ = _ranges(tmp_path / "j.h5")
    assert [(r["backbones"], r["precision"]) for r in ranges] == [(["mobilenet_v2"], "float32"),
                                                                  (["efficientnet_b0"], "bfloat16-autocast")]


def test_a_head_on_features_computed_another_way_is_allowed_with_a_warning():
    cpu = {"device": "cpu", "precision": "float32", "decoder": "torch-cpu", "engine": "torch", "engine_version": "2"}
    gpu = {**cpu, "device": "cuda", "precision": "float16-autocast", "decoder": "dali-gpu"}
    meta = {"backbones": ["resnet50"], "weights": {"resnet50": "IMAGENET1K_V1"}, "group_edges": [25, 50, 75, 116],
            "compute": cpu}
    settings = {"backbones": ["resnet50"], "weights": {"resnet50": "IMAGENET1K_V1"},
                "group_edges": [25, 50, 75, 116], "compute": gpu}
    with pytest.warns(ComputeWarning, match="cpu float32.*cuda float16-autocast"):
        check_compatible(meta, settings)
    with pytest.warns(ComputeWarning, match="mixes computations"):
        check_compatible(meta, {**settings, "compute": [cpu, gpu]})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_compatible(meta, {**settings, "compute": cpu})      # same computation: silent
        check_compatible({**meta, "compute": None}, settings)    # a head from before compute records: silent
    with pytest.raises(HeadMismatch):                            # what heads do check still refuses
        check_compatible(meta, {**settings, "group_edges": [30, 60, 116]})


@pytest.mark.slow
def test_featurize_predict_and_explain_compute_one_image_alike_at_one_precision(utk_folder, tmp_path,
                                                                               calibrated_mobilenet):
    """Item 7 on the CPU twin: bfloat16 autocast, set once, gives featurize's features in predict and explain."""
    from pipeline.images.decoders import make_decoder
    from pipeline.inference.full_model import load_full_model
    from pipeline.inference.predictor import Predictor

    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    files = {}
    for precision in ("bfloat16", "float32"):
        files[precision] = tmp_path / f"{precision}.h5"
        run(FeaturizeConfig(data_dir=utk_folder, out=files[precision], backbones=("mobilenet_v2",), weights=weights,
                            batch_size=12, device="cpu", decoder="torch", dtype="float32", engine="torch",
                            precision=precision), log=lambda *_: None)
    cached = {p: read_features(f, "mobilenet_v2")[:, 0] for p, f in files.items()}
    precision_effect = np.abs(cached["bfloat16"] - cached["float32"]).max()
    assert precision_effect > 1e-2  # bfloat16 really moves the features: the test below can tell them apart

    settings = read_settings(files["bfloat16"])
    torch.manual_seed(0)
    head = AgeHead(1280).eval()
    ckpt = save_checkpoint(tmp_path / "head", head, {
        "backbones": ["mobilenet_v2"], "weights": settings["weights"], "feature_kind": "last",
        "group_edges": settings["group_edges"], "class_names": ["0-25", "26-50", "51-75", "76-116"],
        "target": "group", "feature_fingerprint": settings["fingerprint"], "preprocessing": settings["preprocessing"],
        "compute": settings["compute"], "feature_dim": 1280, "hidden": [512, 256], "config": {}, "history": [],
        "best_epoch": 0})
    paths = [str(utk_folder / p) for p in read_meta(files["bfloat16"])["path"]]
    views = make_decoder("torch", "cpu", 12).decode(paths).views

    # explain's model (full_model.FullModel.head_inputs, what Grad-CAM differentiates)
    model, _ = load_full_model(ckpt, weights, "cpu")
    model.precision = "bfloat16"
    with torch.no_grad():
        explained = model.head_inputs(views[:, 0].contiguous(memory_format=torch.channels_last)).numpy()
    assert np.abs(explained - cached["bfloat16"]).max() <= 1e-6 * np.abs(cached["bfloat16"]).max()

    # predict's backbone path: its probabilities are the head's on featurize's bfloat16 features
    with torch.no_grad():
        expected = torch.softmax(head(torch.from_numpy(cached["bfloat16"])), 1).numpy()
        other = torch.softmax(head(torch.from_numpy(cached["float32"])), 1).numpy()
    predicted, _ = Predictor(ckpt, weights, "cpu", precision="bfloat16")(views)
    gap = np.abs(expected - other).max()
    assert gap > 1e-4 and np.abs(predicted - expected).max() <= gap / 100
    float32_predicted, _ = Predictor(ckpt, weights, "cpu")(views)  # auto on the CPU is float32
    assert np.abs(float32_predicted - other).max() <= gap / 100


def test_unmarked_tests_are_pinned_to_the_cpu():
    """conftest hides CUDA from every test not marked gpu, in this process and in the ones it starts."""
    import os

    from pipeline.device import resolve_device, resolve_precision

    assert resolve_device("auto") == torch.device("cpu") and os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert resolve_precision(resolve_device("auto")) == "float32"
    assert resolve_precision("cuda") == "float16-autocast" and resolve_precision("cpu", "bfloat16") == "bfloat16-autocast"
    with pytest.raises(ValueError, match="unknown precision"):
        resolve_precision("cpu", "float8")


def test_decoder_fallbacks_reach_the_summary_and_the_file(utk_folder, tmp_path, calibrated_mobilenet, monkeypatch):
    """Files a GPU decoder hands to the CPU (decode.DecodedBatch.fallbacks) are counted, printed and stored."""
    from pipeline.images import decoders as decode

    real = decode.make_decoder

    def handing_over(*args, **kwargs):  # the CPU decoder, reporting its first two files as handed over
        decoder = real(*args, **kwargs)
        inner = decoder.decode

        def decode_batch(paths):
            batch = inner(paths)
            batch.fallbacks = [(str(p), "nvJPEG: cannot initialise") for p in paths[:2]]
            return batch

        decoder.decode = decode_batch
        return decoder

    monkeypatch.setattr(decode, "make_decoder", handing_over)
    out = tmp_path / "f.h5"
    result = _cli(utk_folder, "-o", out, *_common(calibrated_mobilenet), "--batch-size", "5")
    assert result.exit_code == 0, result.output
    assert "decoder fallbacks: 6 files decoded on the CPU instead of the GPU: 6 nvJPEG: cannot initialise" \
        in result.output  # 3 batches x 2
    _, fallbacks = _ranges(out)
    assert fallbacks["count"] == 6 and fallbacks["reasons"] == {"nvJPEG: cannot initialise": 6}
    assert len(fallbacks["examples"]) == 6 and all(p.endswith(".jpg") for p, _ in fallbacks["examples"])


@pytest.fixture
def onnx_fallback(monkeypatch, tmp_path):
    """--engine auto when the exported graph fails its check: select_engine's own fall-back to PyTorch."""
    from pipeline.backbones import engines
    from pipeline.backbones.onnx_export import CACHE_ENV

    try:
        engines.import_onnxruntime()
    except engines.EngineUnavailable as err:
        pytest.skip(f"--engine auto plans ONNX Runtime only when it is installed: {err}")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "onnx"))

    def fails(*args, **kwargs):
        raise engines.EngineUnavailable("forced: graph differs from PyTorch")

    def fall_back():
        monkeypatch.setattr(engines, "verified_onnx_backbone", fails)

    return fall_back


def test_a_file_from_an_auto_engine_fallback_is_done_on_an_identical_rerun(utk_folder, tmp_path,
                                                                           calibrated_mobilenet, onnx_fallback):
    """The plan expects ONNX Runtime, the file records PyTorch: the same command again is 'already done',
    and so is one that asks for PyTorch outright; a file computed another way is still refused."""
    config = dict(data_dir=utk_folder, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                  weights={"mobilenet_v2": str(calibrated_mobilenet)}, batch_size=6, device="cpu", decoder="torch",
                  dtype="float32")
    onnx_fallback()
    assert run(FeaturizeConfig(engine="auto", **config), log=lambda *_: None)["status"] == "written"
    assert read_settings(tmp_path / "f.h5")["compute"]["engine"] == "torch"
    assert run(FeaturizeConfig(engine="auto", **config), log=lambda *_: None)["status"] == "already done"
    assert run(FeaturizeConfig(engine="torch", **config), log=lambda *_: None)["status"] == "already done"
    with pytest.raises(SettingsMismatch, match="--allow-mixed"):
        run(FeaturizeConfig(engine="auto", precision="bfloat16", **config), log=lambda *_: None)


@pytest.mark.slow
def test_a_resume_whose_batches_really_ran_another_way_is_refused(utk_folder, tmp_path, calibrated_mobilenet,
                                                                  onnx_fallback):
    """Same plan (--engine auto), but the first batch ran on ONNX Runtime and the resume falls back to
    PyTorch: refused before computing anything, unless --allow-mixed, which records both."""
    config = dict(data_dir=utk_folder, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                  weights={"mobilenet_v2": str(calibrated_mobilenet)}, batch_size=5, device="cpu", decoder="torch",
                  dtype="float32", engine="auto")
    with pytest.raises(KeyboardInterrupt):
        run(FeaturizeConfig(**config), progress=_stop_after_first_batch, log=lambda *_: None)
    parts = tmp_path / "f.h5.parts"
    assert len(list(parts.glob("rows-*.npz"))) == 1
    onnx_fallback()
    with pytest.raises(SettingsMismatch, match=r"computed in different ways: cpu float32, decoder torch-cpu, "
                                               r"onnxruntime .* \+ cpu float32, decoder torch-cpu, torch .*--allow-mixed"):
        run(FeaturizeConfig(**config), log=lambda *_: None)
    assert len(list(parts.glob("rows-*.npz"))) == 1   # refused before computing more
    summary = run(FeaturizeConfig(allow_mixed=True, **config), log=lambda *_: None)
    assert summary["written"] == 12
    assert [r["engine"] for r in read_settings(tmp_path / "f.h5")["compute"]] == ["onnxruntime", "torch"]
    assert [(r["rows"], r["engine"]) for r in _ranges(tmp_path / "f.h5")[0]] == [([0, 5], "onnxruntime"),
                                                                                 ([5, 12], "torch")]
