"""Shared fixtures: folders of UTKFace-named images made by the test, and real-data switches."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.support.folders import face_like, write_utk_folder  # noqa: F401
from tests.support.paths import (  # noqa: F401
    REAL_IMAGES,
    REAL_WEIGHTS,
    REPO,
    SHARED,
    real_data_reason,
)


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Every test runs on the CPU unless it is marked gpu; a gpu test skips without CUDA.

    On a CUDA host, `--device auto` (the default of every command) would turn a CPU
    test into a float16-autocast GPU test judged at CPU tolerances. torch.cuda.is_available
    is what every "auto" asks (pipeline.device, decode.make_decoder), so it answers False
    here; CUDA_VISIBLE_DEVICES="" does the same for subprocesses the test starts.
    """
    if request.node.get_closest_marker("gpu"):
        if not torch.cuda.is_available():
            if os.environ.get("FROZEN_AGE_REQUIRE_GPU"):  # a GPU run must not pass by skipping its GPU tests
                pytest.fail("marked gpu and FROZEN_AGE_REQUIRE_GPU is set, but torch sees no CUDA GPU")
            pytest.skip("marked gpu: needs a CUDA GPU, and torch sees none here")
        return
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Head-training tests: the trainer's matmuls are tiny, and a second thread only adds synchronization
    (on a busy machine, waiting for it dominates). Use with pytestmark = pytest.mark.usefixtures(...)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session", autouse=True)
def onnx_cache(tmp_path_factory):
    """ONNX exports of this test session go to a temporary folder, not the user's cache."""
    folder = tmp_path_factory.mktemp("onnx-cache")
    saved = os.environ.get("FROZEN_AGE_ONNX_CACHE")
    os.environ["FROZEN_AGE_ONNX_CACHE"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("FROZEN_AGE_ONNX_CACHE", None)
    else:
        os.environ["FROZEN_AGE_ONNX_CACHE"] = saved


@pytest.fixture
def utk_folder(tmp_path) -> Path:
    """12 images over the four groups."""
    folder = tmp_path / "utk"
    write_utk_folder(folder, [3, 12, 20, 25, 26, 33, 47, 51, 60, 75, 80, 101])
    return folder


@pytest.fixture(scope="session")
def calibrated_mobilenet(tmp_path_factory) -> Path:
    """A random-init MobileNetV2 whose BatchNorm statistics were fitted to random inputs.

    Plain random init gives pooled features near 1e-9, which float16 stores as 0;
    calibrated statistics give features of order 1, so comparisons mean something.
    """
    import torch
    import torchvision

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.mobilenet_v2(weights=None)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            for _ in range(3):
                model(torch.randn(8, 3, 224, 224))
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_calibrated.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def fast(calibrated_mobilenet) -> list[str]:
    """CLI options for a quick featurize with one small, meaningful backbone."""
    return ["--backbones", "mobilenet_v2", "--weights", str(calibrated_mobilenet), "--quiet"]
