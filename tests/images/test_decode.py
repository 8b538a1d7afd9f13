"""Decoding to two-view tensors: DALI and torch agree, odd files come out right, bad ones are reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.constants import IMAGE_SIZE, IMAGENET_MEAN, IMAGENET_STD
from pipeline.images import decoders
from pipeline.images.checks import encoded_problem
from pipeline.images.dali_decoder import dali_available
from pipeline.images.decoders import make_decoder
from pipeline.images.torch_decoder import TorchDecoder, jpeg_layout, nvjpeg_ready
from pipeline.images.views import load_rgb, preprocess_rgb, torchvision_reason
from tests.support import imagefactory as factory
from tests.support.paths import REAL_IMAGES

# torchvision 0.29 warns on every decode that its image codecs move to TorchCodec.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable")
BACKENDS = ["torch", pytest.param("dali", marks=NEEDS_DALI)]
PATH_TOLERANCE = 0.02  # max abs difference allowed between decode paths, after normalization
SMALL_BATCH = 4  # smaller than most test batches, so decode() must split them and handle a short last one


@pytest.fixture(scope="module", params=BACKENDS)
def decoder(request):
    return make_decoder(request.param, "cpu", batch_size=SMALL_BATCH, num_threads=2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    """Good images of every kind the decoders must handle, by name."""
    folder = tmp_path_factory.mktemp("images")
    rgb = factory.asymmetric_rgb()
    padded = folder / "padded.jpg"
    padded.write_bytes(factory.jpeg_bytes(rgb) + b"\x00" * 16)
    return {
        "jpeg": factory.write_jpeg(folder / "plain.jpg", rgb),
        "gray": factory.write_jpeg(folder / "gray.jpg", rgb, mode="L"),
        "cmyk": factory.write_jpeg(folder / "cmyk.jpg", rgb, mode="CMYK"),
        "png": factory.write_png(folder / "plain.png", rgb),
        "rgba": factory.write_png(folder / "rgba.png", rgb, mode="RGBA"),
        "palette": factory.write_png(folder / "palette.png", rgb, mode="P"),
        "exif6": factory.write_exif_rotated_jpeg(folder / "exif6.jpg", rgb, orientation=6),
        "large": factory.write_jpeg(folder / "large.jpg", factory.asymmetric_rgb(500, 380)),
        "padded": padded,
    }


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    """Files no decoder may keep, by the word their failure reason must contain."""
    folder = tmp_path_factory.mktemp("bad")
    rgb = factory.asymmetric_rgb()
    return {
        "truncated JPEG": factory.write_truncated_jpeg(folder / "truncated.jpg", rgb),
        "truncated PNG": factory.truncate_file(factory.write_png(folder / "truncated.png", rgb)),
        "empty": factory.write_empty(folder / "empty.jpg"),
        "not a JPEG or PNG": factory.write_garbage(folder / "garbage.jpg"),
        "not a JPEG": factory.write_text(folder / "notes.jpg"),
        "cannot decode": factory.write_corrupt_jpeg(folder / "corrupt.jpg", rgb),
        "cannot read": folder / "missing.jpg",
    }


def reference_views(path: Path) -> torch.Tensor:
    """PIL's decode with EXIF applied, through the shared torch math: [2, 3, S, S]."""
    plain = preprocess_rgb([load_rgb(path)])[0]
    return torch.stack((plain, plain.flip(-1)))


def decode_all(decoder, paths) -> torch.Tensor:
    batch = decoder.decode(paths)
    assert batch.failures == [] and batch.kept == list(range(len(paths)))
    return batch.views


def unnormalize(views: torch.Tensor) -> torch.Tensor:
    """Back to 0..255 pixel values."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (views * std + mean) * 255


def test_solid_colour_gives_hand_computed_values(decoder, tmp_path):
    colour = (255, 0, 128)
    path = factory.write_png(tmp_path / "solid.png", factory.solid_rgb(colour))
    batch = decoder.decode([path])
    assert batch.views.shape == (1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.views.dtype == torch.float32 and batch.views.device == decoder.device
    for channel, (value, mean, std) in enumerate(zip(colour, IMAGENET_MEAN, IMAGENET_STD)):
        expected = (value / 255 - mean) / std
        torch.testing.assert_close(batch.views[:, :, channel], torch.full_like(batch.views[:, :, channel], expected),
                                   atol=1e-5, rtol=0)
    assert batch.views[0, 0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)


def test_mirror_view_is_plain_view_flipped(decoder, images):
    views = decode_all(decoder, list(images.values()))
    torch.testing.assert_close(views[:, 1], views[:, 0].flip(-1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["jpeg", "gray", "cmyk", "png", "rgba", "palette", "exif6", "large", "padded"])
def test_matches_pil_reference(decoder, images, kind):
    views = decode_all(decoder, [images[kind]])[0]
    assert (views - reference_views(images[kind])).abs().max().item() <= PATH_TOLERANCE


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_rotated_jpeg_comes_out_upright(decoder, tmp_path, orientation):
    upright = factory.asymmetric_rgb()
    rotated = factory.write_exif_rotated_jpeg(tmp_path / f"exif{orientation}.jpg", upright, orientation)
    plain = decode_all(decoder, [rotated])[0, 0]
    expected = preprocess_rgb([upright])[0]
    # JPEG loss is small beside the error of a wrong turn (a mirror image of the target, here).
    assert (plain - expected).abs().mean().item() < 0.05
    assert (plain.flip(-1) - expected).abs().mean().item() > 0.5
    shown = load_rgb(rotated)
    assert shown.shape == upright.shape
    assert np.abs(shown.astype(int) - upright).mean() < 3


def test_grayscale_gives_three_equal_channels(decoder, images):
    pixels = unnormalize(decode_all(decoder, [images["gray"]])[0, 0])
    torch.testing.assert_close(pixels[1], pixels[0], atol=1e-3, rtol=0)
    torch.testing.assert_close(pixels[2], pixels[0], atol=1e-3, rtol=0)


def test_cmyk_and_png_give_the_source_colours(decoder, images):
    source = preprocess_rgb([factory.asymmetric_rgb()])[0]
    views = decode_all(decoder, [images["cmyk"], images["png"], images["rgba"], images["palette"]])[:, 0]
    assert (views[0] - source).abs().mean().item() < 0.05  # CMYK JPEG: lossy, but not inverted or swapped
    assert (views[1] - source).abs().max().item() < 1e-4
    assert (views[2] - source).abs().max().item() < 1e-4
    assert (views[3] - source).abs().mean().item() < 0.05  # palette: 256 colours


@pytest.mark.parametrize("name", ["truncated JPEG", "truncated PNG", "empty", "not a JPEG or PNG", "not a JPEG",
                                  "cannot decode", "cannot read"])
def test_bad_file_is_reported_and_its_batch_kept(decoder, images, bad_files, name):
    good = [images["jpeg"], images["png"], images["large"], images["gray"], images["cmyk"]]
    bad = bad_files[name]
    batch = decoder.decode(good[:2] + [bad] + good[2:])
    assert batch.kept == [0, 1, 3, 4, 5]
    assert len(batch.failures) == 1
    failed_path, reason = batch.failures[0]
    assert failed_path == str(bad) and name in reason
    alone = torch.cat([decoder.decode([path]).views for path in good])
    assert torch.equal(batch.views, alone)


def test_every_bad_file_in_one_batch(decoder, images, bad_files):
    paths = [images["jpeg"], *bad_files.values(), images["png"]]
    batch = decoder.decode(paths)
    assert batch.kept == [0, len(paths) - 1]
    assert [path for path, _ in batch.failures] == [str(path) for path in bad_files.values()]
    for (_, reason), word in zip(batch.failures, bad_files):
        assert word in reason


def test_short_and_empty_batches(decoder, images):
    paths = list(images.values())[: SMALL_BATCH + 2]  # one full batch, then a short one
    assert decode_all(decoder, paths).shape == (len(paths), 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert decode_all(decoder, paths[:1]).shape[0] == 1
    nothing = decoder.decode([])
    assert nothing.views.shape == (0, 2, 3, IMAGE_SIZE, IMAGE_SIZE) and nothing.kept == [] and nothing.failures == []


@NEEDS_DALI
def test_dali_and_torch_agree_on_synthetic_images(images):
    paths = list(images.values())
    dali_views = decode_all(make_decoder("dali", "cpu", batch_size=SMALL_BATCH), paths)
    torch_views = decode_all(make_decoder("torch", "cpu"), paths)
    assert (dali_views - torch_views).abs().max().item() <= PATH_TOLERANCE


@NEEDS_DALI
@pytest.mark.skipif(not REAL_IMAGES.is_dir(), reason=f"no UTKFace sample at {REAL_IMAGES}")
def test_dali_and_torch_agree_on_utkface():
    paths = sorted(REAL_IMAGES.glob("*.jpg"))[:: 997][:24]
    dali_views = decode_all(make_decoder("dali", "cpu", batch_size=8), paths)
    torch_views = decode_all(make_decoder("torch", "cpu"), paths)
    assert (dali_views - torch_views).abs().max().item() <= PATH_TOLERANCE


def test_preprocess_rgb_matches_the_torch_decoder(images):
    rgb = factory.asymmetric_rgb()
    from_decoder = make_decoder("torch", "cpu").decode([images["png"]]).views[:, 0]
    from_arrays = preprocess_rgb([rgb])
    from_tensor = preprocess_rgb(torch.from_numpy(np.stack([rgb, rgb])))
    assert torch.equal(from_arrays, from_decoder)
    assert torch.equal(from_tensor, torch.cat([from_decoder, from_decoder]))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_rgb([rgb.astype(np.float32)])


def test_file_checks():
    rgb = factory.asymmetric_rgb()
    jpeg = np.frombuffer(factory.jpeg_bytes(rgb), dtype=np.uint8)
    assert encoded_problem(jpeg) is None
    assert encoded_problem(np.concatenate([jpeg, np.zeros(8, np.uint8)])) is None
    # Any amount of data after the end marker is trailing data, not truncation (issue 11 item 5).
    assert encoded_problem(np.concatenate([jpeg, np.zeros(2000, np.uint8)])) is None
    assert "truncated JPEG" in encoded_problem(jpeg[:-2])
    assert "truncated JPEG" in encoded_problem(np.concatenate([jpeg[: len(jpeg) // 2], np.zeros(2000, np.uint8)]))
    assert encoded_problem(jpeg[:0]) == "empty file"
    assert "not a JPEG or PNG" in encoded_problem(np.frombuffer(b"GIF89a" + bytes(20), dtype=np.uint8))


def test_jpeg_layout_picks_what_nvjpeg_may_take(images):
    read = lambda kind: np.fromfile(images[kind], dtype=np.uint8)  # noqa: E731
    assert jpeg_layout(read("jpeg")) == (3, 1) and nvjpeg_ready(read("jpeg"))
    assert jpeg_layout(read("gray")) == (1, 1) and not nvjpeg_ready(read("gray"))
    assert jpeg_layout(read("cmyk")) == (4, 1) and not nvjpeg_ready(read("cmyk"))
    assert jpeg_layout(read("exif6")) == (3, 6) and not nvjpeg_ready(read("exif6"))
    assert not nvjpeg_ready(read("png"))
    with Image.open(images["exif6"]) as image:
        assert image.getexif()[factory.EXIF_ORIENTATION_TAG] == 6


def test_nvjpeg_batch_gets_plain_jpegs_and_the_cpu_the_rest(images, monkeypatch):
    """The torch GPU path's routing, run on the CPU with a stand-in for the nvJPEG call."""
    import torchvision.io

    kinds = ["jpeg", "gray", "cmyk", "png", "exif6", "large"]
    encoded = [np.fromfile(images[kind], dtype=np.uint8) for kind in kinds]
    batches = []

    def stand_in(data, mode, device):
        batches.append(len(data))
        return [torch.zeros((3, 2, 2), dtype=torch.uint8) for _ in data]

    def failing(data, mode, device):
        raise RuntimeError("nvJPEG error")

    routing = TorchDecoder(torch.device("cpu"), num_threads=1)
    monkeypatch.setattr(torchvision.io, "decode_jpeg", stand_in)
    images, fallbacks = routing._decode_with_nvjpeg(encoded, kinds)
    on_gpu = [image is not None for image in images]
    assert dict(zip(kinds, on_gpu)) == {"jpeg": True, "gray": False, "cmyk": False, "png": False,
                                        "exif6": False, "large": True}
    assert batches == [2] and fallbacks == []  # one batched call; routing by layout is no fallback
    monkeypatch.setattr(torchvision.io, "decode_jpeg", failing)
    images, fallbacks = routing._decode_with_nvjpeg(encoded, kinds)
    assert images == [None] * len(kinds)
    assert fallbacks == [("jpeg", "nvJPEG: nvJPEG error"), ("large", "nvJPEG: nvJPEG error")]


def test_make_decoder_choices(monkeypatch):
    auto = make_decoder()
    assert auto.device == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert auto.name.startswith("dali" if dali_available() else "torch")
    assert make_decoder("torch", "cpu").name == "torch-cpu"
    with pytest.raises(ValueError, match="backend"):
        make_decoder("opencv")
    with pytest.raises(ValueError, match="device"):
        make_decoder(device="tpu")
    monkeypatch.setattr(decoders, "dali_available", lambda: False)
    with pytest.raises(RuntimeError, match="DALI"):
        make_decoder("dali", "cpu")
    assert make_decoder("auto", "cpu").name == "torch-cpu"
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            make_decoder("torch", "cuda")


@NEEDS_DALI
def test_dali_cpu_decoder_name():
    assert make_decoder("dali", "cpu").name == "dali-cpu"


def test_torchvision_reason_keeps_commas_and_drops_only_the_source_prefix():
    """torchvision's 'function, file.cpp:line, ' prefix goes; a reason with commas stays whole."""
    real = torch.frombuffer(bytearray(b"\xff\xd8\xff" + b"\x00" * 50), dtype=torch.uint8)
    with pytest.raises(RuntimeError) as raised:
        __import__("torchvision").io.decode_image(real)
    reason = torchvision_reason(raised.value)
    assert ".cpp" not in reason and reason.strip()
    made_up = RuntimeError("decode_png, /src/io/image/cpu/decode_png.cpp:62, bad header, chunk IHDR, length 0")
    assert torchvision_reason(made_up) == "bad header, chunk IHDR, length 0"
    assert torchvision_reason(RuntimeError("plain, with a comma")) == "plain, with a comma"
    assert torchvision_reason(RuntimeError()) == "RuntimeError"
