"""MediaPipe's face regions of interest and its image-to-tensor warp, batched.

A region (ROI) is a rotated rectangle in pixels, rows of `(N, 5)` float64 arrays
`[x_center, y_center, width, height, rotation]` (rotation in radians, MediaPipe's sign:
a positive rotation turns the crop's x axis toward +y, i.e. clockwise on screen). The rules
are MediaPipe 0.10.21's face-mesh graph (face_detection_front_detection_to_roi.pbtxt,
face_landmark_landmarks_to_roi.pbtxt; DetectionsToRectsCalculator,
RectTransformationCalculator), the warp is its ImageToTensorCalculator on the CPU (OpenCV's
warpPerspective, bilinear, fixed point: source positions rounded to 1/32 pixel, 15-bit
weights, the result rounded to uint8 before scaling to the tensor's value range).

Pixel coordinates here are MediaPipe's normalised coordinates times the image size (the
`Landmarks` convention, DESIGN.md): the image spans [0, w] x [0, h].
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: ROIs are the landmark (or detection) box scaled by 1.5, squared on the long side.
ROI_SCALE = 1.5
#: Rotation of a ROI from the landmarks: the line from point 33 (one eye's outer corner)
#: to point 263 (the other's) is made horizontal; from a detection: keypoint 0 to 1 (eyes).
LANDMARK_ROTATION_POINTS = (33, 263)
DETECTION_ROTATION_POINTS = (0, 1)
_TAB = 32  # OpenCV's INTER_TAB_SIZE: positions in 1/32 pixel


def normalize_radians(angle: np.ndarray) -> np.ndarray:
    """Angles wrapped into [-pi, pi) (MediaPipe's NormalizeRadians)."""
    return angle - 2 * math.pi * np.floor((angle + math.pi) / (2 * math.pi))


def _rotation(p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    """MediaPipe's ROI rotation from two points (N, 2) in pixels: 0 - atan2(-dy, dx)."""
    return normalize_radians(-np.arctan2(-(p1[:, 1] - p0[:, 1]), p1[:, 0] - p0[:, 0]))


def _square_long(rects: np.ndarray) -> np.ndarray:
    """RectTransformationCalculator(scale 1.5, square_long) on pixel rects (N, 5)."""
    out = rects.copy()
    long_side = np.maximum(rects[:, 2], rects[:, 3])
    out[:, 2] = long_side * ROI_SCALE
    out[:, 3] = long_side * ROI_SCALE
    return out


def rects_from_boxes(boxes: np.ndarray, keypoints: np.ndarray) -> np.ndarray:
    """Face ROIs from detections: boxes (N, 4) pixels (x0, y0, x1, y1), keypoints (N, K, 2)
    pixels -> rects (N, 5)."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    kp = np.asarray(keypoints, np.float64)
    rects = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                      boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1],
                      _rotation(kp[:, DETECTION_ROTATION_POINTS[0]],
                                kp[:, DETECTION_ROTATION_POINTS[1]])], 1)
    return _square_long(rects)


def rects_from_landmarks(points: np.ndarray) -> np.ndarray:
    """The next frame's ROIs from landmarks (N, P, 2) pixels (all P points' box) -> (N, 5)."""
    pts = np.asarray(points, np.float64)
    lo, hi = pts.min(1), pts.max(1)
    a, b = LANDMARK_ROTATION_POINTS
    rects = np.concatenate([(lo + hi) / 2, hi - lo, _rotation(pts[:, a], pts[:, b])[:, None]],
                           1)
    return _square_long(rects)


def letterbox_rects(image_sizes: np.ndarray) -> np.ndarray:
    """The whole image padded to a square around its centre (ImageToTensorCalculator with
    keep_aspect_ratio for a square tensor): image_sizes (N, 2) (h, w) -> rects (N, 5)."""
    hw = np.asarray(image_sizes, np.float64).reshape(-1, 2)
    side = hw.max(1)
    zeros = np.zeros(len(hw))
    return np.stack([hw[:, 1] / 2, hw[:, 0] / 2, side, side, zeros], 1)


def sampling_maps(rects: np.ndarray, size: int) -> np.ndarray:
    """Affine maps (N, 2, 3) float64 from a tensor pixel (column u, row v; integers, as
    OpenCV indexes them) to the source image position (x, y) in OpenCV's pixel-index units,
    built as OpenCV does: the rect's corners as float32 (cv::RotatedRect::points), tensor
    corners (0, size), (0, 0), (size, 0), (size, size)."""
    r = np.asarray(rects, np.float64).reshape(-1, 5)
    f32 = np.float32
    cx, cy = r[:, 0].astype(f32), r[:, 1].astype(f32)
    w, h = r[:, 2].astype(f32), r[:, 3].astype(f32)
    angle = (r[:, 4].astype(f32) * f32(180.0)).astype(np.float64) / math.pi
    rad = angle.astype(f32).astype(np.float64) * math.pi / 180.0
    b = (np.cos(rad).astype(f32) * f32(0.5)).astype(f32)
    a = (np.sin(rad).astype(f32) * f32(0.5)).astype(f32)
    p0 = np.stack([cx - a * h - b * w, cy + b * h - a * w], 1).astype(np.float64)
    p1 = np.stack([cx + a * h - b * w, cy - b * h - a * w], 1).astype(np.float64)
    p2 = np.stack([2 * cx - p0[:, 0].astype(f32), 2 * cy - p0[:, 1].astype(f32)],
                  1).astype(np.float64)
    maps = np.empty((len(r), 2, 3))
    maps[:, :, 0] = (p2 - p1) / size  # per tensor column
    maps[:, :, 1] = (p0 - p1) / size  # per tensor row
    maps[:, :, 2] = p1
    return maps


def warp(frames: torch.Tensor, maps: torch.Tensor, size: int, border_zero: bool,
         value_range: tuple[float, float], index: torch.Tensor | None = None) -> torch.Tensor:
    """OpenCV-exact bilinear crops of uint8 images.

    frames (G, H, W, 3) uint8 (any device); maps (N, 2, 3) float64 from `sampling_maps`
    (same device); index (N,) int64: the frame of each crop (default: crop n of frame n)
    -> (N, 3, size, size) float32 with values mapped from [0, 255] to `value_range`.
    Outside the image: zeros (`border_zero`) or the nearest edge pixel. Only kernels, no
    host round trip (CUDA-graph capturable).
    """
    g, h, w, _ = frames.shape
    n = maps.shape[0]
    dev = frames.device
    grid = torch.arange(size, device=dev, dtype=torch.float64)
    u, v = grid[None, None, :], grid[None, :, None]
    x = maps[:, 0, 0, None, None] * u + maps[:, 0, 1, None, None] * v + maps[:, 0, 2, None, None]
    y = maps[:, 1, 0, None, None] * u + maps[:, 1, 1, None, None] * v + maps[:, 1, 2, None, None]
    # OpenCV: positions rounded to 1/32 pixel (cvRound: half to even, as torch.round)
    qx = torch.round(x * _TAB).to(torch.int32)  # N,S,S
    qy = torch.round(y * _TAB).to(torch.int32)
    x0, y0 = qx >> 5, qy >> 5  # floor (arithmetic shift)
    fx, fy = (qx & (_TAB - 1)).to(torch.float32), (qy & (_TAB - 1)).to(torch.float32)
    if index is None:
        index = torch.arange(n, device=dev) if g == n else torch.zeros(n, dtype=torch.int64,
                                                                       device=dev)
    start = (index.to(torch.int32) * (h * w))[:, None, None]
    flat = frames.reshape(g * h * w, 3)
    wx = (_TAB - fx, fx)
    wy = (_TAB - fy, fy)
    total = torch.zeros(n, size, size, 3, device=dev, dtype=torch.float32)
    for dy in (0, 1):
        yy = y0 + dy
        row = start + yy.clamp(0, h - 1) * w
        for dx in (0, 1):
            xx = x0 + dx
            weight = wx[dx] * wy[dy]  # 0..1024: OpenCV's 15-bit weights / 32
            if border_zero:
                weight = weight * ((xx >= 0) & (xx < w) & (yy >= 0) & (yy < h))
            px = flat[(row + xx.clamp(0, w - 1)).long()]  # N,S,S,3 uint8
            total += px.to(torch.float32) * weight[..., None]  # exact in float32 (< 2^24)
    pixels = torch.floor((total + 512.0) / 1024.0)  # (sum * 32 + 2^14) >> 15
    lo, hi = value_range
    out = pixels * ((hi - lo) / 255.0) + lo
    return out.permute(0, 3, 1, 2).contiguous()


def project(points: np.ndarray, rects: np.ndarray) -> np.ndarray:
    """Points (N, P, 2) in a ROI's unit square ([0, 1]^2 of the crop) -> pixels (N, P, 2)
    (LandmarkProjectionCalculator / DetectionProjectionCalculator)."""
    p = np.asarray(points, np.float64) - 0.5
    r = np.asarray(rects, np.float64).reshape(-1, 5)
    c, s = np.cos(r[:, 4])[:, None], np.sin(r[:, 4])[:, None]
    x = (c * p[..., 0] - s * p[..., 1]) * r[:, 2, None] + r[:, 0, None]
    y = (s * p[..., 0] + c * p[..., 1]) * r[:, 3, None] + r[:, 1, None]
    return np.stack([x, y], -1)
