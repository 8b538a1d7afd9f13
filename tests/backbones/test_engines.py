"""Inference engines: ONNX Runtime gives PyTorch's features, its export cache, checked-once graphs that open without
PyTorch, fallbacks, mixed-engine refusal, resume."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.backbones import engine_cache, engines, onnx_export
from pipeline.backbones.registry import create_backbone
from pipeline.cli.featurize import main as featurize_cli
from pipeline.features import extract
from pipeline.features.extract import BackboneRunner
from pipeline.features.read import read_features, read_settings
from pipeline.images.decoders import make_decoder
from tests.support.folders import write_utk_folder
from tests.support.paths import REAL_IMAGES, REPO, real_data_reason

pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the PyTorch engine is tested elsewhere)")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: no ONNX export here")

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """One export cache for this module, so the cache tests see exactly the exports made here."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(onnx_export.CACHE_ENV, str(folder))  # subprocesses inherit it too
        yield folder


def views_of(files) -> torch.Tensor:
    return make_decoder("torch", "cpu").decode([str(f) for f in files]).views


def run_both(names, weights, files, descriptors=()) -> tuple[dict, dict, BackboneRunner]:
    """Features of `files` from the torch engine and the onnxruntime engine."""
    views = views_of(files)
    torch_runner = BackboneRunner(names, weights, CPU, descriptors, engine="torch")
    onnx_runner = BackboneRunner(names, weights, CPU, descriptors, engine="onnxruntime", probe_files=files,
                                 log=lambda *_: None)
    return torch_runner(views), onnx_runner(views), onnx_runner


def assert_close(reference: dict, got: dict) -> None:
    """Every output agrees within float rounding: 1e-4 of the features' scale (and 1e-4 absolute below 1)."""
    for name, outputs in reference.items():
        assert list(got[name]) == list(outputs), "same outputs, same order"
        for key, expected in outputs.items():
            scale = max(1.0, float(np.abs(expected).max()))
            assert np.abs(expected).max() > 1e-3, f"{name}/{key}: features too small to compare"
            np.testing.assert_allclose(got[name][key], expected, rtol=0, atol=1e-4 * scale, err_msg=f"{name}/{key}")


@pytest.mark.slow
def test_engines_agree_on_the_calibrated_mobilenet(utk_folder, calibrated_mobilenet, onnx_cache):
    files = sorted(utk_folder.iterdir())[:5]
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    reference, got, runner = run_both(["mobilenet_v2"], weights, files)
    assert_close(reference, got)
    assert runner.describe() == {"engine": "onnxruntime", "engine_version": __import__("onnxruntime").__version__,
                                 "opset": onnx_export.OPSET, "threads": engines.default_threads()}
    assert got["mobilenet_v2"]["features"].shape == (5, 2, 1280)
    # The batch axis is dynamic: one image alone gives the same row as inside the batch.
    alone = runner(views_of(files[2:3]))
    np.testing.assert_allclose(alone["mobilenet_v2"]["features"][0], got["mobilenet_v2"]["features"][2],
                               rtol=0, atol=1e-5)


@pytest.mark.slow
def test_descriptors_come_out_of_the_same_graph(utk_folder, calibrated_mobilenet, onnx_cache):
    files = sorted(utk_folder.iterdir())[:3]
    reference, got, runner = run_both(["mobilenet_v2"], {"mobilenet_v2": str(calibrated_mobilenet)}, files,
                                      descriptors=("gem", "grid", "stage_grid"))
    assert list(got["mobilenet_v2"]) == ["features", "stages", "gem", "grid", "stage_grid"]
    assert_close(reference, got)
    assert runner.models["mobilenet_v2"].session.get_outputs()[2].name == "gem"  # one session, five outputs


@pytest.mark.slow
def test_engines_agree_on_real_weights(onnx_cache):
    reason = real_data_reason()
    if reason:
        pytest.skip(reason)
    files = sorted(REAL_IMAGES.iterdir())[:4]
    names = ["mobilenet_v2", "resnet50", "efficientnet_b0"]
    reference, got, _ = run_both(names, {n: "IMAGENET1K_V1" for n in names}, files)
    assert_close(reference, got)


@pytest.mark.slow
def test_export_cache_is_reused_and_rebuilt_when_the_weights_change(calibrated_mobilenet, tmp_path, onnx_cache):
    backbone = create_backbone("mobilenet_v2", str(calibrated_mobilenet))
    version = __import__("onnxruntime").__version__
    path, exported = onnx_export.exported_model(backbone, version, onnx_cache, log=lambda *_: None)
    before = path.stat().st_mtime_ns
    again, exported_again = onnx_export.exported_model(backbone, version, onnx_cache, log=lambda *_: None)
    assert (again, exported_again) == (path, False) and path.stat().st_mtime_ns == before
    assert json.loads(path.with_suffix(".json").read_text())["weights_id"] == backbone.weights_id
    assert not list(onnx_cache.glob(".*partial"))

    # Other tensors under the same weights id (a replaced checkpoint) must not reuse the old graph.
    with torch.no_grad():
        backbone.model.classifier[1].bias.zero_()   # not part of the pooled features: the key still changes
        backbone.model.features[0][0].weight.mul_(1.5)
    changed, exported_changed = onnx_export.exported_model(backbone, version, onnx_cache, log=lambda *_: None)
    assert exported_changed and changed != path and changed.is_file() and path.is_file()
    session = engines.make_session(changed, 1)
    views = views_of(sorted(p for p in (REPO / "sample" / "utkface").iterdir())[:1]).flatten(0, 1)
    with torch.inference_mode():
        expected = backbone(views)["features"].numpy()
    np.testing.assert_allclose(session.run(["features"], {"views": views.numpy()})[0], expected,
                               rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_a_graph_that_does_not_match_pytorch_is_refused(utk_folder, calibrated_mobilenet, onnx_cache, monkeypatch):
    # Simulate a wrong graph: the session's features are shifted by 1e-3, ten times the allowed difference.
    real_call = engines.OnnxBackbone.__call__

    def shifted(self, x):
        out = real_call(self, x)
        return {**out, "features": out["features"] + 1e-3}

    monkeypatch.setattr(engines.OnnxBackbone, "__call__", shifted)
    forget_verdicts(onnx_cache)   # earlier tests checked this graph; a stored pass would skip the check
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    files = sorted(utk_folder.iterdir())[:2]
    with pytest.raises(engines.EngineUnavailable, match="does not reproduce PyTorch.*features"):
        BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=lambda *_: None)
    lines = []
    runner = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", probe_files=files, log=lines.append)
    assert runner.describe()["engine"] == "torch"
    assert any("PyTorch" in line and "does not reproduce" in line for line in lines)
    assert not list(onnx_cache.glob(f"*{engine_cache.VERDICT_SUFFIX}")), "a graph that failed its check has no verdict"


def forget_verdicts(cache: Path) -> None:
    for verdict in cache.glob(f"*{engine_cache.VERDICT_SUFFIX}"):
        verdict.unlink()


def test_a_checked_graph_is_checked_again_only_when_it_the_runtime_or_the_cpu_changes(
        utk_folder, calibrated_mobilenet, onnx_cache, monkeypatch):
    forget_verdicts(onnx_cache)
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    files = sorted(utk_folder.iterdir())[:2]
    lines = []
    first = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=lines.append)
    graph = first.models["mobilenet_v2"].path
    stored = json.loads(engine_cache.verdict_path(graph).read_text())
    key = engine_cache.verdict_key(graph, __import__("onnxruntime").__version__, engines.VERIFY_TOLERANCE)
    assert stored["key"] == key and stored["views"] == 4
    assert stored["key"]["graph_sha256"] == engine_cache.file_sha256(graph)
    assert 0 <= stored["max_abs_difference"] <= engines.VERIFY_TOLERANCE
    assert "on 2 of the input images" in lines[-1]

    # Later runs trust the stored pass: no probe images decoded, no PyTorch forward, no comparison.
    compared, probed = [], []
    real_difference, real_probe = engines.max_difference, engines.probe_views
    monkeypatch.setattr(engines, "max_difference", lambda *a: compared.append(1) or real_difference(*a))
    monkeypatch.setattr(engines, "probe_views", lambda *a: probed.append(1) or real_probe(*a))
    lines.clear()
    again = engines.select_engine({"mobilenet_v2": create_backbone("mobilenet_v2", weights["mobilenet_v2"])},
                                  "onnxruntime", CPU, files, lines.append)[0]["mobilenet_v2"]
    assert (compared, probed) == ([], []) and "verdict cached beside the graph" in lines[-1]
    views = views_of(files)
    np.testing.assert_array_equal(again(views.flatten(0, 1))["features"].numpy(),
                                  first(views)["mobilenet_v2"]["features"].reshape(-1, 1280))

    # Another CPU (a cache folder shared between machines): checked again, and the verdict now names it.
    monkeypatch.setattr(engine_cache, "cpu_name", lambda: "another CPU")
    BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=lambda *_: None)
    assert compared == [1] and json.loads(engine_cache.verdict_path(graph).read_text())["key"]["cpu"] == "another CPU"

    # A verdict made for other graph bytes, or an unreadable one, is not trusted either.
    stored = json.loads(engine_cache.verdict_path(graph).read_text())
    engine_cache.verdict_path(graph).write_text(json.dumps({**stored, "key": {**stored["key"],
                                                                              "graph_sha256": "0" * 64}}))
    BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=lambda *_: None)
    engine_cache.verdict_path(graph).write_text("{not json")
    BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files, log=lambda *_: None)
    assert compared == [1, 1, 1]
    assert json.loads(engine_cache.verdict_path(graph).read_text())["key"]["graph_sha256"] == \
        engine_cache.file_sha256(graph)


def test_a_checked_graph_opens_without_building_the_pytorch_model(utk_folder, calibrated_mobilenet, onnx_cache,
                                                                  monkeypatch):
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    files = sorted(utk_folder.iterdir())[:3]
    full = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime", probe_files=files,
                          log=lambda *_: None)   # builds the model, checks (or trusts) the graph, remembers it
    built = []
    real_create = extract.create_backbone
    monkeypatch.setattr(extract, "create_backbone", lambda *a, **k: built.append(a[0]) or real_create(*a, **k))
    lines = []
    quick = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", probe_files=files, log=lines.append)
    assert built == [] and "PyTorch models not built" in lines[-1]
    assert quick.describe() == full.describe() and quick.models["mobilenet_v2"].path == full.models["mobilenet_v2"].path
    views = views_of(files)
    np.testing.assert_array_equal(quick(views)["mobilenet_v2"]["features"], full(views)["mobilenet_v2"]["features"])

    # The PyTorch engine, changed forward code, or a graph whose verdict is gone: the models are built again.
    BackboneRunner(["mobilenet_v2"], weights, CPU, engine="torch")
    monkeypatch.setattr(engine_cache, "forward_code_digest", lambda: "edited code")
    BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", probe_files=files, log=lambda *_: None)
    monkeypatch.undo()
    monkeypatch.setattr(extract, "create_backbone", lambda *a, **k: built.append(a[0]) or real_create(*a, **k))
    forget_verdicts(onnx_cache)
    lines.clear()
    again = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", probe_files=files, log=lines.append)
    assert built == ["mobilenet_v2"] * 3 and "on 3 of the input images" in lines[-1]
    assert again.describe()["engine"] == "onnxruntime"


def test_the_shortcut_key_follows_the_weights_bytes_outputs_and_versions(calibrated_mobilenet, tmp_path, monkeypatch):
    from pipeline.backbones.registry import get_spec, resolve_weights_id

    outputs = ["features", "stages"]
    key = engine_cache.shortcut_key("mobilenet_v2", resolve_weights_id("mobilenet_v2", str(calibrated_mobilenet)),
                                    outputs, "1.0")
    state = torch.load(calibrated_mobilenet, weights_only=True)
    next(iter(state.values())).mul_(1.5)
    changed = tmp_path / "changed.pth"
    torch.save(state, changed)
    assert engine_cache.shortcut_key("mobilenet_v2", resolve_weights_id("mobilenet_v2", str(changed)),
                                     outputs, "1.0") != key
    assert engine_cache.shortcut_key("mobilenet_v2", key["weights_id"], outputs + ["gem"], "1.0") != key
    assert engine_cache.shortcut_key("mobilenet_v2", key["weights_id"], outputs, "2.0") != key

    # ImageNet weights: the checkpoint file torchvision would load, by content; unknown while it is not on disk.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert engine_cache.shortcut_key("mobilenet_v2", "IMAGENET1K_V1", outputs, "1.0") is None
    checkpoint = tmp_path / "hub" / "checkpoints" / Path(get_spec("mobilenet_v2").weights_enum.IMAGENET1K_V1.url).name
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"one")
    first = engine_cache.shortcut_key("mobilenet_v2", "IMAGENET1K_V1", outputs, "1.0")
    checkpoint.write_bytes(b"two")
    assert first is not None and engine_cache.shortcut_key("mobilenet_v2", "IMAGENET1K_V1", outputs, "1.0") != first


def test_fallback_when_onnxruntime_is_missing(utk_folder, calibrated_mobilenet, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)   # import onnxruntime now raises ImportError
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    lines = []
    runner = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", log=lines.append)
    assert runner.describe() == {"engine": "torch", "engine_version": torch.__version__}
    assert lines and "onnxruntime is not installed" in lines[0]
    assert engines.planned_engine("auto", CPU)["engine"] == "torch"
    with pytest.raises(engines.EngineUnavailable, match="onnxruntime is not installed"):
        BackboneRunner(["mobilenet_v2"], weights, CPU, engine="onnxruntime")

    fast = ["--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--quiet", "--limit", "2"]
    result = CliRunner().invoke(featurize_cli, [str(utk_folder), "-o", str(tmp_path / "a.h5"), *fast])
    assert result.exit_code == 0, result.output
    assert "engine: PyTorch" in result.output and "onnxruntime is not installed" in result.output
    result = CliRunner().invoke(featurize_cli, [str(utk_folder), "-o", str(tmp_path / "b.h5"), *fast,
                                                "--engine", "onnxruntime"])
    assert result.exit_code == 1 and "onnxruntime is not installed" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "b.h5").exists()


def test_fallback_when_the_exporter_is_missing(calibrated_mobilenet, tmp_path, monkeypatch, onnx_cache):
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    onnx_export.exported_model(create_backbone("mobilenet_v2", weights["mobilenet_v2"]),
                               __import__("onnxruntime").__version__, onnx_cache, log=lambda *_: None)
    monkeypatch.setitem(sys.modules, "onnxscript", None)   # import onnxscript now raises ImportError
    # A graph exported earlier still runs: only exporting needs onnx and onnxscript.
    runner = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", log=lambda *_: None)
    assert runner.describe()["engine"] == "onnxruntime"

    monkeypatch.setenv(onnx_export.CACHE_ENV, str(tmp_path / "empty-cache"))
    lines = []
    runner = BackboneRunner(["mobilenet_v2"], weights, CPU, engine="auto", log=lines.append)
    assert runner.describe()["engine"] == "torch"
    assert "onnx and onnxscript" in lines[0] and "export only" in lines[0]


def test_the_gpu_keeps_pytorch():
    assert engines.select_engine({}, "auto", torch.device("cuda"), log=lambda *_: None)[1]["engine"] == "torch"
    assert engines.planned_engine("auto", "cuda")["engine"] == "torch"
    with pytest.raises(engines.EngineUnavailable, match="CPU"):
        engines.select_engine({}, "onnxruntime", torch.device("cuda"))
    with pytest.raises(engines.EngineUnavailable, match="float32"):
        engines.select_engine({}, "onnxruntime", CPU, precision="bfloat16-autocast")


def featurize(*args) -> str:
    result = CliRunner().invoke(featurize_cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.output


def test_a_file_mixing_engines_is_refused(utk_folder, calibrated_mobilenet, tmp_path, onnx_cache):
    fast = ["--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--quiet", "--batch-size", "4"]
    out = tmp_path / "f.h5"
    # Shards computed with different engines do not merge into one file.
    featurize(utk_folder, "-o", out, *fast, "--shard", "0/2", "--engine", "torch")
    featurize(utk_folder, "-o", out, *fast, "--shard", "1/2", "--engine", "onnxruntime")
    shards = sorted(tmp_path.glob("f.shard-*-of-2.h5"))
    assert [read_settings(s)["compute"]["engine"] for s in shards] == ["torch", "onnxruntime"]
    result = CliRunner().invoke(featurize_cli, ["merge", *map(str, shards), "-o", str(tmp_path / "merged.h5")])
    assert result.exit_code == 1 and "onnxruntime" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "merged.h5").exists()

    # A finished torch file is not topped up, or redone, by the other engine.
    whole = tmp_path / "whole.h5"
    featurize(utk_folder, "-o", whole, *fast, "--engine", "torch")
    result = CliRunner().invoke(featurize_cli, [str(utk_folder), "-o", str(whole), *fast, "--engine", "onnxruntime"])
    assert result.exit_code == 1 and "onnxruntime" in result.output


def test_resume_of_a_job_started_with_the_other_engine_is_refused(utk_folder, calibrated_mobilenet, tmp_path,
                                                                  onnx_cache):
    from pipeline.features import extract

    config = extract.FeaturizeConfig(data_dir=utk_folder, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                                     weights={"mobilenet_v2": str(calibrated_mobilenet)}, batch_size=4,
                                     engine="torch")

    class StopAfterFirstBatch:
        def update(self, n):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        extract.run(config, progress=lambda total, initial: StopAfterFirstBatch(), log=lambda *_: None)
    assert len(list(Path(str(config.out) + ".parts").glob("rows-*.npz"))) == 1

    config.engine = "onnxruntime"
    with pytest.raises(extract.SettingsMismatch, match="onnxruntime"):
        extract.run(config, progress=None, log=lambda *_: None)
    assert not config.out.exists()


def _cli(*args) -> list[str]:
    return [sys.executable, str(REPO / "featurize.py"), *[str(a) for a in args]]


@pytest.mark.slow
def test_resume_after_kill_9_gives_the_same_features_with_onnxruntime(tmp_path, calibrated_mobilenet, onnx_cache):
    folder = tmp_path / "utk"
    # 150 batches: ONNX Runtime runs a batch of 2 in a few ms, and the kill must land before the end.
    write_utk_folder(folder, [(7 * i) % 117 for i in range(300)])
    args = [folder, "--backbones", "mobilenet_v2", "--weights", calibrated_mobilenet, "--quiet",
            "--batch-size", "2", "--decoder", "torch", "--engine", "onnxruntime"]
    straight = tmp_path / "straight.h5"
    featurize(*args, "-o", straight)          # also puts the graph in the cache: the killed run starts fast
    assert read_settings(straight)["compute"]["engine"] == "onnxruntime"

    out = tmp_path / "resumed.h5"
    parts = Path(str(out) + ".parts")
    proc = subprocess.Popen(_cli(*args, "-o", out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while len(list(parts.glob("rows-*.npz"))) < 2:
        if proc.poll() is not None:
            pytest.fail(f"featurize ended before it could be killed:\n{proc.stdout.read()}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail("no batch was finished in time")
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()

    resumed = subprocess.run(_cli(*args, "-o", out), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming:" in resumed.stdout and "ONNX Runtime" in resumed.stdout
    for kind in ("last", "stages"):
        np.testing.assert_array_equal(read_features(out, "mobilenet_v2", kind),
                                      read_features(straight, "mobilenet_v2", kind))
    assert read_settings(out) == read_settings(straight)


@pytest.mark.slow
def test_predict_gives_the_same_answers_with_either_engine(utk_folder, calibrated_mobilenet, tmp_path, onnx_cache):
    from pipeline.backbones.registry import resolve_weights_id
    from pipeline.cli.predict import main as predict_main
    from pipeline.constants import group_names
    from pipeline.heads.checkpoint import save_checkpoint
    from pipeline.heads.model import AgeHead

    edges = [25, 50, 75, 116]
    files = sorted(utk_folder.iterdir())
    backbone = create_backbone("mobilenet_v2", str(calibrated_mobilenet))
    with torch.inference_mode():
        feats = backbone(views_of(files)[:, 0])["features"]
    torch.manual_seed(1)
    head = AgeHead(feats.shape[1], (16,), 0.0, edges, "group")
    with torch.no_grad():  # standardized with these images' statistics, confident: the answers differ per image
        head.feature_mean.copy_(feats.mean(0))
        head.feature_std.copy_(feats.std(0) + 1e-3)
        head.mlp[-1].weight.mul_(30.0)
    meta = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": resolve_weights_id(
                "mobilenet_v2", str(calibrated_mobilenet))}, "feature_kind": "last", "group_edges": edges,
            "class_names": group_names(edges), "target": "group", "feature_fingerprint": "test",
            "preprocessing": {}, "feature_dim": feats.shape[1], "hidden": [16], "config": {}, "history": [],
            "best_epoch": 1}
    checkpoint = save_checkpoint(tmp_path / "head", head, meta)

    probabilities = {}
    for engine in ("torch", "onnxruntime"):
        out = tmp_path / f"{engine}.csv"
        result = CliRunner().invoke(predict_main, [str(utk_folder), "--checkpoint", str(checkpoint), "--weights",
                                                   f"mobilenet_v2={calibrated_mobilenet}", "--device", "cpu",
                                                   "--engine", engine, "-o", str(out), "--quiet"])
        assert result.exit_code == 0, result.output
        rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
        probabilities[engine] = np.array([[float(v) for v in row[2:6]] for row in rows])
    assert "engine: ONNX Runtime" in result.output
    assert len(probabilities["torch"]) == 12 and probabilities["torch"].argmax(1).min() != \
        probabilities["torch"].argmax(1).max()  # not one answer for every image
    np.testing.assert_allclose(probabilities["onnxruntime"], probabilities["torch"], atol=1e-4)
