"""MediaPipe's face mesh (FaceMesh with refine_landmarks=True) ported to torch: the `torch`
landmark backend, batched over many independent streams.

What runs (mediapipe 0.10.21's face_landmark_front_cpu graph, its own networks, read from
the installed package by tracker/mediapipe_models.py and run as torch modules):

1. Detection (tracker/face_detection.py), only for a stream that follows no face (its
   first frame, after a loss, or every frame when `stream=False`): BlazeFace on the
   letterboxed image, up to `max_faces` faces, each one's ROI from its box and eye line.
2. Landmarks: the ROI cropped to 192x192 (OpenCV-exact bilinear warp, edge pixels
   replicated), `face_landmark_with_attention.tflite` (468 mesh points plus lips, eyes and
   irises refined in the network by its own crops), face presence = sigmoid(flag) above
   `min_tracking_confidence`, the 478 points projected back to the image.
3. Tracking: the next frame's ROI comes from these landmarks (their box scaled 1.5 and
   squared, rotation from the line of points 33 and 263); a frame whose presence falls below
   the threshold returns no face and the stream detects afresh on its next frame.

MediaPipe itself also runs the detector on every frame while it follows fewer than
`max_faces` faces, to pick up new ones; its result for the followed face comes from the
landmark ROI all the same, so skipping detection while tracking holds changes nothing for
the followed face (it only stops new faces from being noticed until the track is lost).
With several faces at detection time the largest landmark box is followed, as
`LandmarkDetector` does.

Batched API (the live engine's sessions of one GPU, or chunks of a video):

    lm = TorchLandmarks(device, max_faces=4)
    out = lm.detect_batch(frames, stream_ids)   # -> list[Landmarks], one per frame

`frames` is a list of (H, W, 3) uint8 RGB numpy arrays (sizes may differ) or one uint8
tensor (B, H, W, 3) (on the device, e.g. frames decoded on the GPU); `stream_ids` names the
stream of each frame (any hashable; each id at most once per call). Every stream keeps its
own ROI between calls; `reset(stream_id)` forgets one stream, `reset()` all, `forget(id)`
drops a finished stream. `TorchLandmarkSource` is the one-stream `LandmarkSource` the
tracker uses (`make_landmark_detector`). On CUDA the networks replay CUDA graphs captured
per batch size (1, 2, 4, ..., 64) and may run in float16 (`half`); results are numpy
`Landmarks` in pixels, as the `mediapipe` backend gives them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np
import torch

from tracker import face_roi
from tracker.face_detection import Detections, FaceDetector
from tracker.landmarks import (
    N_POINTS,
    FrameError,
    Landmarks,
    box_iou,
    check_frame,
    choose_face,
)
from tracker.mediapipe_models import (
    LANDMARK_FILE,
    LANDMARK_SIZE,
    GraphRunner,
    bucket,
    load_net,
)

log = logging.getLogger(__name__)

#: LandmarksRefinementCalculator of tensors_to_face_landmarks_with_attention.pbtxt: which
#: mesh points the lips (80), left-eye (71) and right-eye (71) outputs replace; the irises
#: (5 + 5) become points 468-472 and 473-477.
LIPS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 185, 40, 39, 37, 0, 267, 269, 270,
        409, 78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 191, 80, 81, 82, 13, 312, 311,
        310, 415, 76, 77, 90, 180, 85, 16, 315, 404, 320, 307, 306, 184, 74, 73, 72, 11, 302,
        303, 304, 408, 62, 96, 89, 179, 86, 15, 316, 403, 319, 325, 292, 183, 42, 41, 38, 12,
        268, 271, 272, 407)
LEFT_EYE = (33, 7, 163, 144, 145, 153, 154, 155, 133, 246, 161, 160, 159, 158, 157, 173, 130,
            25, 110, 24, 23, 22, 26, 112, 243, 247, 30, 29, 27, 28, 56, 190, 226, 31, 228, 229,
            230, 231, 232, 233, 244, 113, 225, 224, 223, 222, 221, 189, 35, 124, 46, 53, 52,
            65, 143, 111, 117, 118, 119, 120, 121, 128, 245, 156, 70, 63, 105, 66, 107, 55, 193)
RIGHT_EYE = (263, 249, 390, 373, 374, 380, 381, 382, 362, 466, 388, 387, 386, 385, 384, 398,
             359, 255, 339, 254, 253, 252, 256, 341, 463, 467, 260, 259, 257, 258, 286, 414,
             446, 261, 448, 449, 450, 451, 452, 453, 464, 342, 445, 444, 443, 442, 441, 413,
             265, 353, 276, 283, 282, 295, 372, 340, 346, 347, 348, 349, 350, 357, 465, 383,
             300, 293, 334, 296, 336, 285, 417)
#: The attention model's outputs, by name in the .tflite file.
_OUTPUTS = ("output_mesh_identity", "output_lips", "output_left_eye", "output_right_eye",
            "output_left_iris", "output_right_iris", "conv_faceflag")
#: Association of face ROIs (AssociationNormRectCalculator): a later ROI replaces an
#: earlier one overlapping it by more than this IoU.
_ASSOCIATION_IOU = 0.5


def _rect_box(rect: np.ndarray) -> np.ndarray:
    """The axis-aligned box (x0, y0, x1, y1) of a ROI (its rotation ignored, as MediaPipe's
    association of ROIs does)."""
    return np.asarray([rect[0] - rect[2] / 2, rect[1] - rect[3] / 2, rect[0] + rect[2] / 2,
                       rect[1] + rect[3] / 2])


@dataclass
class _Stream:
    """One stream's state: the ROI (5,) float64 its next frame uses, or None (detect);
    the last face's mesh box (4,) (None after a frame without one); the frame size."""

    rect: np.ndarray | None = None
    box: np.ndarray | None = None
    image_size: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Job:
    """One landmark crop: batch item `item`, its ROI (5,), from detection or tracking."""

    item: int
    rect: np.ndarray
    detected: bool


class TorchLandmarks:
    """MediaPipe's face mesh in torch for many streams at once (see the module docstring).

    device: where the networks run; half: float16 landmark network (CUDA only; None: on
    CUDA; the detector always runs in float32); stream: follow faces between frames (False:
    detect on every frame); max_faces, min_detection_confidence, min_tracking_confidence:
    as MediaPipe's FaceMesh; cuda_graphs: replay CUDA graphs on CUDA, captured on first use
    of each batch bucket and frame size (or a GraphRunner mode: "graph", "static",
    "eager"); channels_last: NHWC convolutions (None: yes, about twice as fast as NCHW on
    the CPU too); fuse: depthwise convolutions merged into the 1x1 ones after them
    (None: on CUDA); compile: the stages through torch.compile (inductor; each new batch
    bucket and frame size waits for a compile). Not thread-safe: one object per thread
    (objects share the weights).
    """

    backend = "torch"

    def __init__(self, device: torch.device | str = "cpu", half: bool | None = None,
                 stream: bool = True, max_faces: int = 4,
                 min_detection_confidence: float = 0.5, min_tracking_confidence: float = 0.5,
                 cuda_graphs: bool | str = True, channels_last: bool | None = None,
                 fuse: bool | None = None, compile: bool = False) -> None:
        self.device = torch.device(device)
        if half is None:
            half = self.device.type == "cuda"
        if half and self.device.type != "cuda":
            raise ValueError("float16 landmarks run on CUDA only (half=True on "
                             f"{self.device})")
        self.half = bool(half)
        self.stream = stream
        self.max_faces = max(1, int(max_faces))
        self.min_tracking_confidence = float(min_tracking_confidence)
        self.channels_last = True if channels_last is None else bool(channels_last)
        mode = cuda_graphs if isinstance(cuda_graphs, str) else \
            ("graph" if cuda_graphs else "eager")
        self.dtype = torch.float16 if self.half else torch.float32
        # the detector stays float32: its boxes (raw values to ~300) would lose half a
        # pixel in float16, and it runs only on frames without a followed face
        # on CUDA each depthwise convolution is merged into the 1x1 one after it: 66 fewer
        # kernels per frame (launches, not arithmetic, bound batch 1 there)
        self.fuse = self.device.type == "cuda" if fuse is None else bool(fuse)
        self.detector = FaceDetector(self.device, False, min_detection_confidence,
                                     mode, self.channels_last, self.fuse, compile)
        self.net = load_net(LANDMARK_FILE, self.device, self.dtype, self.channels_last,
                            self.fuse)
        names = self.net.graph.output_names()
        self._order = [names.index(n) for n in _OUTPUTS]
        self.stage = GraphRunner(self._stage, self.device, mode, self._stage_shapes,
                                 "face landmarks", compile)
        self._lips = torch.as_tensor(LIPS, device=self.device)
        self._left = torch.as_tensor(LEFT_EYE, device=self.device)
        self._right = torch.as_tensor(RIGHT_EYE, device=self.device)
        self._streams: dict[Hashable, _Stream] = {}
        self._closed = False

    # ---- stream bookkeeping ------------------------------------------------------------
    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Drop every stream's state and the captured graphs (idempotent)."""
        self._streams.clear()
        self.stage.release()
        self.detector.stage.release()
        self._closed = True

    def reset(self, stream_id: Hashable | None = None) -> None:
        """Forget the followed face of one stream (or of all): its next frame detects."""
        if stream_id is None:
            for s in self._streams.values():
                s.rect = None
        elif stream_id in self._streams:
            self._streams[stream_id].rect = None

    def forget(self, stream_id: Hashable) -> None:
        """Drop a finished stream's state."""
        self._streams.pop(stream_id, None)

    # ---- the batch -----------------------------------------------------------------------
    def _frames(self, frames: Sequence[np.ndarray] | torch.Tensor
                ) -> tuple[list[tuple[torch.Tensor, list[int]]], list[tuple[int, int]]]:
        """Frames as device tensors grouped by size: [(tensor (G, H, W, 3), batch items)],
        and each item's (h, w)."""
        if isinstance(frames, torch.Tensor):
            if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[3] != 3:
                raise FrameError(f"a frame batch tensor must be (B, H, W, 3) uint8 RGB, got "
                                 f"{tuple(frames.shape)} {frames.dtype}")
            if frames.shape[1] < 2 or frames.shape[2] < 2:
                raise FrameError(f"frame is too small: {frames.shape[2]}x{frames.shape[1]} "
                                 f"pixels")
            b, h, w = frames.shape[:3]
            return [(frames.to(self.device), list(range(b)))], [(h, w)] * b
        checked = [check_frame(f) for f in frames]
        sizes = [(f.shape[0], f.shape[1]) for f in checked]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(sizes):
            groups.setdefault(s, []).append(i)
        out = []
        for (h, w), items in groups.items():
            if self.device.type == "cpu":
                stacked = np.stack([checked[i] for i in items]) if len(items) > 1 else \
                    checked[items[0]][None]
                out.append((torch.from_numpy(stacked), items))
                continue
            batch = torch.empty((len(items), h, w, 3), dtype=torch.uint8, device=self.device)
            for k, i in enumerate(items):  # one host copy per frame (no stacking first)
                batch[k].copy_(torch.from_numpy(checked[i]))
            out.append((batch, items))
        return out, sizes

    @torch.no_grad()
    def detect_batch(self, frames: Sequence[np.ndarray] | torch.Tensor,
                     stream_ids: Sequence[Hashable]) -> list[Landmarks]:
        """Landmarks of one frame per stream (see the module docstring): frames (list of
        (H, W, 3) uint8 RGB arrays, or a (B, H, W, 3) uint8 tensor), stream_ids (B,), each
        id at most once -> B Landmarks (pixels, numpy) in the frames' order."""
        if self._closed:
            raise FrameError("the landmark detector is closed")
        n = len(frames)
        if len(stream_ids) != n:
            raise ValueError(f"got {n} frames but {len(stream_ids)} stream ids")
        if len(set(stream_ids)) != n:
            raise ValueError("each stream may send one frame per detect_batch call")
        if n == 0:
            return []
        groups, sizes = self._frames(frames)
        states = []
        for sid, size in zip(stream_ids, sizes):
            st = self._streams.setdefault(sid, _Stream())
            if st.image_size != size or not self.stream:
                st.rect = None
            st.image_size = size
            states.append(st)
        jobs = [_Job(i, st.rect, False) for i, st in enumerate(states) if st.rect is not None]
        jobs += self._detection_jobs(groups, [i for i, st in enumerate(states)
                                              if st.rect is None], {})
        points, present = self._landmarks(groups, jobs)
        # a followed face lost: detect on the same frame (MediaPipe detects on every frame
        # while it follows fewer than max_faces faces); ROIs overlapping the lost one by
        # IoU > 0.5 are dropped, as its association of ROIs drops them
        lost = {job.item: job.rect for job, ok in zip(jobs, present)
                if not job.detected and not ok}
        if lost:
            more = self._detection_jobs(groups, list(lost), lost)
            if more:
                p2, ok2 = self._landmarks(groups, more)
                jobs += more
                points, present = np.concatenate([points, p2]), np.concatenate([present, ok2])
        points = points.astype(np.float32)
        rects = face_roi.rects_from_landmarks(points) if self.stream and len(jobs) else None
        out = []
        for i, st in enumerate(states):
            j = self._choose(i, jobs, points, present, st.box)
            if j is None:
                st.rect = st.box = None
                out.append(Landmarks.missing(sizes[i]))
                continue
            lm = Landmarks(points[j].copy(), 1.0, sizes[i])
            if rects is not None:
                st.rect, st.box = rects[j], lm.box
            out.append(lm)
        return out

    @staticmethod
    def _choose(item: int, jobs: list[_Job], points: np.ndarray, present: np.ndarray,
                previous: np.ndarray | None) -> int | None:
        """The job whose landmarks a frame returns: the followed face if it held, else one
        of the detected faces by `choose_face` (LandmarkDetector's rule)."""
        cands = [j for j, job in enumerate(jobs) if job.item == item and present[j]]
        if not cands:
            return None
        held = [j for j in cands if not jobs[j].detected]
        if held:
            return held[0]
        return cands[choose_face([points[j] for j in cands], previous)]

    def _detection_jobs(self, groups: list[tuple[torch.Tensor, list[int]]], items: list[int],
                        avoid: dict[int, np.ndarray]) -> list[_Job]:
        """Detect on the frames of `items`: a job per face ROI, skipping ROIs that overlap
        `avoid[item]` (a ROI) by IoU > 0.5."""
        if not items:
            return []
        found = self._detect(groups, set(items))
        jobs = []
        for i in items:
            for rect in self._rois(found[i]):
                if i in avoid and box_iou(_rect_box(avoid[i]), _rect_box(rect)) > \
                        _ASSOCIATION_IOU:
                    continue
                jobs.append(_Job(i, rect, True))
        return jobs

    def _detect(self, groups: list[tuple[torch.Tensor, list[int]]],
                wanted: set[int]) -> dict[int, Detections]:
        found: dict[int, Detections] = {}
        for tensor, items in groups:
            local = [k for k, i in enumerate(items) if i in wanted]
            if not local:
                continue
            sub = tensor if len(local) == len(items) else \
                tensor[torch.as_tensor(local, device=tensor.device)]
            for k, det in zip(local, self.detector.detect(sub)):
                found[items[k]] = det
        return found

    def _rois(self, det: Detections) -> list[np.ndarray]:
        """ROIs of one image's detections (best first, at most max_faces), an ROI replacing
        earlier ones it overlaps by more than IoU 0.5 (AssociationNormRectCalculator)."""
        if len(det) == 0:
            return []
        rects = face_roi.rects_from_boxes(det.boxes[:self.max_faces],
                                          det.keypoints[:self.max_faces])
        kept: list[np.ndarray] = []
        for r in rects:
            kept = [k for k in kept if box_iou(_rect_box(k), _rect_box(r)) <= _ASSOCIATION_IOU]
            kept.append(r)
        return kept

    @staticmethod
    def _stage_shapes(key: tuple[int, int, int, int]
                      ) -> list[tuple[tuple[int, ...], torch.dtype]]:
        n, g, h, w = key
        return [((g, h, w, 3), torch.uint8), ((n, 2, 3), torch.float64),
                ((n,), torch.int64)]

    def _stage(self, frames: torch.Tensor, maps: torch.Tensor,
               index: torch.Tensor) -> torch.Tensor:
        """Crop, network, refinement: frames (G, H, W, 3) uint8, maps (N, 2, 3), index (N,)
        -> (N, 478 * 2 + 1) float32: the refined points in crop pixels (192 x 192), then
        the face presence score."""
        crops = face_roi.warp(frames, maps, LANDMARK_SIZE, False, (0.0, 1.0), index)
        crops = crops.to(self.dtype)
        if self.channels_last:
            crops = crops.contiguous(memory_format=torch.channels_last)
        outs = self.net(crops)
        mesh, lips, left, right, left_iris, right_iris, flag = (outs[k] for k in self._order)
        j = crops.shape[0]
        pts = mesh.reshape(j, 468, 3)[..., :2].float()
        pts = pts.index_copy(1, self._lips, lips.reshape(j, 80, 2).float())
        pts = pts.index_copy(1, self._left, left.reshape(j, 71, 2).float())
        pts = pts.index_copy(1, self._right, right.reshape(j, 71, 2).float())
        pts = torch.cat([pts, left_iris.reshape(j, 5, 2).float(),
                         right_iris.reshape(j, 5, 2).float()], 1)
        score = torch.sigmoid(flag.reshape(j, 1).float())
        return torch.cat([pts.reshape(j, -1), score], 1)

    def _landmarks(self, groups: list[tuple[torch.Tensor, list[int]]],
                   jobs: list[_Job]) -> tuple[np.ndarray, np.ndarray]:
        """Run the landmark network on every job's crop -> points (J, 478, 2) float64
        pixels, presence (J,) bool."""
        if not jobs:
            return np.zeros((0, N_POINTS, 2)), np.zeros(0, bool)
        where = {}
        for g, (_, items) in enumerate(groups):
            for k, i in enumerate(items):
                where[i] = (g, k)
        rects = np.stack([j.rect for j in jobs])
        host = np.empty((len(jobs), 2 * N_POINTS + 1), np.float32)
        for g, (tensor, _) in enumerate(groups):
            sel = [n for n, j in enumerate(jobs) if where[j.item][0] == g]
            if not sel:
                continue
            maps = torch.as_tensor(face_roi.sampling_maps(rects[sel], LANDMARK_SIZE),
                                   device=self.device)
            index = torch.as_tensor([where[jobs[n].item][1] for n in sel], device=self.device)
            key = (bucket(len(sel)), bucket(tensor.shape[0])) + tuple(tensor.shape[1:3])
            host[sel] = self.stage(key, [tensor, maps, index], len(sel)).cpu().numpy()
        unit = host[:, :-1].reshape(-1, N_POINTS, 2).astype(np.float64) / LANDMARK_SIZE
        present = host[:, -1] > self.min_tracking_confidence
        return face_roi.project(unit, rects), present


def landmarks_in_chunks(frames: Iterable[np.ndarray], landmarks: TorchLandmarks,
                        chunk: int = 100, streams: int = 64, buffer_bytes: int = 2 << 30,
                        progress: Callable[[int], None] | None = None) -> list[Landmarks]:
    """Landmarks of every frame of one video, batched: the frames (in order, (H, W, 3)
    uint8 RGB, any iterable) are cut into chunks of `chunk` frames, each tracked as its own
    stream from its own start (detection on its first frame), up to `streams` chunks side
    by side per `detect_batch` call and at most `buffer_bytes` of frames held at once.
    Returns one Landmarks per frame, in order; `progress(n)` after every n frames."""
    if chunk < 1 or streams < 1:
        raise ValueError(f"chunk and streams must be at least 1, got {chunk} and {streams}")
    out: list[Landmarks] = []
    block: list[np.ndarray] = []
    capacity = 0
    serial = [0]
    for frame in frames:
        frame = check_frame(frame)
        if not capacity:
            fit = max(1, int(buffer_bytes) // max(1, chunk * frame.nbytes))
            capacity = chunk * min(streams, fit)
        block.append(frame)
        if len(block) == capacity:
            out += _chunked_block(block, landmarks, chunk, serial, progress)
            block = []
    if block:
        out += _chunked_block(block, landmarks, chunk, serial, progress)
    return out


def _chunked_block(block: list[np.ndarray], landmarks: TorchLandmarks, chunk: int,
                   serial: list[int], progress: Callable[[int], None] | None
                   ) -> list[Landmarks]:
    """One block of `landmarks_in_chunks`: its chunks side by side, frame by frame."""
    chunks = [block[i:i + chunk] for i in range(0, len(block), chunk)]
    ids = [("chunk", serial[0] + k) for k in range(len(chunks))]
    serial[0] += len(chunks)
    results: list[list[Landmarks]] = [[] for _ in chunks]
    for t in range(len(chunks[0])):
        active = [k for k, c in enumerate(chunks) if t < len(c)]
        got = landmarks.detect_batch([chunks[k][t] for k in active], [ids[k] for k in active])
        for k, lm in zip(active, got):
            results[k].append(lm)
        if progress is not None:
            progress(len(active))
    for sid in ids:
        landmarks.forget(sid)
    return [lm for r in results for lm in r]


class TorchLandmarkSource:
    """One stream of `TorchLandmarks`: the `torch` LandmarkSource (`source(frame) ->
    Landmarks`, frame (H, W, 3) uint8 RGB). Not thread-safe: one per stream."""

    backend = "torch"

    def __init__(self, landmarks: TorchLandmarks) -> None:
        self.landmarks = landmarks
        self.stream = landmarks.stream

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __call__(self, frame: np.ndarray) -> Landmarks:
        return self.landmarks.detect_batch([frame], [0])[0]

    def reset(self) -> None:
        self.landmarks.reset()

    def close(self) -> None:
        self.landmarks.close()
