"""MediaPipe face mesh: 478 landmarks in pixels per frame, following one face.

Coordinates follow DESIGN.md's camera: x right, y down, continuous pixel coordinates where
the image spans [0, w] x [0, h] and pixel (row i, column j) has its centre at
(j + 0.5, i + 0.5); MediaPipe's normalised coordinates times (w, h) are exactly that.

Two modes: `stream=True` keeps MediaPipe's tracking between frames (video, webcam; frames
must come in order), `stream=False` detects afresh on every frame (unrelated images).
With several faces in view the detector follows one person: the largest face when the track
starts, then the face whose box overlaps the previous one most, until it is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol, Self

import numpy as np

from tracker.config import TrackerConfig
from tracker.errors import DvpError

log = logging.getLogger(__name__)

N_POINTS = 478
#: The 468 mesh points (the pose/expression fit uses these); 468-477 are the irises.
MESH = slice(0, 468)
#: MediaPipe's face-oval points: silhouette points that slide over the surface as the
#: head turns (the fit trusts them less, see TrackerConfig.contour_weight).
FACE_OVAL = (10, 21, 54, 58, 67, 93, 103, 109, 127, 132, 136, 148, 149, 150, 152, 162, 172,
             176, 234, 251, 284, 288, 297, 323, 332, 338, 356, 361, 365, 377, 378, 379, 389,
             397, 400, 454)
#: MediaPipe's inner-lip contour: upper lip (corner to corner), lower lip (the same).
INNER_LIP_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
INNER_LIP_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
#: A face box overlapping the previous one by less than this (IoU) is another face.
SAME_FACE_IOU = 0.2


#: Values of `tracker.landmarks`.
LANDMARK_BACKENDS = ("auto", "mediapipe", "torch")


class FrameError(DvpError):
    """A frame that is not an (H, W, 3) uint8 RGB image."""


@dataclass(frozen=True)
class Landmarks:
    """One frame's face landmarks (numpy, CPU).

    points (478, 2) float32: pixels (x right, y down; continuous coordinates, pixel centres
    at +0.5), MediaPipe's order (468-472 the subject's right iris, 473-477 the left); zeros
    when no face. presence float: 1.0 when a face was found, else 0.0. image_size (h, w).
    """

    points: np.ndarray
    presence: float
    image_size: tuple[int, int]

    @property
    def found(self) -> bool:
        return self.presence > 0.5

    @property
    def box(self) -> np.ndarray:
        """Bounding box (4,) float32 (x0, y0, x1, y1) of the mesh points, pixels."""
        p = self.points[MESH]
        return np.concatenate([p.min(0), p.max(0)]).astype(np.float32)

    @classmethod
    def missing(cls, image_size: tuple[int, int]) -> Landmarks:
        """A frame without a face."""
        return cls(np.zeros((N_POINTS, 2), np.float32), 0.0, image_size)


def check_frame(frame: Any) -> np.ndarray:
    """Return `frame` as a C-contiguous (H, W, 3) uint8 array or raise FrameError saying why."""
    if not isinstance(frame, np.ndarray):
        raise FrameError(f"frame must be a numpy array (H, W, 3) uint8 RGB, got "
                         f"{type(frame).__name__}")
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise FrameError(f"frame must have shape (H, W, 3) (RGB), got {frame.shape}")
    if frame.dtype != np.uint8:
        raise FrameError(f"frame must be uint8 RGB, got dtype {frame.dtype}")
    if frame.shape[0] < 2 or frame.shape[1] < 2:
        raise FrameError(f"frame is too small: {frame.shape[1]}x{frame.shape[0]} pixels")
    return np.ascontiguousarray(frame)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boxes (x0, y0, x1, y1)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def choose_face(candidates: Sequence[np.ndarray], previous: np.ndarray | None) -> int:
    """Which of several faces (points (478, 2) each) a stream follows: the one whose mesh
    box overlaps `previous` (the last box, (4,)) by the most, at least SAME_FACE_IOU, else
    the largest. Both backends choose by this rule."""
    boxes = [np.concatenate([p[MESH].min(0), p[MESH].max(0)]) for p in candidates]
    if previous is not None:
        overlaps = [box_iou(previous, b) for b in boxes]
        best = int(np.argmax(overlaps))
        if overlaps[best] >= SAME_FACE_IOU:
            return best
    areas = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
    return int(np.argmax(areas))


class LandmarkDetector:
    """MediaPipe face mesh with iris refinement, following one face across frames (the
    `mediapipe` LandmarkSource).

    `detector(frame) -> Landmarks`; frame (H, W, 3) uint8 RGB. Use as a context manager or
    call `close()`. Not thread-safe: one detector per stream.
    """

    def __init__(self, stream: bool = True, max_faces: int = 4,
                 min_detection_confidence: float = 0.5,
                 min_tracking_confidence: float = 0.5) -> None:
        from mediapipe.python.solutions import face_mesh  # heavy import, only when used

        self.backend = "mediapipe"
        self.stream = stream
        self._mesh = face_mesh.FaceMesh(
            static_image_mode=not stream, max_num_faces=max(1, int(max_faces)),
            refine_landmarks=True, min_detection_confidence=min_detection_confidence,
            min_tracking_confidence=min_tracking_confidence)
        self._previous_box: np.ndarray | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        if self._mesh is not None:
            self._mesh.close()
            self._mesh = None

    def reset(self) -> None:
        """Forget the followed face: the next frame starts with the largest one."""
        self._previous_box = None

    def __call__(self, frame: np.ndarray) -> Landmarks:
        frame = check_frame(frame)
        if self._mesh is None:
            raise FrameError("the landmark detector is closed")
        h, w = frame.shape[:2]
        result = self._mesh.process(frame)
        faces = result.multi_face_landmarks or []
        candidates = []
        for face in faces:
            pts = np.asarray([(p.x, p.y) for p in face.landmark], np.float32)
            if pts.shape != (N_POINTS, 2) or not np.all(np.isfinite(pts)):
                continue
            candidates.append(pts * np.asarray([w, h], np.float32))
        if not candidates:
            if self.stream:
                self._previous_box = None
            return Landmarks.missing((h, w))
        chosen = self._choose(candidates)
        out = Landmarks(chosen, 1.0, (h, w))
        if self.stream:
            self._previous_box = out.box
        return out

    def _choose(self, candidates: list[np.ndarray]) -> np.ndarray:
        """The followed face: best overlap with the previous box, else the largest."""
        return candidates[choose_face(candidates, self._previous_box)]


def detect_image(frame: np.ndarray, max_faces: int = 4,
                 min_detection_confidence: float = 0.5) -> Landmarks:
    """Landmarks of the largest face of one image (image mode)."""
    with LandmarkDetector(stream=False, max_faces=max_faces,
                          min_detection_confidence=min_detection_confidence) as det:
        return det(frame)


@dataclass(frozen=True)
class LandmarkAgreement:
    """How closely one landmark backend follows another on the same frames.

    frames: frames compared; found_reference, found_candidate: frames with a face;
    found_differ: frames where one found a face and the other did not; mean, p95, max: point
    distances over every point of the frames both found, as fractions of the reference's
    inter-ocular distance (between the iris centres, points 468 and 473).
    """

    frames: int
    found_reference: int
    found_candidate: int
    found_differ: int
    mean: float
    p95: float
    max: float

    def as_dict(self) -> dict[str, float | int]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def compare_landmarks(reference: Sequence[Landmarks],
                      candidate: Sequence[Landmarks]) -> LandmarkAgreement:
    """Agreement of `candidate` with `reference` (same frames, same order)."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference frames but {len(candidate)} candidate "
                         f"frames")
    dist = []
    for a, b in zip(reference, candidate):
        if a.found and b.found:
            iod = float(np.linalg.norm(a.points[468] - a.points[473]))
            dist.append(np.linalg.norm(a.points - b.points, axis=1) / max(iod, 1e-6))
    d = np.concatenate(dist) if dist else np.full(1, np.nan)
    return LandmarkAgreement(
        len(reference), sum(a.found for a in reference), sum(b.found for b in candidate),
        sum(a.found != b.found for a, b in zip(reference, candidate)),
        float(np.mean(d)), float(np.percentile(d, 95)), float(np.max(d)))


class LandmarkSource(Protocol):
    """One stream's landmark backend, what the tracker and the live engine call per frame.

    `source(frame) -> Landmarks`: frame `(H, W, 3)` uint8 RGB; streams keep their track
    between calls (frames in order). `backend` names the implementation (`mediapipe`,
    `torch`). `reset()` forgets the followed face; `close()` releases it (idempotent).
    """

    backend: str

    def __call__(self, frame: np.ndarray) -> Landmarks: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def landmark_backend(config: TrackerConfig, device: Any) -> str:
    """The backend (`mediapipe` or `torch`) that `config.landmarks` names on `device` (a
    torch.device or its name): `auto` is the torch backend on CUDA, MediaPipe on the CPU.
    Raises DvpError for an unknown name."""
    name = config.landmarks
    if name not in LANDMARK_BACKENDS:
        raise DvpError(f"tracker.landmarks must be one of {', '.join(LANDMARK_BACKENDS)}, "
                       f"got '{name}'")
    if name == "auto":
        dev = getattr(device, "type", None) or str(device or "cpu").split(":")[0]
        return "torch" if dev == "cuda" else "mediapipe"
    return name


def make_landmark_detector(config: TrackerConfig, device: Any,
                           stream: bool = True) -> LandmarkSource:
    """The landmark backend `config.landmarks` asks for (auto, mediapipe, torch), for one
    stream on `device` (a torch.device or its name; `auto` takes the torch backend on CUDA,
    MediaPipe on the CPU, where MediaPipe is the faster: bench/tracker.py), with the
    config's face count and confidences. Reports the backend chosen (tracker.choices). A
    backend that cannot run here raises DvpError naming it, never a silent fallback."""
    import torch

    from tracker.choices import report_choice

    dev = torch.device(device) if device is not None else torch.device("cpu")
    auto = config.landmarks == "auto"
    name = landmark_backend(config, dev)
    if name == "torch":
        from tracker.landmarks_torch import TorchLandmarks, TorchLandmarkSource

        half = bool(config.landmarks_half) and dev.type == "cuda"
        source: LandmarkSource = TorchLandmarkSource(TorchLandmarks(
            dev, half=half, stream=stream, max_faces=config.max_faces,
            min_detection_confidence=config.min_detection_confidence,
            min_tracking_confidence=config.min_tracking_confidence,
            cuda_graphs=config.cuda_graphs, compile=config.landmarks_compile))
        report_choice("landmarks", f"torch on {dev}, {'float16' if half else 'float32'}",
                      "MediaPipe's face models in torch" + (", auto on CUDA" if auto else ""))
        return source
    try:
        detector = LandmarkDetector(stream=stream, max_faces=config.max_faces,
                                    min_detection_confidence=config.min_detection_confidence,
                                    min_tracking_confidence=config.min_tracking_confidence)
    except ImportError as err:
        raise DvpError(f"the mediapipe landmark backend needs the mediapipe package "
                       f"(mediapipe==0.10.21): {err}") from err
    report_choice("landmarks", "mediapipe (CPU)",
                  "auto on the CPU, where MediaPipe is faster than the torch port"
                  if auto else "tracker.landmarks=mediapipe")
    return detector
