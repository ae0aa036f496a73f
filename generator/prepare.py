"""`dvp prepare`: a target video -> a target directory (DESIGN.md).

Track every frame (identity and focal length over the whole video), choose one fixed square
crop around head and shoulders, resize to S, move the camera into the crop, fit albedo and
lighting on the cropped frames, estimate the neutral, and write the target directory aside
then rename it into place.
"""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np

from generator.errors import TargetError
from tracker.face_model import FaceModel
from tracker.geometry import project
from tracker.params import FaceParams

#: Side of the square crop as a multiple of the face's landmark box (head and shoulders).
CROP_SCALE = 2.4
#: The face's centre sits this fraction of the crop above the crop's centre.
CROP_RAISE = 0.1


def face_boxes(params: FaceParams, model: FaceModel) -> np.ndarray:
    """Landmark bounding boxes [T, 4] (x0, y0, x1, y1) in pixels of the valid frames."""
    valid = params.select(np.nonzero(params.valid)[0])
    ids = np.unique(model.landmark_vertex_ids[:468])
    verts = model.vertices(valid.identity[None], valid.expression, vertex_ids=ids)
    uv = project(verts, valid.rotation, valid.translation, float(params.focal[0]),
                 params.principal_point)
    return np.concatenate([uv.min(1), uv.max(1)], 1)


def choose_crop(params: FaceParams, model: FaceModel) -> tuple[int, int, int]:
    """One fixed square crop (x, y, size) in source pixels around head and shoulders.

    The size is CROP_SCALE times the largest face box of the video, the centre the median
    face centre (raised a little, so shoulders fit below); the box is moved inside the frame
    where it fits, and shrunk to the frame when larger.
    """
    if not params.valid.any():
        raise TargetError("no face found in any frame of the video: cannot choose a crop")
    boxes = face_boxes(params, model)
    h, w = (int(v) for v in params.image_size)
    side = float(np.max(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    size = int(min(round(side * CROP_SCALE), h, w))
    cx = float(np.median((boxes[:, 0] + boxes[:, 2]) / 2))
    cy = float(np.median((boxes[:, 1] + boxes[:, 3]) / 2)) + CROP_RAISE * size
    x = int(np.clip(round(cx - size / 2), 0, w - size))
    y = int(np.clip(round(cy - size / 2), 0, h - size))
    return x, y, size


def crop_params(params: FaceParams, crop: tuple[int, int, int], resolution: int) -> FaceParams:
    """The same parameters seen through the S x S crop's camera (focal and principal point
    scaled and shifted; image_size (S, S))."""
    x, y, size = crop
    scale = resolution / size
    return replace(
        params,
        focal=params.focal * scale,
        principal_point=(params.principal_point - np.asarray([x, y], np.float32)) * scale,
        image_size=np.asarray([resolution, resolution]),
    )


def crop_frame(frame: np.ndarray, crop: tuple[int, int, int], resolution: int) -> np.ndarray:
    """Cut the square crop out of an RGB frame [H, W, 3] uint8 and resize it to [S, S, 3]."""
    x, y, size = crop
    patch = frame[y : y + size, x : x + size]
    if patch.shape[:2] != (size, size):
        raise TargetError(f"frame of shape {frame.shape} does not hold the crop {crop}")
    interp = cv2.INTER_AREA if size > resolution else cv2.INTER_LINEAR
    return cv2.resize(patch, (resolution, resolution), interpolation=interp)
