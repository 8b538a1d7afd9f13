"""Files in, aligned face crops out: the decode stage of featurize (and predict/explain) when --faces is not `aligned`.

`FaceCropDecoder.decode` reads and checks each file as the other decoders do (images.views.read_checked),
decodes it with EXIF orientation applied, locates the faces (faces.detect.FaceMode), keeps one per picture
(the one nearest a given box, else the largest), cuts it out in UTKFace's framing and resizes the 200x200
crops on the path `resize_path` picks from featurize's --decoder: "torch" (images.views.resize_normalize)
or "dali" (images.dali_pixels.DaliPixels, the DALI file decoder's graph fed pixels), so a crop gives the
tensors a crop file of the same pixels would on that path. The decoder's name (`faces-detect+dali-cpu`, ...)
records which ran; `FaceBatch.faces` holds each kept picture's face record. Detection runs in featurize's
prefetch thread, one worker per usable core with one intra-op thread each (single_threaded_workers):
MTCNN's small operations gain little from intra-op threads, whose spinning takes CPU the backbones need.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pipeline.constants import IMAGE_SIZE
from pipeline.faces.detect import (
    AlignedFace,
    FaceHint,
    FaceMode,
    align_face,
    choose_face,
)
from pipeline.images.checks import DEFAULT_MAX_PIXELS
from pipeline.images.views import (
    DecodedBatch,
    read_checked,
    resize_normalize,
    usable_cpus,
    with_mirror,
)

NO_FACE = "no face found"
NO_GIVEN_FACE = "no face box or eye points given in the labels"


def face_columns(rows: int) -> dict[str, np.ndarray]:
    """Empty per-row face record arrays (the layout of /faces in a feature file)."""
    return {
        "box": np.zeros((rows, 4), np.float32),           # x0, y0, x1, y1 in picture pixels
        "landmarks": np.zeros((rows, 5, 2), np.float32),  # eyes, nose, mouth corners; NaN when not known
        "score": np.zeros(rows, np.float32),              # detector probability; NaN for given boxes
        "faces_found": np.zeros(rows, np.int16),          # faces located in the picture
        "framing": np.zeros(rows, dtype="<U4"),           # "eyes" or "box": what the crop was framed from
    }


@dataclass
class FaceBatch(DecodedBatch):
    faces: dict[str, np.ndarray] = field(default_factory=dict)  # face_columns(), one row per kept picture


def hint_from_meta(box_xywh, eyes) -> FaceHint:
    """A FaceHint from a label file's box (x, y, w, h) and eye points (NaN where absent)."""
    hint = FaceHint()
    if box_xywh is not None:
        x, y, w, h = (float(v) for v in box_xywh)
        hint.box = np.array([x, y, x + w, y + h], np.float32)
    if eyes is not None:
        hint.eyes = np.asarray(eyes, np.float32)
    return hint


def hints_from_meta(files: Sequence[str], meta: dict) -> dict[str, FaceHint]:
    """{file: FaceHint} from a plan's optional meta columns "box" and "eyes" (absent: no hints)."""
    boxes, eyes = meta.get("box"), meta.get("eyes")
    if boxes is None and eyes is None:
        return {}
    return {file: hint_from_meta(None if boxes is None else boxes[i], None if eyes is None else eyes[i])
            for i, file in enumerate(files)}


def decode_rgb(data: np.ndarray) -> np.ndarray | str:
    """HxWx3 uint8 RGB with EXIF orientation applied (torchvision, as the torch decoders), or why not."""
    from torchvision.io import ImageReadMode, decode_image

    try:
        image = decode_image(torch.from_numpy(data), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as error:
        return "cannot decode: " + str(error).splitlines()[0].split(", ")[-1]
    return image.permute(1, 2, 0).numpy()


RESIZE_PATHS = ("torch", "dali")


def resize_path(decoder: str) -> str:
    """The resize path for featurize's --decoder auto|dali|torch: DALI when asked for, or for auto when installed."""
    if decoder == "torch":
        return "torch"
    from pipeline.images.dali_decoder import dali_available

    if decoder == "dali" or (decoder == "auto" and dali_available()):
        return "dali"
    return "torch"


def decoder_name(mode_name: str, device: torch.device, resize: str = "torch") -> str:
    """The face decoder's name in the compute record: the face mode, then the resize path that ran and where."""
    if resize not in RESIZE_PATHS:
        raise ValueError(f"unknown resize path {resize!r}; choose one of {', '.join(RESIZE_PATHS)}")
    return f"faces-{mode_name}+{resize}-{'gpu' if torch.device(device).type == 'cuda' else 'cpu'}"


class FaceCropDecoder:
    """Decode, find the face, align, then resize/normalize on the torch or DALI path; see the module docstring."""

    def __init__(self, mode: FaceMode, device: torch.device, hints: dict[str, FaceHint] | None = None,
                 resize: str = "torch", batch_size: int = 64, num_threads: int = 2):
        self.mode = mode
        self.device = torch.device(device)
        self.hints = hints or {}
        self.name = decoder_name(mode.name, self.device, resize)
        self.resize = resize
        if resize == "dali":
            from pipeline.images.dali_pixels import DaliPixels

            self._dali = DaliPixels(self.device, batch_size, num_threads)
        self._workers = single_threaded_workers(usable_cpus())

    def decode(self, paths: Sequence[str | Path]) -> FaceBatch:
        positions, encoded, reasons = read_checked(paths)
        kept, crops = [], []
        columns = face_columns(len(positions))
        hints = [self.hints.get(str(paths[position])) for position in positions]
        for position, found in zip(positions, self._workers.map(self._one_face, encoded, hints)):
            if isinstance(found, str):
                reasons[position] = found
                continue
            aligned, faces = found
            row = len(kept)
            columns["box"][row] = aligned.face.box
            columns["landmarks"][row] = aligned.face.landmarks
            columns["score"][row] = aligned.face.score
            columns["faces_found"][row] = len(faces)
            columns["framing"][row] = aligned.framing
            kept.append(position)
            crops.append(aligned.crop)
        columns = {name: values[:len(kept)] for name, values in columns.items()}
        if not crops:
            views = torch.empty((0, 2, 3, IMAGE_SIZE, IMAGE_SIZE), device=self.device)
        elif self.resize == "dali":
            views = self._dali(crops)
        else:
            views = crops_to_views(crops, self.device)
        failures = [(str(paths[position]), reasons[position]) for position in sorted(reasons)]
        extra = {"fallbacks": []} if "fallbacks" in {f.name for f in dataclasses.fields(DecodedBatch)} else {}
        return FaceBatch(views=views, kept=kept, failures=failures, faces=columns, **extra)

    def _one_face(self, data: np.ndarray, hint: FaceHint | None) -> tuple[AlignedFace, list] | str:
        """(the face kept, cut out; every face found), or why the picture has none to give."""
        rgb = decode_rgb(data)
        if isinstance(rgb, str):
            return rgb
        faces = self.mode.locate(rgb, hint)
        if not faces:
            return NO_GIVEN_FACE if self.mode.name == "box" else NO_FACE
        return align_face(rgb, faces[choose_face(faces, hint)]), faces


def single_threaded_workers(count: int) -> ThreadPoolExecutor:
    """A pool of `count` threads that each run PyTorch with one intra-op thread.

    Under PyTorch's OpenMP backend (its Linux and Windows wheels) torch.set_num_threads sets the calling
    thread's own OpenMP count, but also process-wide defaults: the count threads started later begin with,
    and MKL's and the pthreadpool's. So every worker is started now, and the caller's count is then set
    again: the caller, and threads started later, keep what they had. With another backend the setting
    would be process-wide, and the workers keep the default.
    """
    threads = torch.get_num_threads()
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    started = threading.Barrier(count + 1)
    pool = ThreadPoolExecutor(count, thread_name_prefix="faces", initializer=_one_torch_thread if openmp else None)
    for _ in range(count):  # each waits for the others, so each runs on a thread of its own
        pool.submit(started.wait)
    started.wait()
    torch.set_num_threads(threads)
    return pool


def _one_torch_thread() -> None:
    torch.get_num_threads()  # PyTorch sets a thread's count from the process default on first use; let it now
    torch.set_num_threads(1)


@dataclass
class PictureFaces:
    """Every face found in one picture, each cut out in UTKFace's framing (predict and explain)."""
    path: str
    rgb: np.ndarray                 # the picture, HxWx3 uint8, EXIF orientation applied
    faces: list                     # [detect.AlignedFace], largest first


def read_faces(paths: Sequence[str | Path], mode: FaceMode, max_pixels: int | None = DEFAULT_MAX_PIXELS
               ) -> tuple[list[PictureFaces], list[tuple[str, str]]]:
    """(pictures with at least one face, [(path, reason)] for the others: unreadable, or no face found)."""
    positions, encoded, reasons = read_checked(paths, max_pixels)
    found = []
    for position, data in zip(positions, encoded):
        rgb = decode_rgb(data)
        if isinstance(rgb, str):
            reasons[position] = rgb
            continue
        faces = mode.locate(rgb)
        if not faces:
            reasons[position] = NO_FACE
            continue
        found.append(PictureFaces(str(paths[position]), rgb, [align_face(rgb, face) for face in faces]))
    return found, [(str(paths[position]), reasons[position]) for position in sorted(reasons)]


def crops_to_views(crops: Sequence[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, 2, 3, S, S] plain + mirrored model input of aligned crops, by the torch decoders' math."""
    return with_mirror(resize_normalize([torch.from_numpy(c).permute(2, 0, 1).to(device) for c in crops]))


def decoder_for_settings(settings: dict, device: torch.device, files: Sequence[str] = (),
                         meta: dict | None = None) -> FaceCropDecoder | None:
    """The decoder that recomputes rows of a feature file made with --faces detect|box (None for aligned files),
    e.g. to verify them: the same face mode, on `device`, with the labels' boxes from `meta` (box/eyes)."""
    from pipeline.faces.detect import make_face_mode

    recorded = settings.get("faces")
    if not recorded:
        return None
    mode = make_face_mode(recorded["mode"], device)
    if mode.settings() != recorded:
        raise ValueError(f"this file's faces were found with other settings than this version makes: {recorded}")
    return FaceCropDecoder(mode, device, hints_from_meta(list(files), meta or {}))
