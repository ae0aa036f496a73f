"""MediaPipe's short-range face detector (BlazeFace) in torch, batched over images.

The rules are those of mediapipe 0.10.21's face_detection.pbtxt with the options of
face_detection_short_range.pbtxt: the whole image letterboxed into a 128x128 tensor in
[-1, 1] (zero border), 896 SSD anchors (strides 8, 16, 16, 16; fixed size 1), boxes and six
keypoints decoded x-first with scale 128, scores sigmoid(clip(logit, +-100)) kept from the
minimum detection confidence up, weighted non-maximum suppression at IoU 0.3 (the cluster's
score-weighted mean box and keypoints, the best score), then projected back to the image.
Post-processing runs on the host in float32 (a few detections per image).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tracker import face_roi
from tracker.mediapipe_models import DETECTOR_FILE, DETECTOR_SIZE, GraphRunner, bucket, load_net

#: SsdAnchorsCalculator options of the short-range model.
_STRIDES = (8, 16, 16, 16)
_SCALE = 128.0
_SCORE_CLIP = 100.0
_NMS_IOU = 0.3
N_KEYPOINTS = 6


@dataclass(frozen=True)
class Detections:
    """One image's faces, best score first: boxes (K, 4) float32 pixels (x0, y0, x1, y1),
    keypoints (K, 6, 2) float32 pixels (eyes, nose tip, mouth, ear tragions; MediaPipe's
    order), scores (K,) float32 in [0, 1]."""

    boxes: np.ndarray
    keypoints: np.ndarray
    scores: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)


def ssd_anchors() -> np.ndarray:
    """The 896 anchor centres (896, 2) float32 (x, y) in [0, 1] of the 128x128 tensor."""
    centres = []
    layer = 0
    while layer < len(_STRIDES):
        same = layer
        per_cell = 0
        while same < len(_STRIDES) and _STRIDES[same] == _STRIDES[layer]:
            per_cell += 2  # aspect ratio 1.0 plus the interpolated scale
            same += 1
        cells = int(np.ceil(DETECTOR_SIZE / _STRIDES[layer]))
        for y in range(cells):
            for x in range(cells):
                centres += [((x + 0.5) / cells, (y + 0.5) / cells)] * per_cell
        layer = same
    return np.asarray(centres, np.float32)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray,
           min_score: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's raw outputs (896, 16), (896,) -> boxes (K, 4) (x0, y0, x1, y1), keypoints
    (K, 6, 2), scores (K,) in tensor units [0, 1], those scoring at least `min_score`."""
    logits = np.clip(raw_scores.astype(np.float64), -_SCORE_CLIP, _SCORE_CLIP)
    scores = (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
    keep = np.nonzero(scores >= min_score)[0]
    raw = raw_boxes[keep].astype(np.float32)
    anc = anchors[keep]
    xc = raw[:, 0] / _SCALE + anc[:, 0]
    yc = raw[:, 1] / _SCALE + anc[:, 1]
    w = raw[:, 2] / _SCALE
    h = raw[:, 3] / _SCALE
    boxes = np.stack([xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2], 1)
    kp = raw[:, 4:4 + 2 * N_KEYPOINTS].reshape(-1, N_KEYPOINTS, 2) / _SCALE + anc[:, None]
    return boxes.astype(np.float32), kp.astype(np.float32), scores[keep]


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box (4,) with boxes (K, 4) (x0, y0, x1, y1); 0 where they do not meet."""
    w = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    h = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    inter = np.where((w > 0) & (h > 0), w * h, 0.0)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def weighted_nms(boxes: np.ndarray, keypoints: np.ndarray, scores: np.ndarray,
                 iou: float = _NMS_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MediaPipe's WEIGHTED non-maximum suppression: repeatedly take the best remaining
    detection and every remaining one overlapping it by more than `iou` (itself included),
    replace it by their score-weighted mean box and keypoints, keep its score."""
    order = np.argsort(-scores, kind="stable")
    out_b, out_k, out_s = [], [], []
    while order.size:
        best = order[0]
        sim = _iou(boxes[best], boxes[order])
        cluster, order = order[sim > iou], order[sim <= iou]
        out_s.append(scores[best])
        if cluster.size == 0:  # an empty box overlaps nothing, itself included: MediaPipe
            out_b.append(boxes[best])  # keeps it as it is and stops
            out_k.append(keypoints[best])
            break
        wts = scores[cluster][:, None]
        total = wts.sum()
        out_b.append((boxes[cluster] * wts).sum(0) / total)
        out_k.append((keypoints[cluster] * wts[:, :, None]).sum(0) / total)
    if not out_s:
        return (np.zeros((0, 4), np.float32), np.zeros((0, N_KEYPOINTS, 2), np.float32),
                np.zeros(0, np.float32))
    return (np.asarray(out_b, np.float32), np.asarray(out_k, np.float32),
            np.asarray(out_s, np.float32))


class FaceDetector:
    """BlazeFace on a device: `detect(frames) -> list[Detections]` for same-size frames.

    device: torch device; half: float16 network (CUDA); min_score: minimum detection
    confidence; graphs: a GraphRunner mode ("graph": on CUDA the crop and the network
    replay one CUDA graph per batch bucket and frame size); channels_last: NHWC
    convolutions; fuse: depthwise convolutions merged into the 1x1 ones (CUDA); compile:
    through torch.compile.
    """

    def __init__(self, device: torch.device, half: bool = False, min_score: float = 0.5,
                 graphs: str = "graph", channels_last: bool = False, fuse: bool = False,
                 compile: bool = False) -> None:
        self.dtype = torch.float16 if half else torch.float32
        self.net = load_net(DETECTOR_FILE, device, self.dtype, channels_last, fuse)
        names = self.net.graph.output_names()
        self._boxes, self._scores = names.index("regressors"), names.index("classificators")
        self.device = device
        self.channels_last = channels_last
        self.min_score = float(min_score)
        self.anchors = ssd_anchors()
        self.stage = GraphRunner(self._run, device, graphs, self._shapes, "face detection",
                                 compile)

    @staticmethod
    def _shapes(key: tuple[int, int, int]) -> list[tuple[tuple[int, ...], torch.dtype]]:
        g, h, w = key
        return [((g, h, w, 3), torch.uint8), ((g, 2, 3), torch.float64)]

    def _run(self, frames: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
        """Crop, network: frames (N, H, W, 3) uint8, maps (N, 2, 3) -> (N, 896 * 17)
        float32 (the raw boxes, then the raw scores)."""
        x = face_roi.warp(frames, maps, DETECTOR_SIZE, True, (-1.0, 1.0)).to(self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.net(x)
        n = x.shape[0]
        return torch.cat([out[self._boxes].reshape(n, -1).float(),
                          out[self._scores].reshape(n, -1).float()], 1)

    def postprocess(self, raw_boxes: np.ndarray, raw_scores: np.ndarray,
                    rects: np.ndarray) -> list[Detections]:
        """Raw outputs (N, 896, 16), (N, 896) and letterbox rects (N, 5) -> detections in
        pixels, per image."""
        out = []
        for i in range(len(rects)):
            b, k, s = decode(raw_boxes[i], raw_scores[i], self.anchors, self.min_score)
            b, k, s = weighted_nms(b, k, s)
            rect = np.repeat(rects[i:i + 1], len(b), 0)
            corners = face_roi.project(b.reshape(-1, 2, 2), rect)
            out.append(Detections(corners.reshape(-1, 4).astype(np.float32),
                                  face_roi.project(k, rect).astype(np.float32), s))
        return out

    def detect(self, frames: torch.Tensor) -> list[Detections]:
        """Faces of same-size frames (N, H, W, 3) uint8 on the device."""
        n, h, w, _ = frames.shape
        if n == 0:
            return []
        rects = face_roi.letterbox_rects(np.tile([[h, w]], (n, 1)))
        maps = torch.as_tensor(face_roi.sampling_maps(rects, DETECTOR_SIZE), device=self.device)
        raw = self.stage((bucket(n), h, w), [frames, maps], n).cpu().numpy()
        count = len(self.anchors)
        return self.postprocess(raw[:, :count * 16].reshape(n, count, 16), raw[:, count * 16:],
                                rects)
