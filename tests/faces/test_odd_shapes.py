"""--faces detect on pictures of odd shapes: tiny ones are a clean per-file reason, panoramas are searched in tiles."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.faces.crops import read_faces
from pipeline.faces.detect import NO_FACE_BORDER, make_face_mode, panorama_tiles
from tests.support.paths import REPO

SAMPLE_FACE = REPO / "sample" / "utkface" / "16_0_1_20170116200802213.jpg.chip.jpg"


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("facenet_pytorch", reason="--faces detect needs facenet-pytorch")
    return make_face_mode("detect", "cpu")


def test_tiny_pictures_are_a_clean_reason_for_their_file_only(detector, tmp_path):
    good = tmp_path / "good.jpg"
    Image.open(SAMPLE_FACE).convert("RGB").resize((300, 300)).save(good)
    odd = {"dot.png": (1, 1), "banner.png": (30, 3000), "sliver.png": (3000, 8), "small.png": (15, 15)}
    for name, (height, width) in odd.items():
        Image.fromarray(np.full((height, width, 3), 90, np.uint8)).save(tmp_path / name)
    paths = [tmp_path / name for name in odd] + [good]
    found, failed = read_faces(paths, detector)
    assert [p.path for p in found] == [str(good)]   # the good picture is not lost
    assert dict(failed) == {str(tmp_path / name): "no face found" for name in odd}


@pytest.mark.slow
def test_a_panorama_is_searched_in_tiles(detector):
    face = np.asarray(Image.open(SAMPLE_FACE).convert("RGB").resize((300, 300)))
    assert detector.locate(face), "the sample face is found on its own"
    panorama = np.full((300, 12000, 3), 120, np.uint8)
    panorama[:, 7000:7300] = face
    faces = detector.locate(panorama)   # shrunk whole to 1024 wide, the face would be 25 pixels
    assert len(faces) == 1
    x0, y0, x1, y1 = faces[0].box
    assert 6950 < x0 < (x0 + x1) / 2 < x1 < 7350 and -NO_FACE_BORDER * 300 < y0 < y1 < 330


def test_panorama_tiles_overlap_by_the_short_side_and_cover_the_picture():
    assert panorama_tiles(300, 1000, 1024) == [] and panorama_tiles(3000, 4000, 1024) == []
    tiles = panorama_tiles(300, 12000, 1024)
    assert tiles[0][:2] == (0, 0) and tiles[-1][3] == 12000
    assert all(t[2] == 300 and t[3] - t[1] == 1024 for t in tiles)
    assert all(a[3] - b[1] >= 300 for a, b in zip(tiles, tiles[1:]))   # any 300-pixel face lies whole in one
    tall = panorama_tiles(9000, 200, 1024)
    assert tall[0] == (0, 0, 1024, 200) and tall[-1][2] == 9000
