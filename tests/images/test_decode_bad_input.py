"""Odd and hostile files on every decode path (issue 11 items 1, 4, 5, 7, 14, 16; issue 10 items 2, 6).

Each test builds its files here: 16-bit PNGs, JPEGs with a damaged body or trailing junk, FIFOs,
folders, unreadable files and images whose header declares far too many pixels.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.images import checks as image_checks
from pipeline.images import dali_decoder
from pipeline.images.checks import (
    DEFAULT_MAX_PIXELS,
    ImageProblem,
    encoded_problem,
    parse_header,
    read_image_file,
)
from pipeline.images.dali_decoder import DaliDecoder, dali_available
from pipeline.images.decoders import make_decoder
from pipeline.images.torch_decoder import TorchDecoder
from pipeline.images.views import load_rgb, preprocess_rgb
from tests.support import imagefactory as factory

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

NEEDS_DALI = pytest.mark.skipif(not dali_available(), reason="nvidia.dali is not importable")
BACKENDS = ["torch", pytest.param("dali", marks=NEEDS_DALI)]
PATH_TOLERANCE = 0.02  # as in test_decode.py: about one 8-bit level after normalization


@pytest.fixture(scope="module", params=BACKENDS)
def decoder(request):
    return make_decoder(request.param, "cpu", batch_size=4, num_threads=2)


def png_bytes(pixels: np.ndarray, colour_type: int) -> bytes:
    """A PNG written by hand, so that 16-bit samples are stored exactly: colour type 0 gray, 2 RGB, 6 RGBA."""
    height, width = pixels.shape[:2]
    depth = 16 if pixels.dtype == np.uint16 else 8
    big_endian = pixels.astype(">u2") if depth == 16 else pixels
    raw = b"".join(b"\x00" + big_endian[row].tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def to_8_bit(pixels: np.ndarray) -> np.ndarray:
    return np.round(pixels.astype(np.float64) * 255 / 65535).astype(np.uint8)


@pytest.fixture(scope="module")
def sixteen_bit(tmp_path_factory) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit PNGs (gray, RGB, RGBA) and the 8-bit RGB pixels each must decode to."""
    folder = tmp_path_factory.mktemp("sixteen")
    rows, cols = np.mgrid[0:96, 0:72]
    gray = (rows * 680 + cols * 7).astype(np.uint16)  # uses the full 16-bit range
    rgb = np.stack([gray, gray[::-1], 65535 - gray], axis=-1)
    rgba = np.concatenate([rgb, np.full((96, 72, 1), 65535, np.uint16)], axis=-1)
    found = {}
    for name, pixels, colour_type, shown in [("gray16", gray, 0, np.stack([gray] * 3, -1)), ("rgb16", rgb, 2, rgb),
                                             ("rgba16", rgba, 6, rgb)]:
        path = folder / f"{name}.png"
        path.write_bytes(png_bytes(pixels, colour_type))
        found[name] = (path, to_8_bit(shown))
    return found


def expected_views(rgb: np.ndarray) -> torch.Tensor:
    plain = preprocess_rgb([rgb])[0]
    return torch.stack((plain, plain.flip(-1)))


# ---------------------------------------------------------------- issue 11 item 1: 16-bit PNG


@pytest.mark.parametrize("name", ["gray16", "rgb16", "rgba16"])
def test_16_bit_png_alone_scales_like_8_bit(decoder, sixteen_bit, name):
    path, rgb = sixteen_bit[name]
    batch = decoder.decode([path])
    assert batch.failures == [] and batch.kept == [0]
    assert (batch.views[0] - expected_views(rgb)).abs().max().item() <= 1e-4


def test_16_bit_png_in_a_batch_of_8_bit_jpegs(decoder, sixteen_bit, tmp_path):
    # Same size as the PNGs, so torch stacks them together: this raised "Promotion for uint16".
    jpegs = [factory.write_jpeg(tmp_path / f"face{i}.jpg", factory.asymmetric_rgb(96, 72)) for i in range(2)]
    pngs = [sixteen_bit[name][0] for name in ("gray16", "rgb16")]
    paths = [jpegs[0], pngs[0], jpegs[1], pngs[1]]
    batch = decoder.decode(paths)
    assert batch.failures == [] and batch.kept == [0, 1, 2, 3]
    for position, path in enumerate(paths):
        alone = decoder.decode([path]).views[0]
        assert torch.equal(batch.views[position], alone)
    assert (batch.views[1] - expected_views(sixteen_bit["gray16"][1])).abs().max().item() <= 1e-4


def test_load_rgb_scales_16_bit_png_as_the_decoders(sixteen_bit):
    for path, rgb in sixteen_bit.values():
        assert np.array_equal(load_rgb(path), rgb)  # PIL alone clips 16-bit gray at 255


@NEEDS_DALI
def test_16_bit_png_same_tensors_on_dali_and_torch(sixteen_bit):
    paths = [path for path, _ in sixteen_bit.values()]
    dali_views = make_decoder("dali", "cpu", batch_size=4).decode(paths).views
    torch_views = make_decoder("torch", "cpu").decode(paths).views
    assert (dali_views - torch_views).abs().max().item() <= 1e-4


# ---------------------------------------------------------------- issue 11 item 4: damaged JPEG body


def damaged_body_jpeg(path: Path) -> Path:
    """Random bytes over the middle of the entropy-coded data; both markers intact, every header intact."""
    data = bytearray(factory.jpeg_bytes(factory.asymmetric_rgb(240, 200)))
    middle = len(data) // 2
    data[middle: middle + 64] = np.random.default_rng(1).integers(0, 255, 64, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def test_damaged_jpeg_body_is_skipped_on_every_path(decoder, tmp_path):
    damaged = damaged_body_jpeg(tmp_path / "damaged.jpg")
    assert isinstance(parse_header(np.fromfile(damaged, np.uint8)), image_checks.ImageHeader)  # headers are fine
    good = factory.write_jpeg(tmp_path / "good.jpg", factory.asymmetric_rgb())
    batch = decoder.decode([good, damaged, good])
    assert batch.kept == [0, 2]
    [(path, reason)] = batch.failures
    assert path == str(damaged) and "Corrupt JPEG data" in reason
    with pytest.raises(ImageProblem, match="Corrupt JPEG data"):
        load_rgb(damaged)


# ---------------------------------------------------------------- issue 11 item 5: trailing data


@pytest.mark.parametrize("layout", ["baseline", "progressive", "restart markers"])
def test_trailing_junk_after_a_whole_jpeg_is_ignored(decoder, tmp_path, layout):
    rgb = factory.asymmetric_rgb()
    clean = tmp_path / "clean.jpg"
    options = {"progressive": {"progressive": True}, "restart markers": {"restart_marker_blocks": 2}}.get(layout, {})
    Image.fromarray(rgb).save(clean, "JPEG", quality=95, **options)
    if layout == "restart markers":
        assert b"\xff\xdd" in clean.read_bytes()  # a restart interval, so RSTn markers sit inside the scan
    junk = np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    trailing = tmp_path / "trailing.jpg"
    trailing.write_bytes(clean.read_bytes() + b"\xff\xd9" + junk + b"\xff\xd8")
    batch = decoder.decode([trailing, clean])
    assert batch.failures == [] and batch.kept == [0, 1]
    assert torch.equal(batch.views[0], batch.views[1])
    assert np.array_equal(load_rgb(trailing), load_rgb(clean))
    # A JPEG cut short is still refused, even when junk follows the cut.
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(clean.read_bytes()[: clean.stat().st_size * 2 // 3] + bytes(4096))
    assert "truncated JPEG" in decoder.decode([cut]).failures[0][1]


def test_trailing_junk_after_png_is_ignored(decoder, tmp_path):
    clean = factory.write_png(tmp_path / "clean.png", factory.asymmetric_rgb())
    trailing = tmp_path / "trailing.png"
    trailing.write_bytes(clean.read_bytes() + b"IEND\xaeB`\x82 junk" * 300)
    batch = decoder.decode([trailing, clean])
    assert batch.failures == [] and torch.equal(batch.views[0], batch.views[1])


# ---------------------------------------------------------------- items 7 and 14: unreadable and non-regular files


def decode_within(decoder, paths, seconds: float = 20):
    """Decode in a thread, so that a hang fails the test instead of blocking the suite."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(batch=decoder.decode(paths)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "decode hung"
    return result["batch"]


def test_fifo_and_folder_are_refused_without_blocking(decoder, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # nobody writes to it: a plain open() for reading would wait forever
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    good = factory.write_jpeg(tmp_path / "good.jpg", factory.asymmetric_rgb())
    batch = decode_within(decoder, [fifo, good, folder])
    assert batch.kept == [1]
    assert batch.failures == [(str(fifo), "cannot read: not a regular file (a FIFO)"),
                              (str(folder), "cannot read: not a regular file (a folder)")]
    with pytest.raises(ImageProblem, match="a FIFO"):
        load_rgb(fifo)


def test_permission_denied_is_a_skip_reason(decoder, tmp_path, monkeypatch):
    """Tests run as root, who may read anything, so the refusal is simulated at os.open."""
    locked = factory.write_jpeg(tmp_path / "locked.jpg", factory.asymmetric_rgb())
    good = factory.write_jpeg(tmp_path / "good.jpg", factory.asymmetric_rgb())
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(image_checks.os, "open", refusing)
    batch = decoder.decode([locked, good])
    assert batch.kept == [1] and batch.failures == [(str(locked), "cannot read: Permission denied")]
    with pytest.raises(ImageProblem, match="Permission denied"):
        load_rgb(locked)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_for_real(decoder, tmp_path):
    locked = factory.write_jpeg(tmp_path / "locked.jpg", factory.asymmetric_rgb())
    locked.chmod(0)
    batch = decoder.decode([locked])
    assert batch.kept == [] and "Permission denied" in batch.failures[0][1]


# ---------------------------------------------------------------- item 16: pixel limit


def huge_png(path: Path, width: int, height: int) -> Path:
    """A PNG header declaring width x height gray pixels, with one compressed row: tiny on disk."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1)))
                     + chunk(b"IEND", b""))
    return path


def huge_jpeg(path: Path, width: int, height: int) -> Path:
    """A real small JPEG whose frame header is rewritten to declare width x height."""
    data = bytearray(factory.jpeg_bytes(factory.asymmetric_rgb()))
    frame = data.index(b"\xff\xc0")
    data[frame + 5: frame + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def test_images_above_the_pixel_limit_are_refused_before_decoding(decoder, tmp_path):
    png = huge_png(tmp_path / "huge.png", 30000, 30000)
    jpeg = huge_jpeg(tmp_path / "huge.jpg", 40000, 20000)
    good = factory.write_jpeg(tmp_path / "good.jpg", factory.asymmetric_rgb())
    assert png.stat().st_size < 2000
    batch = decoder.decode([png, good, jpeg])
    assert batch.kept == [1]
    assert [path for path, _ in batch.failures] == [str(png), str(jpeg)]
    assert "30000x30000 pixels (900.0 megapixels)" in batch.failures[0][1]
    assert "40000x20000" in batch.failures[1][1] and "limit of 50 megapixels" in batch.failures[1][1]
    with pytest.raises(ImageProblem, match="too large"):
        load_rgb(png)


def test_pixel_limit_is_configurable(tmp_path):
    image = factory.write_png(tmp_path / "small.png", factory.asymmetric_rgb(120, 90))  # 10800 pixels
    data = np.fromfile(image, np.uint8)
    assert encoded_problem(data) is None and DEFAULT_MAX_PIXELS == 50_000_000
    assert "above the limit of 0.01 megapixels" in encoded_problem(data, max_pixels=10_000)
    assert encoded_problem(data, max_pixels=10_800) is None
    # No limit: the size passes, and the data check then finds the one row of 30000 missing.
    unlimited = encoded_problem(np.fromfile(huge_png(tmp_path / "huge.png", 30000, 30000), np.uint8), max_pixels=None)
    assert unlimited == "corrupt PNG (not enough pixel data)"
    strict = make_decoder("torch", "cpu", max_pixels=10_000)
    assert "too large" in strict.decode([image]).failures[0][1]
    with pytest.raises(ImageProblem, match="too large"):
        load_rgb(image, max_pixels=10_000)
    with pytest.raises(ValueError, match="max_pixels"):
        make_decoder("torch", "cpu", max_pixels=0)


# ---------------------------------------------------------------- damaged PNGs


def damaged_png(path: Path, damage: str) -> Path:
    """A PNG with one kind of damage; CRCs recomputed unless the damage is the CRC itself."""
    data = bytearray(factory.write_png(path, factory.asymmetric_rgb()).read_bytes())
    start = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[start - 4: start])
    pixels = zlib.decompress(bytes(data[start + 4: start + 4 + length]))
    if damage == "crc":
        data[start + 4 + length] ^= 0xFF
    else:
        if damage == "deflate":
            body = bytearray(data[start + 4: start + 4 + length])
            body[36] ^= 0xFF
        elif damage == "short":
            body = zlib.compress(pixels[: len(pixels) // 2])
        else:  # "filter": a row filter type of 9 (valid ones are 0-4)
            body = zlib.compress(b"\x09" + pixels[1:])
        chunk = b"IDAT" + bytes(body)
        data[start - 4: start + 8 + length] = struct.pack(">I", len(body)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", ["crc", "deflate", "short", "filter"])
def test_damaged_png_is_refused_before_libpng_sees_it(decoder, tmp_path, damage):
    """torchvision 0.29's PNG decoder kills the process (SIGSEGV) on any libpng error: never reach it."""
    bad = damaged_png(tmp_path / f"{damage}.png", damage)
    good = factory.write_png(tmp_path / "good.png", factory.asymmetric_rgb())
    batch = decoder.decode([bad, good])
    assert batch.kept == [1]
    [(path, reason)] = batch.failures
    assert path == str(bad) and "corrupt PNG" in reason
    with pytest.raises(ImageProblem, match="corrupt PNG"):
        load_rgb(bad)


def test_png_checks_accept_every_sound_layout(tmp_path):
    rgb = factory.asymmetric_rgb(37, 29)  # odd sizes: rows that do not fill whole bytes at low depths
    for mode in ["RGB", "RGBA", "L", "1", "P", "LA", "I;16"]:
        path = tmp_path / f"{mode.replace(';', '')}.png"
        Image.fromarray(rgb).convert("L" if mode == "I;16" else mode).convert(mode).save(path, "PNG")
        assert encoded_problem(np.fromfile(path, np.uint8)) is None, mode
        assert load_rgb(path).shape == (37, 29, 3)


def test_interlaced_png_passes_the_checks(tmp_path):
    rows, cols = np.mgrid[0:13, 0:11]
    pixels = np.stack([rows * 19, cols * 23, rows + cols], -1).astype(np.uint8)
    passes = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]
    raw = b"".join(b"\x00" + pixels[row, x0::dx].tobytes()
                   for x0, y0, dx, dy in passes for row in range(y0, 13, dy) if pixels[row, x0::dx].size)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    path = tmp_path / "adam7.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 11, 13, 8, 2, 0, 0, 1))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    assert encoded_problem(np.fromfile(path, np.uint8)) is None
    assert np.array_equal(load_rgb(path), pixels)  # and the decoders agree on what it holds


# ---------------------------------------------------------------- header walk


def test_header_walk_reads_size_layout_and_end(tmp_path):
    jpeg = np.frombuffer(factory.jpeg_bytes(factory.asymmetric_rgb(120, 90)), np.uint8)
    header = parse_header(np.concatenate([jpeg, np.full(100, 0xFF, np.uint8)]))
    assert (header.format, header.width, header.height, header.components, header.end) == ("jpeg", 90, 120, 3,
                                                                                           len(jpeg))
    exif = np.fromfile(factory.write_exif_rotated_jpeg(tmp_path / "e.jpg", factory.asymmetric_rgb(), 6), np.uint8)
    assert parse_header(exif).orientation == 6
    png = np.fromfile(factory.write_png(tmp_path / "p.png", factory.asymmetric_rgb(30, 20)), np.uint8)
    assert (parse_header(png).width, parse_header(png).height, parse_header(png).end) == (20, 30, len(png))
    assert parse_header(png[:-12]) == "truncated PNG (no IEND chunk)"
    assert "corrupt JPEG header" in parse_header(np.concatenate([jpeg[:3], np.zeros(50, np.uint8), jpeg[-2:]]))


def test_read_image_file(tmp_path):
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"\x01\x02\x03")
    data = read_image_file(path)
    assert data.dtype == np.uint8 and data.tolist() == [1, 2, 3] and data.flags.writeable
    with pytest.raises(FileNotFoundError):
        read_image_file(tmp_path / "missing.jpg")


# ---------------------------------------------------------------- issue 10 item 2: no silent CPU fallback


def jpeg_arrays(tmp_path, count: int) -> list[np.ndarray]:
    return [np.frombuffer(bytearray(factory.jpeg_bytes(factory.asymmetric_rgb(60 + i, 50))), np.uint8)
            for i in range(count)]


def test_one_file_nvjpeg_rejects_leaves_the_rest_on_the_gpu(tmp_path, monkeypatch):
    """The torch GPU path's retry, run on the CPU with a stand-in for the nvJPEG call."""
    import torchvision.io

    encoded = jpeg_arrays(tmp_path, 4)
    rejected = encoded[2]
    calls = []

    def stand_in(data, mode, device):
        calls.append(len(data))
        if any(item.numel() == rejected.size for item in data):
            raise RuntimeError("Error while decoding JPEG images: nvjpegDecode failed: 7")
        return [torch.zeros((3, 2, 2), dtype=torch.uint8) for _ in data]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", stand_in)
    routing = TorchDecoder(torch.device("cpu"), num_threads=1)
    images, fallbacks = routing._decode_with_nvjpeg(encoded, ["a", "b", "c", "d"])
    assert [image is not None for image in images] == [True, True, False, True]
    assert fallbacks == [("c", "nvJPEG: Error while decoding JPEG images: nvjpegDecode failed: 7")]
    assert calls == [4, 1, 1, 1, 1]  # the batch, then each file alone


def test_nvjpeg_that_cannot_start_is_loud_and_every_jpeg_is_a_fallback(tmp_path, monkeypatch):
    import torchvision.io

    def cannot_start(data, mode, device):
        raise RuntimeError("Failed to initialize nvjpeg with default backend: 5")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", cannot_start)
    routing = TorchDecoder(torch.device("cpu"), num_threads=1)
    with pytest.warns(RuntimeWarning, match="nvJPEG cannot be used.*Failed to initialize nvjpeg"):
        routing.nvjpeg_problem = routing._probe_nvjpeg()
    gray = np.frombuffer(bytearray(factory.jpeg_bytes(factory.asymmetric_rgb(), "L")), np.uint8)
    encoded = jpeg_arrays(tmp_path, 2) + [gray]
    images, fallbacks = routing._decode_with_nvjpeg(encoded, ["a", "b", "gray"])
    assert images == [None, None, None]
    assert fallbacks == [(name, "nvJPEG unusable: Failed to initialize nvjpeg with default backend: 5")
                         for name in ("a", "b")]  # the gray JPEG goes to the CPU by routing, not as a fallback


def test_cpu_decoders_report_no_fallbacks(decoder, tmp_path):
    good = factory.write_jpeg(tmp_path / "good.jpg", factory.asymmetric_rgb())
    assert decoder.decode([good]).fallbacks == []


# ---------------------------------------------------------------- issue 10 item 6: DALI errors and rebuilds


def twelve_bit_jpeg(path: Path) -> Path:
    """A JPEG whose frame header claims 12-bit samples: every check passes, every decoder refuses it."""
    data = bytearray(factory.jpeg_bytes(factory.asymmetric_rgb()))
    data[data.index(b"\xff\xc0") + 4] = 12
    path.write_bytes(bytes(data))
    return path


def test_file_only_the_decoder_rejects_keeps_the_batch(decoder, tmp_path):
    bad = twelve_bit_jpeg(tmp_path / "bad.jpg")
    assert encoded_problem(np.fromfile(bad, np.uint8)) is None
    good = [factory.write_jpeg(tmp_path / f"g{i}.jpg", factory.asymmetric_rgb(100 + i, 80)) for i in range(3)]
    batch = decoder.decode([good[0], bad, good[1], good[2]])
    assert batch.kept == [0, 2, 3] and batch.failures[0][0] == str(bad)
    assert torch.equal(batch.views, decoder.decode(good).views)
    if isinstance(decoder, DaliDecoder):
        assert decoder.rebuilds == 0  # DALI's CPU pipeline survives a bad file: nothing rebuilt


@NEEDS_DALI
def test_dali_errors_of_any_type_and_broken_pipelines(tmp_path, monkeypatch):
    """A stand-in DALI run: a marked file raises a non-RuntimeError and breaks the pipeline until rebuilt."""
    dali = make_decoder("dali", "cpu", batch_size=8, num_threads=1)
    paths = []
    for index in range(4):
        path = tmp_path / f"face{index}.jpg"
        # A JPEG comment marks the files the stand-in rejects; the probe image carries none.
        Image.fromarray(factory.asymmetric_rgb()).save(path, "JPEG", comment=b"REJECT" if index % 2 else b"fine")
        paths.append(path)
    state = {"broken": False, "builds": 0}

    def run(encoded, recyclable=False):   # DaliDecoder._run's signature
        if state["broken"]:
            raise RuntimeError("Current pipeline object is no longer valid.")
        if any(b"REJECT" in data.tobytes() for data in encoded):
            state["broken"] = True
            raise KeyError("a DALI error of another type")
        return torch.zeros((len(encoded), 2, 3, 4, 4))

    def build(*args):
        state["broken"], state["builds"] = False, state["builds"] + 1
        return object()

    monkeypatch.setattr(dali, "_run", run)
    monkeypatch.setattr(dali_decoder, "build_dali_pipeline", build)
    batch = dali.decode(paths)
    assert batch.kept == [0, 2] and batch.views.shape[0] == 2
    assert [path for path, _ in batch.failures] == [str(paths[1]), str(paths[3])]
    assert all("another type" in reason for _, reason in batch.failures)
    assert dali.rebuilds == 3 == state["builds"]  # after the batch, then after each bad file: never per good file
    state["broken"] = False
    assert dali.decode(paths[::2]).kept == [0, 1] and dali.rebuilds == 3  # a clean batch rebuilds nothing
