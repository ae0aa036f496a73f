"""Drawing a fit over its frame, so that a person can judge it.

The fitted model's 478 landmarks (projected) are drawn as MediaPipe's face-mesh wireframe
(green), the observed landmarks as dots (red), each iris (fitted) as a circle with a short
gaze ray (yellow). Frames without a face get a "no face" note.
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

from tracker.landmarks import check_frame

_GREEN = (60, 220, 60)
_RED = (230, 40, 40)
_YELLOW = (250, 220, 40)
_SHIFT = 4  # sub-pixel drawing: coordinates times 16


@lru_cache(maxsize=1)
def mesh_edges() -> np.ndarray:
    """MediaPipe's face-mesh tesselation edges (E, 2) over the 468 mesh landmarks."""
    from mediapipe.python.solutions.face_mesh_connections import FACEMESH_TESSELATION

    return np.asarray(sorted(FACEMESH_TESSELATION), np.int64)


def _fixed(points: np.ndarray) -> np.ndarray:
    # continuous pixel coordinates -> OpenCV's (pixel centres at integers), sub-pixel shift
    return np.round((points - 0.5) * (1 << _SHIFT)).astype(np.int32)


def draw_fit(frame: np.ndarray, fitted: np.ndarray | None, observed: np.ndarray | None = None,
             valid: bool = True, label: str | None = None) -> np.ndarray:
    """A copy of `frame` (H, W, 3) uint8 RGB with the fit drawn over it.

    fitted (478, 2): the fitted model's landmarks in pixels (None or invalid: not drawn);
    observed (478, 2): MediaPipe's landmarks (drawn as dots); label: text at the top left.
    """
    out = check_frame(frame).copy()
    h, w = out.shape[:2]
    thick = max(1, round(min(h, w) / 500))
    if valid and fitted is not None and np.all(np.isfinite(fitted)):
        pts = _fixed(np.asarray(fitted, np.float32))
        edges = mesh_edges()
        lines = np.stack([pts[edges[:, 0]], pts[edges[:, 1]]], 1)
        cv2.polylines(out, list(lines), False, _GREEN, 1, cv2.LINE_AA, _SHIFT)
        if fitted.shape[0] >= 478:
            for ids in (range(468, 473), range(473, 478)):
                ring = np.asarray(fitted[list(ids)], np.float32)
                centre = ring[0]
                radius = float(np.mean(np.linalg.norm(ring[1:] - centre, axis=1)))
                c = _fixed(centre[None])[0]
                cv2.circle(out, (int(c[0]), int(c[1])), int(max(radius, 1.0) * (1 << _SHIFT)),
                           _YELLOW, thick, cv2.LINE_AA, _SHIFT)
    if valid and observed is not None and np.all(np.isfinite(observed)):
        obs = _fixed(np.asarray(observed, np.float32))
        r = max(1, thick) << _SHIFT
        for p in obs[:468:2]:
            cv2.circle(out, (int(p[0]), int(p[1])), r, _RED, -1, cv2.LINE_AA, _SHIFT)
    text = label if valid else (label + "  no face" if label else "no face")
    if text:
        scale = max(0.4, min(h, w) / 900)
        cv2.putText(out, text, (8, int(24 * scale / 0.6)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    (255, 255, 255), max(1, thick), cv2.LINE_AA)
    return out
