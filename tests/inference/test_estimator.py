"""AgeEstimator: pictures in three forms, batches, framings, the weights-file check, and its docstring example."""

from __future__ import annotations

import doctest
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.inference.estimator import AgeEstimator, picture_rgb
from tests.inference.builders import head_probabilities, save_head, write_photos
from tests.support.paths import REPO

FACE_KEYS = ["age", "box", "group", "landmarks", "probabilities", "score"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="module")
def detect_head(tmp_path_factory):
    return save_head(tmp_path_factory.mktemp("heads") / "detect", "detect")


@pytest.fixture(scope="module")
def estimator(detect_head):
    return AgeEstimator(detect_head, device="cpu", engine="torch")


def test_one_face_on_a_portrait_none_on_a_cat_and_the_head_is_applied_to_the_cut_out_face(estimator, photos,
                                                                                           detect_head):
    from pipeline.faces.detect import align_face, make_face_mode

    faces = estimator.predict(photos["portrait"])
    assert len(faces) == 1 and sorted(faces[0]) == FACE_KEYS
    face = faces[0]
    x0, y0, x1, y1 = face["box"]
    assert 150 < x0 < x1 < 300 and 40 < y0 < y1 < 200      # the astronaut's face, in the 512x512 picture
    assert face["score"] > 0.9 and len(face["landmarks"]) == 5
    left_eye, right_eye = face["landmarks"][:2]
    assert x0 < left_eye[0] < right_eye[0] < x1 and y0 < left_eye[1] < y1
    assert face["age"] is None                                 # a group head
    # The probabilities are the head's on the face cut out in UTKFace's framing.
    rgb = picture_rgb(photos["portrait"])
    crop = align_face(rgb, make_face_mode("detect").locate(rgb)[0]).crop
    expected = head_probabilities(detect_head, [crop])[0]
    got = np.array(list(face["probabilities"].values()))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert face["group"] == list(face["probabilities"])[int(expected.argmax())]
    assert estimator.predict(photos["cat"]) == []


def test_path_pil_image_and_array_give_the_same_answer_and_a_list_is_one_batch(estimator, photos, tmp_path):
    png = tmp_path / "astronaut.png"
    Image.open(photos["portrait"]).save(png)          # lossless: the same pixels as the decoded JPEG
    by_path = estimator.predict(photos["portrait"])
    assert estimator.predict(str(photos["portrait"])) == by_path
    assert estimator.predict(Image.open(photos["portrait"])) == by_path
    assert estimator.predict(np.asarray(Image.open(photos["portrait"]).convert("RGB"))) == by_path
    assert estimator.predict(png) == by_path
    # A list: one list of faces per picture, in order, the same as one at a time.
    calls = []
    original = estimator.predictor.__class__.__call__
    estimator.predictor.__class__.__call__ = lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    try:
        batch = estimator.predict([photos["cat"], photos["portrait"], np.asarray(Image.open(png))])
    finally:
        estimator.predictor.__class__.__call__ = original
    assert batch == [[], by_path, by_path]
    assert len(calls) == 1                             # both faces went through the model together


def test_a_picture_turned_by_exif_gives_the_same_answer_as_a_path_or_as_a_pil_image(estimator, photos, tmp_path):
    image = Image.open(photos["portrait"]).transpose(Image.Transpose.ROTATE_90)   # stored on its side...
    exif = Image.Exif()
    exif[0x0112] = 6                                                              # ...and turned back by EXIF
    turned = tmp_path / "turned.jpg"
    image.save(turned, quality=95, exif=exif)
    by_path = estimator.predict(turned)
    assert len(by_path) == 1 and estimator.predict(Image.open(turned)) == by_path
    x0, y0, x1, y1 = by_path[0]["box"]
    assert 150 < x0 < x1 < 300 and 40 < y0 < y1 < 200  # upright again, so where the face is in the original


def test_bad_pictures_are_refused_in_one_line(estimator, tmp_path):
    with pytest.raises(ValueError, match="HxWx3 uint8"):
        estimator.predict(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="give a path, a PIL image"):
        estimator.predict(42)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(ValueError, match="missing.jpg"):
        estimator.predict(missing)
    (tmp_path / "bad.jpg").write_bytes(b"not a picture at all")
    with pytest.raises(ValueError, match="bad.jpg"):
        estimator.predict(tmp_path / "bad.jpg")


def test_an_aligned_head_takes_the_picture_whole_and_a_detect_override_warns(tmp_path, photos):
    head = save_head(tmp_path / "aligned", "aligned", seed=5, target="age")
    estimator = AgeEstimator(head, device="cpu", engine="torch")
    assert estimator.faces == "aligned"
    faces = estimator.predict(photos["cat"])          # an aligned head cannot tell: the picture is the face
    assert len(faces) == 1 and faces[0]["box"] == [0.0, 0.0, 451.0, 300.0]
    assert faces[0]["score"] is None and faces[0]["landmarks"] is None and 0 < faces[0]["age"] < 120
    expected = head_probabilities(head, [picture_rgb(photos["cat"])])[0]
    np.testing.assert_allclose(list(faces[0]["probabilities"].values()), expected, atol=1e-4)
    with pytest.warns(UserWarning, match="trained on whole aligned face crops .* but is used on faces found"):
        overridden = AgeEstimator(head, device="cpu", engine="torch", faces="detect")
    assert overridden.predict(photos["cat"]) == []


def test_a_weights_file_other_than_the_recorded_one_is_refused_in_one_line(tmp_path, monkeypatch):
    from pipeline.backbones.weights_hash import WeightsFileMismatch, check_weights_files

    meta = {"backbones": ["mobilenet_v2"], "weights": {"mobilenet_v2": "IMAGENET1K_V1"},
            "weights_sha256": {"mobilenet_v2": "b0353104" + "0" * 56}}
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert check_weights_files(meta) == ["mobilenet_v2"]          # not there yet: checked after the download
    (checkpoints / "mobilenet_v2-b0353104.pth").write_bytes(b"some other weights under the same name")
    with pytest.raises(WeightsFileMismatch) as caught:
        check_weights_files(meta, "model X")
    message = str(caught.value)
    assert "\n" not in message and "mobilenet_v2-b0353104.pth" in message and "model X" in message
    import hashlib

    meta["weights_sha256"]["mobilenet_v2"] = hashlib.sha256(b"some other weights under the same name").hexdigest()
    assert check_weights_files(meta) == []


def test_a_head_recording_another_weights_file_is_refused_at_load(tmp_path, monkeypatch):
    from pipeline.backbones.weights_hash import WeightsFileMismatch

    head = save_head(tmp_path / "h", "detect", extra={"weights": {"mobilenet_v2": "IMAGENET1K_V1"},
                                                      "weights_sha256": {"mobilenet_v2": "0" * 64}})
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "mobilenet_v2-b0353104.pth").write_bytes(b"not torchvision's file")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(WeightsFileMismatch, match="is not the mobilenet_v2 weights file checkpoint .* was trained"):
        AgeEstimator(head, device="cpu", engine="torch")


def test_an_ensemble_of_heads_framed_differently_is_refused(tmp_path):
    from pipeline.inference.estimator import load_heads, open_predictor
    from pipeline.inference.framing import FramingMismatch

    loaded, labels = load_heads([save_head(tmp_path / "a", "detect"), save_head(tmp_path / "b", "aligned")])
    with pytest.raises(FramingMismatch, match=r"framed in different ways.*\(detect\).*\(aligned\)"):
        open_predictor(loaded, labels, device="cpu", engine="torch")


def mobilenet_weights_reason() -> str | None:
    home = os.environ.get("TORCH_HOME")
    if not home or not (Path(home) / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth").is_file():
        return "needs torchvision's MobileNetV2 ImageNet file in TORCH_HOME/hub/checkpoints (the shipped model's)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(mobilenet_weights_reason() is not None, reason=str(mobilenet_weights_reason()))
def test_the_docstring_example_runs(monkeypatch):
    monkeypatch.chdir(REPO)      # the example names a sample file relative to the repository
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    tests = finder.find(AgeEstimator, "AgeEstimator", globs={})
    assert tests and tests[0].examples
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)   # the shipped model here: no framing or detector warning
        for test in tests:
            runner.run(test)
    assert runner.summarize(verbose=False).failed == 0
