"""Cut-out face crops through DALI: the pixel-fed graph (dali_pixels.py) and the face decoder's resize paths.

The aligned crops of --faces detect|box are pixels in memory, not files; the
DALI path runs the file decoder's resize/normalize/mirror graph on them. On
lossless PNGs the DALI file decoder sees exactly the same pixels, so the two
must agree to float rounding, and both agree with the torch path within
decode's documented DALI-vs-torch tolerance (1e-4 after normalization).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.constants import IMAGE_SIZE
from pipeline.faces.crops import (
    FaceCropDecoder,
    crops_to_views,
    decoder_name,
    resize_path,
)
from pipeline.faces.detect import MtcnnFaces
from pipeline.images.dali_decoder import dali_available
from pipeline.images.decoders import make_decoder
from tests.support.paths import REPO
from tests.support.scenes import background, paste

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable")
DALI_VS_TORCH = 1e-4   # README "Preprocess": torch-cpu vs dali-cpu, after normalization
SAMPLE = REPO / "sample" / "utkface"
# torchvision 0.29 warns on every decode that its image codecs move to TorchCodec.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")


def sample_crops(count: int) -> list[np.ndarray]:
    files = sorted(SAMPLE.glob("*.jpg"))[::7][:count]
    return [np.array(Image.open(f).convert("RGB")) for f in files]


@NEEDS_DALI
def test_dali_pixels_match_the_dali_file_decoder_on_the_same_pixels(tmp_path):
    from pipeline.images.dali_pixels import DaliPixels

    crops = sample_crops(5)
    # A picture of another size and shape too: the graph must resize any picture, as the file decoder does.
    crops.append(np.array(Image.fromarray(crops[0]).resize((150, 90), Image.Resampling.BILINEAR)))
    files = []
    for index, crop in enumerate(crops):
        files.append(tmp_path / f"{index}.png")
        Image.fromarray(crop).save(files[-1])   # lossless, so the file decoder decodes these very pixels
    from_pixels = DaliPixels("cpu", batch_size=4)(crops)     # 6 crops: one full batch and a short one
    from_files = make_decoder("dali", "cpu", batch_size=4).decode(files).views
    assert from_pixels.shape == (6, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert (from_pixels - from_files).abs().max().item() <= 1e-5
    torch_views = crops_to_views(crops)
    assert (from_pixels - torch_views).abs().max().item() <= DALI_VS_TORCH
    assert torch.equal(from_pixels[:, 1], from_pixels[:, 0].flip(-1))   # the second view is the mirror
    assert from_pixels.abs().mean().item() > 0.3   # real, normalized pictures, not zeros


@NEEDS_DALI
def test_dali_pixels_take_an_empty_batch():
    from pipeline.images.dali_pixels import DaliPixels

    assert DaliPixels("cpu", batch_size=2)([]).shape == (0, 2, 3, IMAGE_SIZE, IMAGE_SIZE)


@NEEDS_DALI
def test_face_decoder_on_the_dali_path_cuts_the_same_faces_and_names_the_path(tmp_path):
    crops = sample_crops(2)
    paths = []
    for index, (crop, tilt) in enumerate(zip(crops, (0.0, -12.0))):
        scene = background(360, 480, index)
        paste(scene, crop, (240, 180), 170, tilt)
        paths.append(tmp_path / f"scene{index}.png")
        Image.fromarray(scene).save(paths[-1])
    paths.append(tmp_path / "empty.png")
    Image.fromarray(background(360, 480, 9)).save(paths[-1])
    torch.manual_seed(0)
    detector = MtcnnFaces()
    on_torch = FaceCropDecoder(detector, torch.device("cpu"), resize="torch").decode(paths)
    on_dali = FaceCropDecoder(detector, torch.device("cpu"), resize="dali", batch_size=4).decode(paths)
    assert on_dali.kept == on_torch.kept == [0, 1]
    assert on_dali.failures == on_torch.failures == [(str(paths[2]), "no face found")]
    for name in on_torch.faces:
        np.testing.assert_array_equal(on_dali.faces[name], on_torch.faces[name])
    assert (on_dali.views - on_torch.views).abs().max().item() <= DALI_VS_TORCH
    assert on_dali.views.abs().mean().item() > 0.3


def test_resize_path_follows_the_decoder_option_and_names_the_decoder():
    assert resize_path("torch") == "torch"
    assert resize_path("dali") == "dali"
    assert resize_path("auto") == ("dali" if dali_available() else "torch")
    assert decoder_name("detect", torch.device("cpu"), "dali") == "faces-detect+dali-cpu"
    assert decoder_name("box", torch.device("cpu")) == "faces-box+torch-cpu"   # the name files already carry
    with pytest.raises(ValueError, match="unknown resize path"):
        decoder_name("detect", torch.device("cpu"), "pil")


def test_face_decoder_on_the_torch_path_keeps_its_name():
    decoder = FaceCropDecoder(MtcnnFaces(), torch.device("cpu"))
    assert decoder.name == "faces-detect+torch-cpu" and decoder.resize == "torch"
    assert decoder.decode([]).views.shape == (0, 2, 3, IMAGE_SIZE, IMAGE_SIZE)


@NEEDS_DALI
def test_featurize_detect_with_the_dali_decoder_resizes_on_dali(tmp_path, fast, monkeypatch):
    """featurize --faces detect --decoder dali (CPU) sends the cut-out crops through DaliPixels, says so in the
    compute record, and gives the torch path's features within DALI-vs-torch rounding."""
    from click.testing import CliRunner

    from pipeline.cli.featurize import main as featurize_main
    from pipeline.features import provenance
    from pipeline.features.read import read_features, read_settings
    from pipeline.images import dali_pixels

    folder = tmp_path / "data"
    folder.mkdir()
    scene = background(360, 480, 1)
    paste(scene, sample_crops(1)[0], (240, 180), 170, 0.0)
    Image.fromarray(scene).save(folder / "30_0_0_20170101000000001.png")
    calls = []
    original = dali_pixels.DaliPixels.__call__
    monkeypatch.setattr(dali_pixels.DaliPixels, "__call__", lambda self, crops: calls.append(len(crops)) or
                        original(self, crops))
    outs = {}
    for decoder in ("dali", "torch"):
        outs[decoder] = tmp_path / f"{decoder}.h5"
        result = CliRunner().invoke(featurize_main, [str(folder), "-o", str(outs[decoder]), "--faces", "detect",
                                                     "--decoder", decoder, "--device", "cpu", *fast])
        assert result.exit_code == 0, result.output
    assert calls == [1]   # the DALI run's one crop, and nothing from the torch run
    assert [r["decoder"] for r in provenance.records(read_settings(outs["dali"]))] == ["faces-detect+dali-cpu"]
    assert [r["decoder"] for r in provenance.records(read_settings(outs["torch"]))] == ["faces-detect+torch-cpu"]
    dali, plain = read_features(outs["dali"], "mobilenet_v2"), read_features(outs["torch"], "mobilenet_v2")
    np.testing.assert_allclose(dali, plain, rtol=2e-3, atol=2e-3)
    assert np.abs(plain).mean() > 0.05
