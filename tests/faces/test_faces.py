"""Faces in ordinary pictures: MTCNN detection, UTKFace-style alignment, featurize/predict --faces.

Real pictures only: scikit-image's astronaut() portrait and UTKFace crops from
sample/utkface pasted into made-up scenes with a known transform, so the cut-out
face can be compared with the crop that was pasted.
"""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.faces.detect import (
    BOX_TO_SIDE,
    CROP_SIZE,
    EYE_MIDPOINT,
    EYE_SPAN_TO_SIDE,
    TTA_ZOOMS,
    Face,
    FaceHint,
    MtcnnFaces,
    align_face,
    choose_face,
    crosses_edge,
    mirror_landmarks,
    paste_back,
)
from tests.support.paths import REPO
from tests.support.scenes import background, crop_geometry, paste

SAMPLE = REPO / "sample" / "utkface"
# Two sample crops with frontal faces of different people and ages.
CROPS = ["20_0_0_20170117134052589.jpg.chip.jpg", "16_0_1_20170116200802213.jpg.chip.jpg"]


def sample_crop(name: str) -> np.ndarray:
    return np.asarray(Image.open(SAMPLE / name).convert("RGB"))


@pytest.fixture(scope="module")
def detector() -> MtcnnFaces:
    torch.manual_seed(0)
    return MtcnnFaces()


def run(command, args):
    result = CliRunner().invoke(command, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


# --------------------------------------------------------------------------- detection and alignment


def test_astronaut_portrait_has_one_face_with_a_plausible_box(detector):
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image (the test extra) ships astronaut()")
    picture = skimage_data.astronaut()  # 512x512, Eileen Collins, head in the upper left-middle
    faces = detector.locate(picture)
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    assert 150 < (x0 + x1) / 2 < 300 and 60 < (y0 + y1) / 2 < 200, face.box   # where her face is
    assert 60 < x1 - x0 < 150 and 80 < y1 - y0 < 180                          # a head, not a patch or the photo
    assert face.score > 0.99
    left_eye, right_eye = face.landmarks[:2]
    assert left_eye[0] < right_eye[0] and abs(left_eye[1] - right_eye[1]) < 10   # an upright portrait
    aligned = align_face(picture, face)
    assert aligned.crop.shape == (CROP_SIZE, CROP_SIZE, 3) and aligned.framing == "eyes"
    # The eyes land where UTKFace puts them.
    eyes_in_crop = (np.linalg.inv(np.vstack([aligned.to_picture, [0, 0, 1]]))[:2]
                    @ np.c_[face.landmarks[:2], np.ones(2)].T).T
    np.testing.assert_allclose(eyes_in_crop.mean(0), np.array(EYE_MIDPOINT) * CROP_SIZE, atol=0.5)
    assert np.linalg.norm(eyes_in_crop[1] - eyes_in_crop[0]) == pytest.approx(CROP_SIZE / EYE_SPAN_TO_SIDE, rel=1e-3)


@pytest.mark.parametrize("name,centre,side,tilt", [
    (CROPS[0], (320, 240), 200, 0.0),      # same size, centred: almost the original crop
    (CROPS[0], (150, 130), 110, 15.0),     # small, top left, turned clockwise
    (CROPS[0], (470, 300), 240, -22.0),    # large, turned the other way
    (CROPS[1], (420, 160), 150, 8.0),
    (CROPS[1], (200, 330), 90, -12.0),
])
def test_pasted_crop_is_found_and_cut_out_like_the_original(detector, name, centre, side, tilt):
    crop = sample_crop(name)
    scene = background(480, 640, seed=len(name) + int(side))
    paste_map = paste(scene, crop, centre, side, tilt)
    faces = detector.locate(scene)
    assert len(faces) == 1
    aligned = align_face(scene, faces[0])
    assert aligned.framing == "eyes"
    # The cut-out square against the pasted one: centre, size and angle.
    true_centre, true_side, true_angle = crop_geometry(paste_map, CROP_SIZE)
    got_centre, got_side, got_angle = crop_geometry(aligned.to_picture, CROP_SIZE)
    assert np.linalg.norm(got_centre - true_centre) < 0.08 * true_side
    assert got_side / true_side == pytest.approx(1.0, abs=0.12)
    assert abs(got_angle - true_angle) < 5.0
    # And the pixels: the cut-out face looks like the original crop, far more than like a shifted one.
    error = np.abs(aligned.crop.astype(float) - crop).mean()
    shifted = np.abs(np.roll(aligned.crop, 30, axis=1).astype(float) - crop).mean()
    assert error < 30 and error < 0.7 * shifted


def test_alignment_undoes_the_tilt(detector):
    """The same face pasted level and turned by 20 degrees is cut out as nearly the same part of the original."""
    crop = sample_crop(CROPS[1])
    in_original = []
    for tilt in (0.0, 20.0):
        scene = background(480, 640, seed=3)
        paste_map = paste(scene, crop, (320, 240), 180, tilt)
        aligned = align_face(scene, detector.locate(scene)[0])
        # aligned crop -> scene -> original crop coordinates
        to_original = np.linalg.inv(np.vstack([paste_map, [0, 0, 1]])) @ np.vstack([aligned.to_picture, [0, 0, 1]])
        in_original.append(crop_geometry(to_original[:2], CROP_SIZE))
    (centre_a, side_a, angle_a), (centre_b, side_b, angle_b) = in_original
    # Level in the original's frame whatever the tilt: the same angle both times, and near 0 (this face's
    # eyes sit ~4 degrees off level in its UTKFace crop, which UTKFace framed with its own landmarks).
    assert abs(angle_a - angle_b) < 2 and abs(angle_a) < 6 and abs(angle_b) < 6
    assert np.linalg.norm(centre_a - centre_b) < 0.06 * CROP_SIZE
    assert side_a / side_b == pytest.approx(1.0, abs=0.12)


def test_mirror_landmarks_maps_a_mirror_images_landmarks_back():
    in_mirror = np.array([[60, 80], [130, 82], [95, 120], [70, 150], [120, 152]], np.float64)
    back = mirror_landmarks(in_mirror, 200)
    # The eye on the mirror's left is the picture's right eye: order swaps, x reflects, y stays.
    np.testing.assert_allclose(back, [[70, 82], [140, 80], [105, 120], [80, 152], [130, 150]])
    np.testing.assert_allclose(mirror_landmarks(back, 200), in_mirror)


def test_mirror_image_detection_maps_back_onto_the_pictures_own(detector):
    crop = sample_crop(CROPS[0])
    scene = background(300, 300, seed=9)
    scene[50:250, 50:250] = crop
    plain = detector._detect(scene)[0].landmarks
    mirrored = mirror_landmarks(detector._detect(np.ascontiguousarray(scene[:, ::-1]))[0].landmarks, 300)
    assert plain[0, 0] < plain[1, 0] and mirrored[0, 0] < mirrored[1, 0]   # eye on the picture's left first
    # The same points up to MTCNN's own left-right asymmetry (measured: eyes 2.7 px, mouth corners 7 px);
    # unswapped, the eyes would be the 75 px eye distance apart.
    assert np.abs(mirrored[:2] - plain[:2]).max() < 4 and np.abs(mirrored - plain).max() < 10


def test_close_up_look_frames_a_face_alike_at_every_size_position_and_tilt():
    """The same crop pasted at five sizes, positions and tilts: with the close-up look its cut-out square,
    seen in the original crop's frame, moves, scales and turns much less from paste to paste than with
    MTCNN's first landmarks alone."""
    pastes = [((320, 240), 80, 0.0), ((200, 180), 120, 18.0), ((420, 260), 170, -12.0),
              ((300, 240), 230, 6.0), ((250, 250), 100, -22.0)]
    with_close_up, first_look_only = MtcnnFaces(), MtcnnFaces(close_up=False)
    assert with_close_up.settings()["close_up"] and first_look_only.settings()["close_up"] is None  # fingerprinted
    spread = {}
    for detector_ in (with_close_up, first_look_only):
        centre, log_side, angle = [], [], []
        for name in CROPS:
            frames = []
            for k, (where, side, tilt) in enumerate(pastes):
                scene = background(480, 640, seed=11 + k)
                paste_map = paste(scene, sample_crop(name), where, side, tilt)
                (face,) = detector_.locate(scene)
                cut = align_face(scene, face).to_picture
                in_original = np.linalg.inv(np.vstack([paste_map, [0, 0, 1]])) @ np.vstack([cut, [0, 0, 1]])
                frames.append(crop_geometry(in_original[:2], CROP_SIZE))
            centre.append(np.linalg.norm(np.std([c for c, _, _ in frames], axis=0)))
            log_side.append(np.std([np.log(s) for _, s, _ in frames]))
            angle.append(np.std([a for _, _, a in frames]))
        spread[detector_.close_up] = np.array([sum(centre), sum(log_side), sum(angle)])
    # Measured: centre 2.2 vs 3.3 px, side 0.024 vs 0.037, angle 0.9 vs 2.3 degrees (sums over the two crops).
    assert (spread[True] < 0.8 * spread[False]).all(), spread


def test_face_crossing_the_picture_edge_gets_the_landmarks_it_gets_inside_a_scene(detector):
    """A whole UTKFace crop, whose face box crosses the picture's edges, gets about the landmarks the same
    crop gets pasted 1:1 into a bigger scene. MTCNN alone clips such a box and stretches the cut: its
    landmarks are 20-30 px off here (featurize --faces detect on UTKFace crops: eye distance +15%)."""
    for name in CROPS:
        crop = sample_crop(name)
        scene = background(400, 400, seed=5)
        scene[100:300, 100:300] = crop
        (inside,) = detector.locate(scene)
        expected = inside.landmarks - 100
        (clipped,) = detector._detect(crop)               # MTCNN's own answer, before the second look
        assert crosses_edge(clipped, crop.shape[:2])
        assert np.abs(clipped.landmarks - expected).max() > 15
        (whole,) = detector.locate(crop)
        assert np.abs(whole.landmarks - expected).max() < 8
        span = np.linalg.norm(whole.landmarks[1] - whole.landmarks[0])
        assert span == pytest.approx(np.linalg.norm(expected[1] - expected[0]), rel=0.08)


def test_scene_without_a_face_has_none(detector):
    for seed in range(3):
        assert detector.locate(background(480, 640, seed=100 + seed)) == []


def test_two_faces_largest_first_and_the_given_box_picks_the_other(detector):
    scene = background(480, 640, seed=7)
    big = paste(scene, sample_crop(CROPS[0]), (180, 240), 220, 0.0)
    small = paste(scene, sample_crop(CROPS[1]), (500, 200), 120, 5.0)
    faces = detector.locate(scene)
    assert len(faces) == 2
    assert faces[0].area > faces[1].area
    big_centre, small_centre = crop_geometry(big, CROP_SIZE)[0], crop_geometry(small, CROP_SIZE)[0]
    assert choose_face(faces) == 0
    assert np.linalg.norm(faces[0].centre - big_centre) < 40
    hint = FaceHint(box=np.array([470, 170, 530, 240], np.float32))   # a label box on the small face
    assert np.linalg.norm(faces[choose_face(faces, hint)].centre - small_centre) < 30


def test_profile_landmarks_fall_back_to_the_box():
    picture = np.zeros((300, 300, 3), np.uint8)
    box = np.array([100, 80, 200, 210], np.float32)
    profile = Face(box, np.array([[150, 130], [158, 131], [170, 160], [150, 180], [160, 181]], np.float32), 0.99)
    aligned = align_face(picture, profile)
    assert aligned.framing == "box"
    side = crop_geometry(aligned.to_picture, CROP_SIZE)[1]
    assert side == pytest.approx(BOX_TO_SIDE * 130, rel=1e-6)   # x box height, not EYE_SPAN_TO_SIDE x 8 px
    frontal = Face(box, np.array([[130, 130], [170, 130], [150, 160], [135, 180], [165, 180]], np.float32), 0.99)
    assert align_face(picture, frontal).framing == "eyes"


def test_zoom_scales_the_square_about_its_centre():
    picture = np.zeros((300, 300, 3), np.uint8)
    face = Face(np.array([100, 80, 200, 210], np.float32),
                np.array([[130, 128], [172, 134], [150, 160], [135, 180], [165, 180]], np.float32), 0.99)
    centre, side, angle = crop_geometry(align_face(picture, face).to_picture, CROP_SIZE)
    for zoom in (0.95, 1.05):
        zoomed_centre, zoomed_side, zoomed_angle = crop_geometry(align_face(picture, face, zoom=zoom).to_picture,
                                                                 CROP_SIZE)
        np.testing.assert_allclose(zoomed_centre, centre, atol=1e-9)
        assert zoomed_side == pytest.approx(zoom * side) and zoomed_angle == pytest.approx(angle)


def test_paste_back_inverts_the_crop():
    """A map in the crop's frame pasted into the picture lands where the crop came from."""
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    face = Face(np.array([100, 60, 180, 160], np.float32),
                np.array([[120, 100], [160, 108], [140, 125], [125, 140], [155, 145]], np.float32), 0.99)
    aligned = align_face(picture, face)
    back, inside = paste_back(picture, aligned.crop.astype(np.float32), aligned.to_picture)
    assert inside.sum() > 3000
    # Where the crop covers the picture, crop-then-paste-back reproduces the picture up to resampling blur.
    spread = np.abs(picture[inside] - picture[inside].mean(0)).mean()
    assert np.abs(back[inside] - picture[inside]).mean() < 0.5 * spread


# --------------------------------------------------------------------------- featurize --faces


def write_scene(path: Path, crops: list[tuple[str, tuple, float, float]], seed: int) -> Path:
    scene = background(480, 640, seed)
    for name, centre, side, tilt in crops:
        paste(scene, sample_crop(name), centre, side, tilt)
    Image.fromarray(scene).save(path)  # PNG: no recompression, so the detector sees what the test made
    return path


@pytest.fixture(scope="module")
def scene_folder(tmp_path_factory) -> Path:
    """Four UTKFace-named scenes: one face, one face turned, two faces, no face."""
    folder = tmp_path_factory.mktemp("scenes") / "data"
    folder.mkdir()
    write_scene(folder / "30_0_0_20170101000000001.png", [(CROPS[0], (300, 220), 180, 0.0)], 1)
    write_scene(folder / "60_1_0_20170101000000002.png", [(CROPS[1], (200, 260), 150, -15.0)], 2)
    write_scene(folder / "20_0_1_20170101000000003.png",
                [(CROPS[0], (170, 240), 210, 0.0), (CROPS[1], (500, 190), 110, 5.0)], 3)
    write_scene(folder / "45_1_1_20170101000000004.png", [], 4)
    return folder


def test_featurize_detect_stores_faces_and_skips_the_faceless_scene(scene_folder, fast, tmp_path):
    from pipeline.cli.featurize import main as featurize_main
    from pipeline.features.read import (
        read_meta,
        read_row_group,
        read_settings,
        read_skipped,
    )

    out = tmp_path / "detect.h5"
    result = run(featurize_main, [scene_folder, "-o", out, "--faces", "detect", "--device", "cpu", "--batch-size", 2,
                                  *fast])
    assert result.exit_code in (0, 3), result.output   # 3: finished, some inputs skipped (the faceless scene)
    meta = read_meta(out)
    assert sorted(Path(p).name for p in meta["path"]) == ["20_0_1_20170101000000003.png",
                                                          "30_0_0_20170101000000001.png",
                                                          "60_1_0_20170101000000002.png"]
    with h5py.File(out) as h5:
        assert dict(read_skipped(h5)) == {"45_1_1_20170101000000004.png": "no face found"}
    faces = read_row_group(out, "faces")
    assert faces["box"].shape == (3, 4) and faces["landmarks"].shape == (3, 5, 2)
    by_name = {Path(p).name: i for i, p in enumerate(meta["path"])}
    two = by_name["20_0_1_20170101000000003.png"]
    assert faces["faces_found"][two] == 2 and faces["faces_found"][by_name["30_0_0_20170101000000001.png"]] == 1
    assert abs((faces["box"][two][0] + faces["box"][two][2]) / 2 - 170) < 40   # the larger face was used
    assert (faces["score"] > 0.9).all() and set(faces["framing"]) == {"eyes"}
    settings = read_settings(out)
    assert settings["faces"]["mode"] == "detect"
    assert settings["faces"]["detector"].startswith("facenet-pytorch-mtcnn==")


def test_face_decoder_locates_in_parallel_as_one_by_one_and_keeps_the_callers_threads(scene_folder, detector):
    """The decoder's workers run MTCNN on one intra-op thread each; the picture order, the faces kept and the
    skip reasons are those of locating the pictures one by one, and the calling thread keeps its threads."""
    from pipeline.faces.crops import NO_FACE, FaceCropDecoder, decode_rgb

    paths = sorted(scene_folder.iterdir())
    threads = torch.get_num_threads()
    batch = FaceCropDecoder(detector, torch.device("cpu")).decode(paths)
    assert torch.get_num_threads() == threads
    # torch.set_num_threads also sets the count new threads start with: the decoder must leave it as it was.
    with ThreadPoolExecutor(1) as later:
        assert later.submit(torch.get_num_threads).result() == threads
    expected_boxes, faceless = [], []
    for path in paths:
        faces = detector.locate(decode_rgb(np.fromfile(path, dtype=np.uint8)))
        (expected_boxes if faces else faceless).append(faces[choose_face(faces)].box if faces else str(path))
    assert [paths[k] for k in batch.kept] == [p for p in paths if str(p) not in faceless]
    np.testing.assert_allclose(batch.faces["box"], np.array(expected_boxes), atol=1e-3)
    assert batch.failures == [(name, NO_FACE) for name in faceless]
    assert batch.views.shape == (len(batch.kept), 2, 3, 224, 224)


def test_sharded_detect_runs_merge_into_the_single_run(scene_folder, fast, tmp_path):
    """The per-row face record travels through shards and merge like the features do."""
    from pipeline.cli.featurize import main as featurize_main
    from pipeline.features.read import read_features, read_row_group, read_settings

    single = tmp_path / "single.h5"
    common = ["--faces", "detect", "--device", "cpu", "--batch-size", 1, *fast]
    assert run(featurize_main, [scene_folder, "-o", single, *common]).exit_code in (0, 3)
    for index in range(2):
        assert run(featurize_main, [scene_folder, "-o", tmp_path / "sharded.h5", "--shard", f"{index}/2",
                                    *common]).exit_code in (0, 3)
    merged = tmp_path / "merged.h5"
    result = run(featurize_main, ["merge", tmp_path / "sharded.shard-0-of-2.h5", tmp_path / "sharded.shard-1-of-2.h5",
                                  "-o", merged])
    assert result.exit_code == 0, result.output
    assert read_settings(merged)["fingerprint"] == read_settings(single)["fingerprint"]
    one, two = read_row_group(single), read_row_group(merged)
    assert sorted(one) == sorted(two) == ["box", "faces_found", "framing", "landmarks", "score"]
    for name in one:
        np.testing.assert_array_equal(one[name], two[name])
    np.testing.assert_array_equal(read_features(single, "mobilenet_v2"), read_features(merged, "mobilenet_v2"))


def test_featurize_detect_features_are_those_of_the_cut_out_crop(scene_folder, fast, tmp_path, detector):
    """Detect mode runs the ordinary decode math on the aligned crop: featurizing that crop as an aligned
    picture (saved losslessly) gives the same features."""
    from pipeline.cli.featurize import main as featurize_main
    from pipeline.features.read import read_features, read_meta

    name = "30_0_0_20170101000000001.png"
    single = tmp_path / "one"
    single.mkdir()
    (single / name).write_bytes((scene_folder / name).read_bytes())
    crops = tmp_path / "crops"
    crops.mkdir()
    scene = np.asarray(Image.open(scene_folder / name).convert("RGB"))
    Image.fromarray(align_face(scene, detector.locate(scene)[0]).crop).save(crops / name)
    detect, aligned = tmp_path / "detect.h5", tmp_path / "aligned.h5"
    assert run(featurize_main, [single, "-o", detect, "--faces", "detect", "--device", "cpu", *fast]).exit_code == 0
    assert run(featurize_main, [crops, "-o", aligned, "--decoder", "torch", "--device", "cpu", *fast]).exit_code == 0
    assert len(read_meta(detect)["path"]) == 1
    a, b = read_features(detect, "mobilenet_v2"), read_features(aligned, "mobilenet_v2")
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-3)
    assert np.abs(a).mean() > 0.05   # features of a real size, so the comparison means something


def test_aligned_mode_adds_nothing_to_the_file(scene_folder, fast, tmp_path):
    from pipeline.cli.featurize import main as featurize_main
    from pipeline.features.read import read_row_group, read_settings

    out = tmp_path / "aligned.h5"
    result = run(featurize_main, [SAMPLE, "-o", out, "--limit", 4, "--device", "cpu", *fast])
    assert result.exit_code == 0, result.output
    assert "faces" not in read_settings(out)   # so UTKFace files keep the fingerprint they always had
    assert read_row_group(out, "faces") == {}


def test_featurize_box_mode_uses_the_labelled_box(scene_folder, fast, tmp_path):
    """--faces box: no detector; the CSV's x,y,w,h (here on the smaller face of the two-face scene) is cut out."""
    from pipeline.cli.featurize import main as featurize_main
    from pipeline.features.read import read_meta, read_row_group, read_settings

    labels = tmp_path / "labels.csv"
    labels.write_text("path,age,x,y,w,h\n"
                      "20_0_1_20170101000000003.png,20,455,140,90,110\n"
                      "45_1_1_20170101000000004.png,45,,,,\n")
    out = tmp_path / "box.h5"
    result = run(featurize_main, [scene_folder, "-o", out, "--faces", "box", "--labels", labels, "--device", "cpu",
                                  *fast])
    assert result.exit_code in (0, 3), result.output
    assert list(read_meta(out)["age"]) == [20]
    faces = read_row_group(out, "faces")
    np.testing.assert_allclose(faces["box"][0], [455, 140, 545, 250])
    assert faces["framing"][0] == "box" and np.isnan(faces["score"][0])
    assert read_settings(out)["faces"]["mode"] == "box"
    assert "no face box or eye points given" in result.output


# --------------------------------------------------------------------------- predict --faces detect


@pytest.fixture(scope="module")
def mnv2_head(tmp_path_factory, calibrated_mobilenet):
    """A random head over the calibrated MobileNetV2's pooled features, confident enough to vary by face."""
    from pipeline.backbones.registry import get_spec, resolve_weights_id
    from pipeline.constants import group_names
    from pipeline.heads.checkpoint import save_checkpoint
    from pipeline.heads.model import AgeHead

    edges = [25, 50, 75, 116]
    width = get_spec("mobilenet_v2").feature_width
    torch.manual_seed(3)
    head = AgeHead(width, (16,), 0.0, edges, "group")
    with torch.no_grad():
        head.mlp[-1].weight.mul_(20.0)
    meta = {"backbones": ["mobilenet_v2"],
            "weights": {"mobilenet_v2": resolve_weights_id("mobilenet_v2", str(calibrated_mobilenet))},
            "feature_kind": "last", "group_edges": edges, "class_names": group_names(edges), "target": "group",
            "feature_fingerprint": "test", "preprocessing": {}, "feature_dim": width, "hidden": [16],
            "config": {}, "history": [], "best_epoch": 1}
    return save_checkpoint(tmp_path_factory.mktemp("head") / "head", head, meta)


@pytest.mark.slow
def test_predict_detect_writes_one_row_per_face_and_an_annotated_copy(scene_folder, mnv2_head, calibrated_mobilenet,
                                                                      detector, tmp_path):
    from pipeline.cli.predict import main as predict_main

    out = tmp_path / "pred.csv"
    weights = f"mobilenet_v2={calibrated_mobilenet}"
    result = run(predict_main, [scene_folder, "--checkpoint", mnv2_head, "--weights", weights, "--faces", "detect",
                                "--device", "cpu", "-o", out])
    assert result.exit_code in (0, 3), result.output
    with out.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    per_file = {}
    for row in rows:
        per_file.setdefault(Path(row["file"]).name, []).append(row)
    assert {k: len(v) for k, v in per_file.items()} == {"20_0_1_20170101000000003.png": 2,
                                                         "30_0_0_20170101000000001.png": 1,
                                                         "45_1_1_20170101000000004.png": 1,
                                                         "60_1_0_20170101000000002.png": 1}
    faceless = per_file["45_1_1_20170101000000004.png"][0]   # a picture without a face keeps one empty row
    assert faceless["face"] == "" and faceless["score"] == ""
    rows = [r for r in rows if r["face"] != ""]
    two = per_file["20_0_1_20170101000000003.png"]
    assert [r["face"] for r in two] == ["0", "1"]
    widths = [float(r["x1"]) - float(r["x0"]) for r in two]
    assert widths[0] > widths[1]                       # largest first
    assert all(float(r["score"]) > 0.9 for r in rows)
    # Each face's probabilities are the head's on its cut-out crop, labelled as an aligned picture.
    scene = np.asarray(Image.open(scene_folder / "20_0_1_20170101000000003.png").convert("RGB"))
    crop_dir = tmp_path / "crops"
    crop_dir.mkdir()
    for k, face in enumerate(detector.locate(scene)):
        Image.fromarray(align_face(scene, face).crop).save(crop_dir / f"face{k}.png")
    aligned_out = tmp_path / "aligned.csv"
    result = run(predict_main, [crop_dir, "--checkpoint", mnv2_head, "--weights", weights, "--decoder", "torch",
                                "--device", "cpu", "-o", aligned_out])
    assert result.exit_code == 0, result.output
    with aligned_out.open(newline="") as handle:
        aligned = {Path(r["file"]).stem: r for r in csv.DictReader(handle)}
    probability_columns = [c for c in rows[0] if c.startswith("p_")]
    for k, row in enumerate(two):
        np.testing.assert_allclose([float(row[c]) for c in probability_columns],
                                   [float(aligned[f"face{k}"][c]) for c in probability_columns], atol=1e-4)
    # --tta: each face's probabilities average its cut-outs at faces.TTA_ZOOMS sides, each plain and mirrored.
    tta_out = tmp_path / "pred_tta.csv"
    result = run(predict_main, [scene_folder / "20_0_1_20170101000000003.png", "--checkpoint", mnv2_head,
                                "--weights", weights, "--faces", "detect", "--tta", "--device", "cpu", "-o", tta_out])
    assert result.exit_code == 0, result.output
    with tta_out.open(newline="") as handle:
        tta_rows = list(csv.DictReader(handle))
    zoom_dir = tmp_path / "zoomed"
    zoom_dir.mkdir()
    for k, face in enumerate(detector.locate(scene)):
        for zoom in TTA_ZOOMS:
            Image.fromarray(align_face(scene, face, zoom=zoom).crop).save(zoom_dir / f"face{k}_{zoom}.png")
    zoom_out = tmp_path / "zoomed.csv"
    result = run(predict_main, [zoom_dir, "--checkpoint", mnv2_head, "--weights", weights, "--decoder", "torch",
                                "--tta", "--device", "cpu", "-o", zoom_out])
    assert result.exit_code == 0, result.output
    with zoom_out.open(newline="") as handle:
        zoomed = {Path(r["file"]).stem: r for r in csv.DictReader(handle)}
    for k, row in enumerate(tta_rows):
        expected = np.mean([[float(zoomed[f"face{k}_{zoom}"][c]) for c in probability_columns] for zoom in TTA_ZOOMS], 0)
        np.testing.assert_allclose([float(row[c]) for c in probability_columns], expected, atol=1e-4)
    # The annotated copy: same size as the photo, red box pixels around each face.
    annotated = tmp_path / "pred_annotated" / "20_0_1_20170101000000003_faces.png"
    assert annotated.is_file()
    drawn = np.asarray(Image.open(annotated).convert("RGB")).astype(int)
    assert drawn.shape == scene.shape
    changed = np.abs(drawn - scene).sum(-1) > 60
    for row in two:
        x0, y0, x1, y1 = (int(round(float(row[c]))) for c in ("x0", "y0", "x1", "y1"))
        assert changed[(y0 + y1) // 2, max(x0 - 1, 0):x0 + 3].any()   # the box's left edge is drawn
    assert not changed[(y0 + y1) // 2, (x0 + x1) // 2]                 # the face itself is left alone


# --------------------------------------------------------------------------- explain --faces detect


def test_explain_detect_maps_each_face_crop_and_pastes_it_back(scene_folder, mnv2_head, calibrated_mobilenet,
                                                               detector, tmp_path):
    from pipeline.cli.explain import main as explain_main
    from pipeline.explain.overlays import title_band_height

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("20_0_1_20170101000000003.png", "45_1_1_20170101000000004.png"):
        (photos / name).write_bytes((scene_folder / name).read_bytes())
    weights = f"mobilenet_v2={calibrated_mobilenet}"
    out = tmp_path / "cams"
    result = run(explain_main, [photos, "-c", mnv2_head, "--weights", weights, "--faces", "detect", "--save-npy",
                                "--device", "cpu", "-o", out])
    assert result.exit_code != 0 or "no face found" in result.output   # the faceless photo is reported...
    assert "45_1_1_20170101000000004.png: no face found" in result.output
    with (out / "explanations.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["face"] for r in rows] == ["0", "1"]                       # ...and both faces of the other explained
    # The map of a face equals explain's map of its cut-out crop given as an aligned picture.
    scene = np.asarray(Image.open(photos / "20_0_1_20170101000000003.png").convert("RGB"))
    faces = detector.locate(scene)
    crops = tmp_path / "crops"
    crops.mkdir()
    Image.fromarray(align_face(scene, faces[0]).crop).save(crops / "largest.png")
    result = run(explain_main, [crops, "-c", mnv2_head, "--weights", weights, "--save-npy", "--device", "cpu",
                                "-o", tmp_path / "crop_cams"])
    assert result.exit_code == 0, result.output
    face_map = np.load(out / rows[0]["npy"])
    crop_map = np.load(next((tmp_path / "crop_cams").glob("largest_*.npy")))
    assert face_map.shape == (CROP_SIZE, CROP_SIZE) and face_map.max() > 0
    np.testing.assert_allclose(face_map, crop_map, rtol=1e-4, atol=1e-5 * face_map.max())
    # Pasted back: the photo overlay changes the picture only inside that face's crop square.
    photo_overlay = np.asarray(Image.open(out / rows[0]["photo_overlay"]).convert("RGB")).astype(int)
    band = photo_overlay.shape[0] - scene.shape[0]
    assert band == title_band_height(scene.shape[1], 2) or band == title_band_height(scene.shape[1], 3)
    changed = np.abs(photo_overlay[band:] - scene).sum(-1) > 30
    aligned = align_face(scene, faces[0])
    _, inside = paste_back(scene, np.zeros((CROP_SIZE, CROP_SIZE), np.float32), aligned.to_picture)
    box = faces[0].box.round().astype(int)
    outside_box = np.ones_like(inside)
    outside_box[box[1] - 4:box[3] + 5, box[0] - 4:box[0] + 5] = False   # the drawn box and its label may
    outside_box[box[1] - 4:box[3] + 5, box[2] - 4:box[2] + 5] = False   # lie outside the crop square
    outside_box[max(box[1] - 60, 0):box[1] + 5, box[0] - 4:box[2] + 5] = False
    outside_box[:10] = False   # the title's descenders reach into the picture's first rows
    outside_box[box[3] - 4:box[3] + 5, box[0] - 4:box[2] + 5] = False
    assert not changed[~inside & outside_box].any()
    assert changed[inside].mean() > 0.2
