"""Faces in ordinary pictures: find them, then cut each one out framed the way UTKFace's crops are.

Three face modes share one interface (`FaceMode.locate`), so the rest of the pipeline does not care where a
face came from: `aligned` (the picture already is an aligned crop, used whole), `detect` (MTCNN from
facenet-pytorch, weights bundled in its wheel; faces at the picture's edge and pictures without a face get
a second look, and every face a close-up look by O-Net, so it is framed alike whatever its size and tilt)
and `box` (a box and/or eye points given with the labels). `align_face` cuts a 200x200 level square in
UTKFace's framing from the eyes (EYE_*), or from the box when there are no usable eyes (BOX_*); these
constants were fitted on crops pasted into scenes with a known transform (benchmarks/faces.py).
Coordinates are continuous: (0, 0) is the top-left corner of the top-left pixel. Boxes are (x0, y0, x1, y1);
landmarks (x, y) in MTCNN's order: the eye on the picture's left, the other eye, nose, mouth left and right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

FACE_MODES = ("aligned", "detect", "box")
CROP_SIZE = 200  # UTKFace's crops are 200x200

# UTKFace framing: medians of MTCNN's landmarks on UTKFace crops pasted into scenes, mapped back into
# the crop's own frame (benchmarks/faces.py; the fits are in benchmarks/RESULTS.md).
EYE_SPAN_TO_SIDE = 2.56        # crop side / distance between the eyes
EYE_MIDPOINT = (0.50, 0.295)   # eye midpoint, as a fraction of the crop's width and height
# Framing from a box alone (profiles, given boxes): the crop is a level square of side
# BOX_TO_SIDE x the box's height (MTCNN's boxes are taller than wide, and the height
# changes less than the width when a head turns), centred at the box centre shifted by
# BOX_CENTRE_SHIFT (in box widths, box heights).
BOX_TO_SIDE = 0.94             # fitted as above, on level faces
BOX_CENTRE_SHIFT = (0.0, 0.05)  # fitted as above
# Eye distance below this share of the box width: a profile or a bad landmark fit,
# where the eye recipe would zoom in far too much.
MIN_EYE_SPAN_TO_BOX = 0.25
# predict --tta with a face mode also averages the face cut out with a square of these sides (x ours):
# our framing is only known to a few percent against UTKFace's own, and a head's group can flip on that
# (benchmarks/RESULTS.md).
TTA_ZOOMS = (0.95, 1.0, 1.05)
# A picture where MTCNN finds no face is searched again inside a black border of this share of its
# short side (MtcnnFaces.locate: faces that fill the picture are missed at its edges).
NO_FACE_BORDER = 0.25
# A face whose box crosses the picture's edge is located again in a square EDGE_REGION x its box side,
# resampled so that the box is about EDGE_FACE_SIDE pixels (MtcnnFaces._again_inside_border).
EDGE_REGION = 2.0
EDGE_FACE_SIDE = 64
# Close-up look (MtcnnFaces._look_closer): MTCNN's last network (O-Net) reads each face's landmarks again
# from a level ONET_SIZE square where our framing puts MTCNN's face box, plain and mirrored, averaged,
# CLOSE_UP_ROUNDS times. MTCNN's first landmarks jitter with the face's size, position and tilt (its
# boxes come from a coarse pyramid and are not turned with the face); the second look steadies the
# framing (benchmarks/face_close_up.py).
CLOSE_UP_ROUNDS = 2
ONET_SIZE = 48  # O-Net's input side
# MTCNN finds faces of min_face_size pixels by first scaling the picture by PNET_WINDOW / min_face_size
# (its first network sees 12x12 windows), with area interpolation, then shrinking further level by level.
# MtcnnFaces._detect makes that first shrink itself with an antialiased resize and lets MTCNN start at
# scale 1, so the whole pyramid is built from the smaller picture: cheaper, with the same faces found.
PNET_WINDOW = 12
# MTCNN's landmark order seen in a mirror: the eyes swap, and so do the mouth corners.
MIRRORED_LANDMARKS = [1, 0, 2, 4, 3]


@dataclass
class Face:
    """One face in a picture: where it is and how sure the detector was."""
    box: np.ndarray                   # [4] float32 x0, y0, x1, y1
    landmarks: np.ndarray             # [5, 2] float32 (x, y); NaN when unknown (given boxes)
    score: float = float("nan")       # detector probability; NaN for given boxes

    @property
    def area(self) -> float:
        return float(max(self.box[2] - self.box[0], 0) * max(self.box[3] - self.box[1], 0))

    @property
    def centre(self) -> np.ndarray:
        return np.array([(self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2], np.float32)


@dataclass
class FaceHint:
    """What the labels say about a picture's face: a box and/or the two eye centres (NaN when absent)."""
    box: np.ndarray = field(default_factory=lambda: np.full(4, np.nan, np.float32))    # x0, y0, x1, y1
    eyes: np.ndarray = field(default_factory=lambda: np.full(4, np.nan, np.float32))   # left x, y, right x, y

    @property
    def has_box(self) -> bool:
        return bool(np.isfinite(self.box).all())

    @property
    def has_eyes(self) -> bool:
        return bool(np.isfinite(self.eyes).all())


@dataclass
class AlignedFace:
    """A face cut out in UTKFace's framing, and how to map the crop back into its picture."""
    crop: np.ndarray            # [CROP_SIZE, CROP_SIZE, 3] uint8
    face: Face
    to_picture: np.ndarray      # [2, 3] affine: crop coordinates -> picture coordinates
    framing: str                # "eyes" or "box"


class FaceMode(Protocol):
    name: str

    def settings(self) -> dict:
        """Everything that changes which faces are found and how they are cut (part of the fingerprint)."""

    def locate(self, rgb: np.ndarray, hint: FaceHint | None = None) -> list[Face]:
        """Every face in an HxWx3 uint8 picture, largest first."""


# --------------------------------------------------------------------------- modes


class WholePicture:
    """`aligned`: the picture is already a face crop; the one 'face' is the whole of it."""
    name = "aligned"

    def settings(self) -> dict:
        return {"mode": "aligned"}

    def locate(self, rgb: np.ndarray, hint: FaceHint | None = None) -> list[Face]:
        height, width = rgb.shape[:2]
        return [Face(np.array([0, 0, width, height], np.float32), np.full((5, 2), np.nan, np.float32))]


class GivenFaces:
    """`box`: the face the labels point at (a box, eye points, or both); no detector runs."""
    name = "box"

    def settings(self) -> dict:
        return {"mode": "box", **framing_settings()}

    def locate(self, rgb: np.ndarray, hint: FaceHint | None = None) -> list[Face]:
        if hint is None or not (hint.has_box or hint.has_eyes):
            return []
        landmarks = np.full((5, 2), np.nan, np.float32)
        if hint.has_eyes:
            landmarks[:2] = hint.eyes.reshape(2, 2)
        if hint.has_box:
            box = hint.box.astype(np.float32)
        else:  # eyes only: the box the eye recipe implies, for the record and the annotated copy
            span = float(np.linalg.norm(landmarks[1] - landmarks[0]))
            middle = landmarks[:2].mean(0)
            half = span * EYE_SPAN_TO_SIDE / 2
            box = np.array([middle[0] - half, middle[1] - EYE_MIDPOINT[1] * 2 * half,
                            middle[0] + half, middle[1] + (1 - EYE_MIDPOINT[1]) * 2 * half], np.float32)
        return [Face(box, landmarks)]


class MtcnnFaces:
    """`detect`: facenet-pytorch's MTCNN (bundled weights), run on the CPU or the given device.

    Pictures whose long side exceeds max_side are shrunk for the detector only
    (boxes and landmarks are scaled back), so a 12-megapixel photo costs about
    what a 1024-pixel one does; faces smaller than min_face_size pixels in the
    shrunk picture are not looked for.
    """
    name = "detect"

    def __init__(self, min_face_size: int = 20, thresholds=(0.6, 0.7, 0.7), factor: float = 0.709,
                 max_side: int = 1024, min_score: float = 0.9, close_up: bool = True,
                 device: str | torch.device = "cpu"):
        try:
            from facenet_pytorch import MTCNN
        except ImportError as err:  # pragma: no cover - a dependency of the package
            raise RuntimeError("--faces detect needs facenet-pytorch (pip install facenet-pytorch==2.5.3)") from err
        self.min_face_size, self.thresholds, self.factor = min_face_size, tuple(thresholds), factor
        self.max_side, self.min_score, self.close_up = max_side, min_score, close_up
        self._mtcnn = channels_last(MTCNN(min_face_size=min(min_face_size, PNET_WINDOW), thresholds=list(thresholds),
                                          factor=factor, keep_all=True, select_largest=True, post_process=False,
                                          device=torch.device(device)))

    def settings(self) -> dict:
        return {"mode": "detect", "detector": detector_id(), "min_face_size": self.min_face_size,
                "thresholds": list(self.thresholds), "factor": self.factor, "max_side": self.max_side,
                "min_score": self.min_score, "first_shrink": "bilinear-antialias", "no_face_border": NO_FACE_BORDER,
                "edge_faces": {"region": EDGE_REGION, "face_side": EDGE_FACE_SIDE},
                "close_up": ({"network": "onet", "rounds": CLOSE_UP_ROUNDS, "mirrored": True}
                             if self.close_up else None),
                **framing_settings()}

    @torch.inference_mode()
    def locate(self, rgb: np.ndarray, hint: FaceHint | None = None) -> list[Face]:
        height, width = rgb.shape[:2]
        if panorama_tiles(height, width, self.max_side):
            return self._locate_tiled(rgb)
        return self._locate_whole(rgb)

    def _locate_tiled(self, rgb: np.ndarray) -> list[Face]:
        """A panorama searched tile by tile (overlapping by the short side, so each face lies whole in one),
        the faces found twice in two tiles kept once."""
        found = []
        for top, left, bottom, right in panorama_tiles(*rgb.shape[:2], self.max_side):
            offset = np.array([left, top], np.float32)
            for face in self._locate_whole(rgb[top:bottom, left:right], look_inside_border=False):
                found.append(Face(face.box + np.tile(offset, 2), face.landmarks + offset, face.score))
        return sorted(distinct_faces(found), key=lambda f: -f.area)

    def _locate_whole(self, rgb: np.ndarray, look_inside_border: bool = True) -> list[Face]:
        height, width = rgb.shape[:2]
        scale = min(1.0, self.max_side / max(height, width))
        picture = rgb if scale == 1.0 else shrink(rgb, scale)
        faces = self._detect(picture)
        # MTCNN cuts each candidate box out of the picture clipped to its edges and stretches that cut to
        # its network's square input, so a face whose box crosses an edge gets shifted landmarks that lie
        # too far apart. Such a face is located again in its own neighbourhood with black beyond the edge.
        faces = [self._again_inside_border(picture, face) if crosses_edge(face, picture.shape[:2]) else face
                 for face in faces]
        if not faces and look_inside_border:
            # A face filling the picture is often missed altogether: look once more inside a border.
            margin = int(math.ceil(NO_FACE_BORDER * min(picture.shape[:2])))
            bordered = np.pad(picture, ((margin, margin), (margin, margin), (0, 0)))
            faces = [Face(f.box - margin, f.landmarks - margin, f.score) for f in self._detect(bordered)]
        faces = [Face((f.box / scale).astype(np.float32), (f.landmarks / scale).astype(np.float32), f.score)
                 for f in faces]
        if self.close_up:  # in the full picture: a shrunk one would lose the detail it looks for
            faces = [self._look_closer(rgb, face) for face in faces]
        return sorted(faces, key=lambda f: -f.area)

    def _detect(self, picture: np.ndarray) -> list[Face]:
        scale = min(1.0, PNET_WINDOW / self.min_face_size)   # MTCNN's first pyramid level, made by us (PNET_WINDOW)
        if min(picture.shape[:2]) * scale < PNET_WINDOW:
            return []   # smaller than MTCNN's window: no pyramid level at all (MTCNN itself would raise)
        boxes, scores, points = self._mtcnn.detect(shrink(picture, scale) if scale < 1 else picture, landmarks=True)
        if boxes is None:
            return []
        return [Face(np.asarray(b, np.float64) / scale, np.asarray(p, np.float64) / scale, float(s))
                for b, s, p in zip(boxes, scores, points) if s >= self.min_score]

    def _again_inside_border(self, picture: np.ndarray, face: Face) -> Face:
        """The face located again in a square of EDGE_REGION x its box side around it (black beyond the
        picture), resized so the box is about EDGE_FACE_SIDE pixels: cheap, whatever the picture's size.
        The detection nearest the square's centre replaces the face; if there is none, the face stays."""
        side = float(max(face.box[2] - face.box[0], face.box[3] - face.box[1]))
        size = round(EDGE_REGION * EDGE_FACE_SIDE)
        to_picture = crop_to_picture(face.centre.astype(np.float64), EDGE_REGION * side, 0.0, size)
        found = self._detect(warp(picture, to_picture, size))
        if not found:
            return face
        middle = np.array([size / 2, size / 2])
        best = min(found, key=lambda f: float(np.linalg.norm(f.centre - middle)))
        box = picture_points(to_picture, best.box.reshape(2, 2)).reshape(4)
        return Face(box, picture_points(to_picture, best.landmarks), best.score)

    def _look_closer(self, picture: np.ndarray, face: Face) -> Face:
        """The face with its landmarks read again by O-Net, CLOSE_UP_ROUNDS times: the mean of its landmarks
        on a level square where our framing puts MTCNN's box and on that square's mirror image, mapped back
        into the picture. The box and score stay those of the first look. A face framed from its box (no
        usable eyes), or one whose square O-Net does not call a face with usable eyes, is returned as it was."""
        for _ in range(CLOSE_UP_ROUNDS):
            if not usable_eyes(face):
                return face
            to_picture = onet_square(face)
            square = warp(picture, to_picture, ONET_SIZE)
            pair = torch.from_numpy(np.stack([square, square[:, ::-1]])).permute(0, 3, 1, 2).float()
            pair = (pair - 127.5) * 0.0078125  # MTCNN scales its networks' input so
            _, points, probability = self._mtcnn.onet(pair.to(self._mtcnn.device))
            if float(probability[:, 1].min()) < self.thresholds[2]:
                return face
            points = points.float().cpu().numpy().reshape(2, 2, 5).transpose(0, 2, 1) * ONET_SIZE  # [2, 5, (x, y)]
            looks = [points[0], mirror_landmarks(points[1], ONET_SIZE)]
            again = Face(face.box, picture_points(to_picture, np.mean(looks, 0)).astype(np.float32), face.score)
            if not usable_eyes(again):
                return face
            face = again
        return face


PANORAMA_SHORT_SIDE = 160   # tile a picture whose short side the detector's shrink would bring below this


def panorama_tiles(height: int, width: int, max_side: int) -> list[tuple[int, int, int, int]]:
    """(top, left, bottom, right) of overlapping tiles along the long side of a panorama, or [] for other pictures.

    A 12000 x 300 panorama shrunk to a 1024-pixel long side keeps faces of 25 pixels, too few for the
    detector. Tiles as long as max(max_side, short side x 2) overlap by the short side, so any face (no
    taller than the short side) lies whole in one tile, which is then shrunk no more than the picture needs.
    """
    short, long = min(height, width), max(height, width)
    if long <= max_side or short * max_side / long >= PANORAMA_SHORT_SIDE or short < PNET_WINDOW:
        return []
    length = max(max_side, 2 * short)
    step = length - short
    starts = list(range(0, max(long - length, 0) + 1, step))
    if starts[-1] + length < long:
        starts.append(long - length)
    if width >= height:
        return [(0, start, height, start + length) for start in starts]
    return [(start, 0, start + length, width) for start in starts]


def distinct_faces(faces: list[Face], overlap: float = 0.5) -> list[Face]:
    """The faces, one per place: of two whose boxes overlap by more than `overlap` (IoU), the higher score stays."""
    kept: list[Face] = []
    for face in sorted(faces, key=lambda f: -f.score):
        if all(box_iou(face.box, other.box) <= overlap for other in kept):
            kept.append(face)
    return kept


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def onet_square(face: Face) -> np.ndarray:
    """[2, 3] crop->picture map of the ONET_SIZE square O-Net reads a face from: MTCNN's face box (made
    square, as MTCNN feeds O-Net) where our framing from the eyes puts it (BOX_*), turned with the eyes."""
    centre, side, angle, _ = crop_frame(face)
    box_side = side / BOX_TO_SIDE
    box_centre = centre + along_axes(-np.array(BOX_CENTRE_SHIFT) * box_side, angle)  # crop centre -> box centre
    return crop_to_picture(box_centre, box_side, angle, ONET_SIZE)


class ChannelsLast(torch.nn.Module):
    """One of MTCNN's three networks run on channels_last tensors, whose convolutions and max-pools have
    faster CPU kernels; the landmarks agree with the default layout's to float rounding."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, pictures: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.network(pictures.contiguous(memory_format=torch.channels_last))
        return tuple(output.contiguous() for output in outputs)


def channels_last(mtcnn):
    """facenet-pytorch's MTCNN with its P-, R- and O-Net wrapped in ChannelsLast."""
    mtcnn.pnet, mtcnn.rnet, mtcnn.onet = (ChannelsLast(net) for net in (mtcnn.pnet, mtcnn.rnet, mtcnn.onet))
    return mtcnn


def mirror_landmarks(points: np.ndarray, width: float) -> np.ndarray:
    """Landmarks found in a picture's mirror image, as landmarks of the picture itself (MTCNN's order)."""
    points = np.asarray(points, np.float64)[MIRRORED_LANDMARKS]
    return np.column_stack([width - points[:, 0], points[:, 1]])


def crosses_edge(face: Face, shape: tuple[int, int]) -> bool:
    """Whether the face's box reaches beyond the picture (where MTCNN clips and stretches it)."""
    height, width = shape
    x0, y0, x1, y1 = face.box
    return bool(x0 < 0 or y0 < 0 or x1 > width or y1 > height)


def make_face_mode(name: str, device: str | torch.device = "cpu") -> FaceMode:
    """The face mode called `name` (one of FACE_MODES)."""
    if name == "aligned":
        return WholePicture()
    if name == "detect":
        return MtcnnFaces(device=device)
    if name == "box":
        return GivenFaces()
    raise ValueError(f"unknown face mode {name!r}; choose one of {', '.join(FACE_MODES)}")


def detector_id() -> str:
    from importlib.metadata import version

    return f"facenet-pytorch-mtcnn=={version('facenet-pytorch')}"


def framing_settings() -> dict:
    return {"crop_size": CROP_SIZE, "eye_span_to_side": EYE_SPAN_TO_SIDE, "eye_midpoint": list(EYE_MIDPOINT),
            "box_to_side": BOX_TO_SIDE, "box_centre_shift": list(BOX_CENTRE_SHIFT),
            "min_eye_span_to_box": MIN_EYE_SPAN_TO_BOX}


def choose_face(faces: list[Face], hint: FaceHint | None = None) -> int | None:
    """Index of the face featurize uses: the one nearest the given box, else the largest."""
    if not faces:
        return None
    if hint is not None and hint.has_box:
        given = np.array([(hint.box[0] + hint.box[2]) / 2, (hint.box[1] + hint.box[3]) / 2])
        return int(np.argmin([np.linalg.norm(f.centre - given) for f in faces]))
    return int(np.argmax([f.area for f in faces]))


# --------------------------------------------------------------------------- framing


def usable_eyes(face: Face) -> bool:
    """Eye points that frame the face well: present, and not so close that the face must be a profile."""
    eyes = face.landmarks[:2]
    if not np.isfinite(eyes).all():
        return False
    width = float(face.box[2] - face.box[0])
    if not np.isfinite(width) or width <= 0:  # eye points given without a box
        return True
    return float(np.linalg.norm(eyes[1] - eyes[0])) >= MIN_EYE_SPAN_TO_BOX * width


def crop_frame(face: Face) -> tuple[np.ndarray, float, float, str]:
    """(centre (x, y), side, angle in radians, framing) of the crop square in picture coordinates."""
    if usable_eyes(face):
        left, right = face.landmarks[0].astype(np.float64), face.landmarks[1].astype(np.float64)
        span_vector = right - left
        angle = math.atan2(span_vector[1], span_vector[0])
        side = EYE_SPAN_TO_SIDE * float(np.linalg.norm(span_vector))
        middle = (left + right) / 2
        # The eye midpoint sits at EYE_MIDPOINT of the crop; walk to the crop centre along the crop's axes.
        centre = middle + along_axes(np.array([0.5 - EYE_MIDPOINT[0], 0.5 - EYE_MIDPOINT[1]]) * side, angle)
        return centre, side, angle, "eyes"
    box = face.box.astype(np.float64)
    width, height = box[2] - box[0], box[3] - box[1]
    centre = np.array([(box[0] + box[2]) / 2 + BOX_CENTRE_SHIFT[0] * width,
                       (box[1] + box[3]) / 2 + BOX_CENTRE_SHIFT[1] * height])
    return centre, BOX_TO_SIDE * height, 0.0, "box"


def along_axes(offset: np.ndarray, angle: float) -> np.ndarray:
    """An (x, y) offset in a square turned by `angle` radians, as a picture-coordinate offset."""
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([cos * offset[0] - sin * offset[1], sin * offset[0] + cos * offset[1]])


def crop_to_picture(centre: np.ndarray, side: float, angle: float, size: int = CROP_SIZE) -> np.ndarray:
    """[2, 3] affine taking crop coordinates (0..size) to picture coordinates."""
    scale = side / size
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    half = size / 2
    return np.array([[cos, -sin, centre[0] - cos * half + sin * half],
                     [sin, cos, centre[1] - sin * half - cos * half]], np.float64)


def align_face(rgb: np.ndarray, face: Face, size: int = CROP_SIZE, zoom: float = 1.0) -> AlignedFace:
    """The face cut out as a size x size uint8 crop in UTKFace's framing (outside the picture is black).

    zoom scales the square's side about its centre (TTA_ZOOMS: predict --tta's extra cut-outs).
    """
    centre, side, angle, framing = crop_frame(face)
    to_picture = crop_to_picture(centre, side * zoom, angle, size)
    return AlignedFace(warp(rgb, to_picture, size), face, to_picture, framing)


def warp(rgb: np.ndarray, to_picture: np.ndarray, size: int) -> np.ndarray:
    """Sample a size x size crop through a crop->picture affine map; bilinear, antialiased when shrinking.

    When the crop is smaller than the face in the picture, the region under
    the crop is first shrunk with an antialiased resize (as featurize's own
    resize does), so the crop does not alias.
    """
    picture = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float()[None]  # [1, 3, H, W]
    height, width = rgb.shape[:2]
    affine = np.asarray(to_picture, np.float64).copy()
    corners = affine @ np.array([[0, size, 0, size], [0, 0, size, size], [1, 1, 1, 1]], np.float64)
    x0, y0 = np.floor(corners.min(1)) - 2
    x1, y1 = np.ceil(corners.max(1)) + 2
    # Cut the region under the crop out of the picture (zeros outside it), so the work scales with the face.
    region = torch.zeros((1, 3, int(y1 - y0), int(x1 - x0)))
    sx0, sy0, sx1, sy1 = max(int(x0), 0), max(int(y0), 0), min(int(x1), width), min(int(y1), height)
    if sx1 > sx0 and sy1 > sy0:
        region[..., sy0 - int(y0):sy1 - int(y0), sx0 - int(x0):sx1 - int(x0)] = picture[..., sy0:sy1, sx0:sx1]
    affine[:, 2] -= (x0, y0)
    pixel_scale = math.hypot(affine[0, 0], affine[1, 0])  # picture pixels per crop pixel
    if pixel_scale > 1.0:
        target = (max(1, round(region.shape[2] / pixel_scale)), max(1, round(region.shape[3] / pixel_scale)))
        factors = (target[0] / region.shape[2], target[1] / region.shape[3])
        region = F.interpolate(region, size=target, mode="bilinear", align_corners=False, antialias=True)
        affine = np.diag([factors[1], factors[0]]) @ affine
    u = torch.arange(size, dtype=torch.float64) + 0.5
    grid_v, grid_u = torch.meshgrid(u, u, indexing="ij")
    coords = torch.stack([grid_u, grid_v, torch.ones_like(grid_u)], -1) @ torch.from_numpy(affine).T  # [S, S, 2]
    normalized = coords / torch.tensor([region.shape[3], region.shape[2]], dtype=torch.float64) * 2 - 1
    out = F.grid_sample(region, normalized[None].float(), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def shrink(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The picture resized by `scale` < 1 (antialiased bilinear), HxWx3 uint8."""
    height, width = rgb.shape[:2]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    pixels = torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float()[None]
    out = F.interpolate(pixels, size=size, mode="bilinear", align_corners=False, antialias=True)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def picture_points(to_picture: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Crop coordinates [K, 2] -> picture coordinates [K, 2]."""
    points = np.asarray(points, np.float64)
    return points @ np.asarray(to_picture)[:, :2].T + np.asarray(to_picture)[:, 2]


def paste_back(picture: np.ndarray, crop_values: np.ndarray, to_picture: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A crop-frame map (or image) [S, S(, C)] resampled into the picture's frame.

    Returns (values [H, W(, C)] float32, inside [H, W] bool: the pixels the crop covers).
    Used to show a Grad-CAM computed on the aligned crop on the original photo.
    """
    height, width = picture.shape[:2]
    size = crop_values.shape[0]
    values = torch.from_numpy(np.asarray(crop_values, np.float32))
    values = values[None, None] if values.ndim == 2 else values.permute(2, 0, 1)[None]
    full = np.vstack([np.asarray(to_picture, np.float64), [0, 0, 1]])
    to_crop = np.linalg.inv(full)[:2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64) + 0.5,
                            torch.arange(width, dtype=torch.float64) + 0.5, indexing="ij")
    coords = torch.stack([xs, ys, torch.ones_like(xs)], -1) @ torch.from_numpy(to_crop).T  # [H, W, 2]
    inside = ((coords >= 0) & (coords <= size)).all(-1).numpy()
    out = F.grid_sample(values, (coords / size * 2 - 1)[None].float(), mode="bilinear", padding_mode="zeros",
                        align_corners=False)[0]
    out = out[0] if crop_values.ndim == 2 else out.permute(1, 2, 0)
    return out.numpy(), inside
