"""AgeEstimator: the Python API. Pictures in (paths, PIL images or arrays), faces with age groups out.

`open_predictor` is the loading path predict shares with it: heads by name or folder, the backbone weights
file checked by content (backbones.weights_hash), one face framing for all heads (framing), then the Predictor.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Callable, Sequence

import numpy as np


def load_heads(models: Sequence[str | Path | None]) -> tuple[list, list[str]]:
    """(loaded HeadCheckpoints, a label for each) of shipped model names or checkpoint folders (None: default)."""
    from pipeline.heads.checkpoint import load_checkpoint
    from pipeline.models import DEFAULT_MODEL, resolve_checkpoint

    loaded, labels = [], []
    for model in models:
        folder = resolve_checkpoint(model)
        if not folder.exists():
            raise FileNotFoundError(f"checkpoint {folder} does not exist (nor is it a shipped model's name)")
        loaded.append(load_checkpoint(folder))
        labels.append(f"model {model or DEFAULT_MODEL}" if str(model or DEFAULT_MODEL) != str(folder)
                      else f"checkpoint {folder}")
    return loaded, labels


def open_predictor(loaded: list, labels: list[str], faces: str | None = None, device: str = "auto",
                   engine: str = "auto", precision: str = "auto", weights: dict | None = None,
                   probe_files: Sequence = (), log: Callable = lambda *_: None, warn: Callable = warnings.warn):
    """(Predictor, face mode) for loaded heads. faces: 'aligned', 'detect' or None for the heads' own framing.

    Raises framing.FramingMismatch for an ensemble of heads framed differently, weights_hash.WeightsFileMismatch
    for a weights file other than the one a head records, and what Predictor raises. warn(line) is called for a
    --faces other than the heads' framing and for other detector settings.
    """
    from pipeline.faces.detect import make_face_mode
    from pipeline.inference.framing import detector_warning, framing_of_heads, framing_warning
    from pipeline.inference.predictor import Predictor
    from pipeline.backbones.weights_hash import check_weights_files

    trained = framing_of_heads([ckpt.meta for ckpt in loaded], labels)
    used = faces or trained
    message = framing_warning(trained, used)
    if message:
        warn(message)
    absent = [check_weights_files(ckpt.meta, label) for ckpt, label in zip(loaded, labels)]
    predictor = Predictor(loaded, weights, device, labels=labels, engine=engine, precision=precision,
                          probe_files=probe_files, log=log)
    for ckpt, label, missing in zip(loaded, labels, absent):
        if missing:  # torchvision has just downloaded it
            check_weights_files(ckpt.meta, label)
    mode = make_face_mode(used, predictor.device)
    if used == "detect":
        message = next(filter(None, (detector_warning(ckpt.meta, mode.settings()) for ckpt in loaded)), None)
        if message:
            warn(message)
    return predictor, mode


def picture_rgb(item) -> np.ndarray:
    """HxWx3 uint8 RGB of a path, a PIL image or an array; a ValueError (one line) for anything else.

    Files are decoded as predict decodes them (EXIF orientation applied); a PIL image is turned by its
    EXIF orientation too, so a picture gives the same answer whichever way it comes in."""
    if isinstance(item, (str, Path)):
        from pipeline.faces.crops import decode_rgb
        from pipeline.images.views import read_checked

        positions, encoded, reasons = read_checked([str(item)])
        if not positions:
            raise ValueError(f"{item}: {reasons[0]}")
        rgb = decode_rgb(encoded[0])
        if isinstance(rgb, str):
            raise ValueError(f"{item}: {rgb}")
        return rgb
    try:
        from PIL import Image, ImageOps
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(item, Image.Image):
        return np.asarray(ImageOps.exif_transpose(item).convert("RGB"))
    if isinstance(item, np.ndarray):
        if item.ndim != 3 or item.shape[2] != 3 or item.dtype != np.uint8:
            raise ValueError(f"an array picture must be HxWx3 uint8 RGB, got shape {item.shape} dtype {item.dtype}")
        return np.ascontiguousarray(item)
    raise ValueError(f"cannot read a picture from a {type(item).__name__}: give a path, a PIL image or an "
                     f"HxWx3 uint8 RGB array")


class AgeEstimator:
    """Age groups for the faces in pictures, with a head shipped in the package or trained by train-head.

    >>> from pipeline import AgeEstimator
    >>> estimator = AgeEstimator()                  # the shipped default model
    >>> faces = estimator.predict("sample/utkface/45_1_1_20170117164742977.jpg.chip.jpg")
    >>> len(faces), sorted(faces[0])
    (1, ['age', 'box', 'group', 'landmarks', 'probabilities', 'score'])
    >>> faces[0]["group"] in faces[0]["probabilities"]
    True

    model: a shipped model's name (pipeline.models.MODELS) or a checkpoint folder; None for the default.
    device: auto, cpu or cuda. engine: auto, torch or onnxruntime (the backbones' forward pass).
    faces: None for the head's own framing (detect: find every face in a picture and cut it out; aligned:
    the picture is one aligned face crop), or 'aligned'/'detect' to override it (with a warning).
    tta: average the mirrored view and, for faces cut out of pictures, slightly zoomed cut-outs.
    """

    def __init__(self, model: str | Path | None = None, device: str = "auto", engine: str = "auto",
                 faces: str | None = None, tta: bool = False, batch_size: int = 32):
        if faces not in (None, "aligned", "detect"):
            raise ValueError(f"faces must be None, 'aligned' or 'detect', got {faces!r}")
        loaded, labels = load_heads([model])
        self.predictor, self.mode = open_predictor(loaded, labels, faces, device, engine,
                                                   warn=lambda line: warnings.warn(line, stacklevel=3))
        self.class_names = list(self.predictor.meta["class_names"])
        self.tta = tta
        self.batch_size = batch_size

    @property
    def faces(self) -> str:
        """The face mode pictures go through: 'detect' or 'aligned'."""
        return self.mode.name

    def predict(self, pictures):
        """Faces of one picture (a list of face dicts, largest first), or of each picture of a list.

        A picture is a path, a PIL image or an HxWx3 uint8 RGB array. Each face is a dict: box [x0, y0,
        x1, y1] in the picture's pixels, score, landmarks (5 [x, y] points or None), group, probabilities
        {group: p} and age (years for age heads, else None).
        """
        from pipeline.inference.predictor import label_pictures, picture_faces
        from pipeline.inference.records import face_record

        single = not isinstance(pictures, (list, tuple))
        items = [pictures] if single else list(pictures)
        decoded = [picture_faces(str(i), picture_rgb(item), self.mode) for i, item in enumerate(items)]
        predictions = label_pictures(self.predictor, decoded, self.batch_size, self.tta)
        results = [[] for _ in items]
        for prediction in predictions:
            results[int(prediction.file)].append(face_record(prediction, self.class_names))
        return results[0] if single else results
