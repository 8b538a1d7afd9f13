"""What featurize pays beside the forward pass: recycled DALI buffers give the same views and features, and the
export cache's key is read without importing the exporter."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.features import extract
from pipeline.features.read import read_features
from pipeline.images.dali_decoder import DaliDecoder, dali_available
from pipeline.images.decoders import make_decoder
from tests.support.folders import write_utk_folder
from tests.support.paths import REPO

# torchvision 0.29 warns on every decode that its image codecs move to TorchCodec.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable")


@NEEDS_DALI
def test_a_recycled_buffer_gets_the_next_batch_and_an_unreturned_one_is_never_touched(utk_folder):
    files = sorted(str(f) for f in utk_folder.iterdir())
    first_batch, second_batch, third_batch = files[:4], files[4:8], files[8:11]   # the last one short
    reference = make_decoder("dali", "cpu", batch_size=4)
    expected = [reference.decode(batch).views.clone() for batch in (first_batch, second_batch, third_batch)]

    decoder = make_decoder("dali", "cpu", batch_size=4)
    first = decoder.decode(first_batch).views
    second = decoder.decode(second_batch).views        # `first` was not handed back: new memory
    assert second.data_ptr() != first.data_ptr()
    decoder.recycle(first)
    third = decoder.decode(third_batch).views           # written where `first` was
    assert third.data_ptr() == first.data_ptr() and len(third) == 3
    # Bit for bit the views a decoder without recycling gives; the batch not handed back is untouched.
    assert torch.equal(second, expected[1]) and torch.equal(third, expected[2])
    # Views that are not the decoder's own buffer (an empty batch, a copy) are ignored.
    decoder.recycle(torch.empty(0, 2, 3, 224, 224))
    decoder.recycle(second.clone())
    assert torch.equal(decoder.decode(first_batch).views, expected[0])


@NEEDS_DALI
def test_featurize_with_recycled_buffers_stores_the_features_of_fresh_ones(tmp_path, calibrated_mobilenet,
                                                                           monkeypatch):
    folder = tmp_path / "utk"
    write_utk_folder(folder, [3, 12, 20, 25, 26, 33, 47, 51, 60, 75, 80])   # 11 images: batches 4, 4, 3
    handed_back = []
    recycle = DaliDecoder.recycle
    monkeypatch.setattr(DaliDecoder, "recycle",
                        lambda self, views: handed_back.append(views.data_ptr()) or recycle(self, views))
    weights = {"mobilenet_v2": str(calibrated_mobilenet)}
    config = extract.FeaturizeConfig(data_dir=folder, out=tmp_path / "f.h5", backbones=("mobilenet_v2",),
                                     weights=weights, batch_size=4, device="cpu", decoder="dali", engine="torch")
    summary = extract.run(config, progress=None, log=lambda *_: None)
    assert summary["written"] == 11 and summary["compute"]["decoder"] == "dali-cpu"
    assert len(handed_back) == 3 and handed_back[2] == handed_back[0]   # the third batch reused the first's memory

    # The same batches through a decoder that never recycles, and the same runner: identical stored features.
    runner = extract.BackboneRunner(["mobilenet_v2"], weights, torch.device("cpu"), engine="torch")
    fresh = make_decoder("dali", "cpu", batch_size=4)
    files = [str(folder / p) for p in extract.make_plan(config).meta["path"]]
    expected = np.concatenate([runner(fresh.decode(files[i:i + 4]).views)["mobilenet_v2"]["features"]
                               for i in range(0, len(files), 4)]).astype(np.float16)
    np.testing.assert_array_equal(read_features(config.out, "mobilenet_v2", "last"), expected)


@pytest.mark.slow
def test_the_export_key_names_the_exporter_versions_without_importing_it():
    pytest.importorskip("onnxscript", reason="onnxscript is not installed: no ONNX export here")
    script = ("import sys; from pipeline.backbones import onnx_export; versions = onnx_export.exporter_versions(); "
              "print(versions['onnx'], versions['onnxscript'], 'onnx' in sys.modules, 'onnxscript' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    import onnx
    import onnxscript

    # The versions the cache key always held (so existing cache files stay valid), and neither package imported.
    assert shown.stdout.split() == [onnx.__version__, onnxscript.__version__, "False", "False"]
