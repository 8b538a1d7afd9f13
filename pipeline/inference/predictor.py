"""Age groups for pictures: full models (backbones + heads) run on files or on the faces found in them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.device import compute_precision
from pipeline.heads.data import assemble_features
from pipeline.images.checks import DEFAULT_MAX_PIXELS


@dataclass
class Prediction:
    file: str
    probs: np.ndarray          # [C] group probabilities
    age: float | None          # years, for age-regression heads
    face: int | None = None    # --faces detect: index of the face in its picture (largest first)
    box: np.ndarray | None = None      # --faces detect: x0, y0, x1, y1 in the picture's pixels
    score: float | None = None         # --faces detect: the detector's probability
    landmarks: np.ndarray | None = None  # --faces detect: [5, 2] eyes, nose, mouth corners (x, y); NaN if unknown


class Predictor:
    """The full model of one or more head checkpoints (full_model.load_full_model), ready to label decoded images.

    Several checkpoints make an ensemble: each backbone is built and run once
    per batch, each head reads its own features from those outputs, and the
    heads' probabilities are averaged (ages too, when every head predicts one),
    as `evaluate --ensemble` does on cached features.
    weights: optional {backbone: path or enum}, needed when a head was trained
    on features from a local weights file (the checkpoint holds only its name
    and hash); they must have the id recorded in the checkpoint.
    """

    def __init__(self, checkpoints, weights: dict[str, str] | None = None, device: str = "auto",
                 labels: list[str] | None = None, precision: str = "auto", engine: str = "torch",
                 probe_files=(), log=None):
        """checkpoints: one or a list, each a path or a loaded HeadCheckpoint; labels name them in errors.

        engine: engines.ENGINES, for the backbones' forward; probe_files: a few of the images to
        predict, which ONNX Runtime's graphs are checked on against PyTorch; log: where to say which.
        """
        from pipeline.backbones.engines import select_engine
        from pipeline.device import resolve_device, resolve_precision
        from pipeline.heads.checkpoint import HeadCheckpoint, load_checkpoint
        from pipeline.inference.full_model import load_full_models

        checkpoints = list(checkpoints) if isinstance(checkpoints, (list, tuple)) else [checkpoints]
        labels = labels or [f"head {i + 1}" for i in range(len(checkpoints))]
        loaded = [c if isinstance(c, HeadCheckpoint) else load_checkpoint(c) for c in checkpoints]
        # Check the heads agree before building any backbone (which may mean loading weights).
        groups = list(loaded[0].meta["class_names"])
        for label, ckpt in zip(labels[1:], loaded[1:]):
            if list(ckpt.meta["class_names"]) != groups:
                raise ValueError(f"{label} predicts groups {list(ckpt.meta['class_names'])}, "
                                 f"{labels[0]} predicts {groups}: an ensemble needs the same groups")
        self.device = resolve_device(device)
        self.precision = precision
        self.backbones = {}  # (name, weights id) -> backbone, shared by the heads
        models = load_full_models(loaded, weights, self.device, labels if len(loaded) > 1 else None,
                                  self.backbones)
        self.members = list(zip(models, loaded))
        # The forward per backbone: the PyTorch module, or an ONNX Runtime session exported from it (engines.py).
        self.forwards, self.engine = select_engine(self.backbones, engine, self.device, probe_files,
                                                   log or (lambda *_: None),
                                                   precision=resolve_precision(self.device, precision))
        self.checkpoint = self.members[0][1]
        self.meta = self.checkpoint.meta

    @torch.inference_mode()
    def __call__(self, views: torch.Tensor, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """views [B, 2, 3, S, S] -> (probabilities [B, C], ages [B] or None); with tta both views are averaged."""
        n_views = 2 if tta else 1
        x = views[:, :n_views].to(self.device).flatten(0, 1)  # [B * n_views, 3, S, S]
        x = x.contiguous(memory_format=torch.channels_last)
        # The precision featurize and explain use on this device (device.compute_precision), so features match.
        with compute_precision(self.device, self.precision):
            pooled = {key: forward(x) for key, forward in self.forwards.items()}
        probs, ages = [], []
        for model, ckpt in self.members:
            own = {name: pooled[(name, str(ckpt.meta["weights"][name]))] for name in model.names}
            features = assemble_features(own, model.names, model.feature_kind).float()
            p = torch.softmax(model.head(features).float(), dim=1)
            probs.append(p.reshape(len(views), n_views, -1).mean(1))
            age = ckpt.predict_age(features)
            ages.append(None if age is None else age.float().reshape(len(views), n_views).mean(1))
        prob = torch.stack(probs).mean(0).cpu().numpy()
        age = None if any(a is None for a in ages) else torch.stack(ages).mean(0).cpu().numpy()
        return prob, age


def predict_files(predictor: Predictor, files: list[Path], decoder, batch_size: int, tta: bool = False,
                  progress=None) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Predict every file; returns (predictions in input order, [(file, reason)] for files that failed)."""
    predictions, failures = [], []
    for lo in range(0, len(files), batch_size):
        chunk = [str(p) for p in files[lo:lo + batch_size]]
        decoded = decoder.decode(chunk)
        failures += decoded.failures
        if decoded.kept:
            probs, ages = predictor(decoded.views, tta)
            for k, position in enumerate(decoded.kept):
                predictions.append(Prediction(chunk[position], probs[k], None if ages is None else float(ages[k])))
        if progress is not None:
            progress(len(chunk))
    return predictions, failures


WHOLE = "whole"  # AlignedFace.framing of a picture used whole (a head trained on aligned crops)


def whole_picture(rgb: np.ndarray):
    """The picture itself as its one face (faces.detect.AlignedFace), for heads trained on aligned crops."""
    from pipeline.faces.detect import AlignedFace, Face

    height, width = rgb.shape[:2]
    face = Face(np.array([0, 0, width, height], np.float32), np.full((5, 2), np.nan, np.float32))
    return AlignedFace(rgb, face, np.array([[1.0, 0, 0], [0, 1.0, 0]]), WHOLE)


def picture_faces(name: str, rgb: np.ndarray, mode):
    """faces.crops.PictureFaces of a decoded picture: every face `mode` finds, cut out (largest first), or the
    whole picture when the mode is `aligned`."""
    from pipeline.faces.crops import PictureFaces
    from pipeline.faces.detect import align_face

    if mode.name == "aligned":
        return PictureFaces(name, rgb, [whole_picture(rgb)])
    return PictureFaces(name, rgb, [align_face(rgb, face) for face in mode.locate(rgb)])


def label_pictures(predictor: Predictor, pictures: list, batch_size: int, tta: bool = False) -> list[Prediction]:
    """One prediction per face of every picture (faces.crops.PictureFaces), in picture order, largest first."""
    faces = [(picture, k, aligned) for picture in pictures for k, aligned in enumerate(picture.faces)]
    found = []
    for start in range(0, len(faces), batch_size):  # a group photo can hold more faces than a batch
        chunk = faces[start:start + batch_size]
        probs, ages = face_probabilities(predictor, [(picture.rgb, aligned) for picture, _, aligned in chunk], tta)
        found += [Prediction(picture.path, probs[i], None if ages is None else float(ages[i]), k,
                             aligned.face.box.astype(float), float(aligned.face.score),
                             aligned.face.landmarks.astype(float))
                  for i, (picture, k, aligned) in enumerate(chunk)]
    return found


def predict_faces(predictor: Predictor, files: list[Path], mode, batch_size: int, tta: bool = False,
                  annotated_dir: Path | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  progress=None) -> tuple[list[Prediction], list[tuple[str, str]], list[str], list[Path]]:
    """Every face of every picture: (one prediction per face, [(file, reason)] for pictures that could not be
    read, pictures with no face, annotated copies written). Faces are cut out as featurize --faces detect
    does (faces/crops.py). progress(n) is called as pictures are done."""
    from pipeline.faces.crops import NO_FACE, read_faces

    predictions, failures, empty, annotated = [], [], [], []
    for lo in range(0, len(files), batch_size):
        chunk = files[lo:lo + batch_size]
        pictures, bad = read_faces([str(p) for p in chunk], mode, max_pixels)
        empty += [file for file, reason in bad if reason == NO_FACE]
        failures += [(file, reason) for file, reason in bad if reason != NO_FACE]
        found = label_pictures(predictor, pictures, batch_size, tta)
        predictions += found
        if annotated_dir is not None:
            annotated += write_annotated(pictures, found, list(predictor.meta["class_names"]), annotated_dir)
        if progress is not None:
            progress(len(chunk))
    return predictions, failures, empty, annotated


def face_probabilities(predictor: Predictor, faces: list, tta: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities [N, C], ages [N] or None) of faces cut out of pictures: [(picture rgb, detect.AlignedFace)].

    With tta each face is cut out again at every faces.detect.TTA_ZOOMS side, and the plain and mirrored views
    of every cut are averaged: the framing of a face found in a photo is only known to a few percent.
    """
    from pipeline.faces.crops import crops_to_views
    from pipeline.faces.detect import TTA_ZOOMS, align_face

    zooms = TTA_ZOOMS if tta else (1.0,)
    runs = []
    for zoom in zooms:
        # A picture used whole (an aligned crop) has no framing to vary: it stays as it is.
        crops = [aligned.crop if zoom == 1.0 or aligned.framing == WHOLE
                 else align_face(rgb, aligned.face, zoom=zoom).crop for rgb, aligned in faces]
        runs.append(predictor(crops_to_views(crops, predictor.device), tta))
    probs = np.mean([p for p, _ in runs], axis=0)
    ages = None if runs[0][1] is None else np.mean([a for _, a in runs], axis=0)
    return probs, ages


def write_annotated(pictures, predictions: list[Prediction], class_names: list[str], folder: Path) -> list[Path]:
    """One PNG per picture: the photo with each face's box, index, group and probability (and age)."""
    from pipeline.faces.drawing import annotate_faces, save_annotated

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for picture in pictures:
        own = [p for p in predictions if p.file == picture.path]
        labels = [f"{p.face}: {class_names[int(p.probs.argmax())]} {p.probs.max():.2f}"
                  + (f" ({p.age:.0f} y)" if p.age is not None else "") for p in own]
        path = folder / f"{Path(picture.path).stem}_faces.png"
        counter = 1
        while path in written:  # two photos with the same name in different folders
            counter += 1
            path = folder / f"{Path(picture.path).stem}_faces-{counter}.png"
        save_annotated(path, annotate_faces(picture.rgb, [p.box for p in own], labels))
        written.append(path)
    return written
