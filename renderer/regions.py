"""Face regions in correspondence-image units (position on the mean face, in [0, 1]^3).

`mouth_box(model)`: the box around the lips on the mean face, normalised as the
correspondence image is (`renderer.conditioning.mean_face_box` of the drawn regions), so a
pixel is "mouth" when its correspondence lies inside it (`generator.regions`).
"""

from __future__ import annotations

import numpy as np

from renderer.conditioning import DRAWN_REGIONS, mean_face_box
from tracker.face_model import FaceModel

#: MediaPipe's outer lip contour (landmark ids).
LIP_LANDMARKS = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291, 409, 270, 269, 267, 0, 37,
                 39, 40, 185)
#: Margin around the lips' box, as a fraction of the mouth's width (each side): the skin
#: around the lips moves with them, and the chin's top is part of talking.
MOUTH_MARGIN = 0.25


def mouth_box(model: FaceModel, regions: tuple[str, ...] = DRAWN_REGIONS) -> np.ndarray:
    """`(2, 3)` float32: lower and upper corners of the mouth box in correspondence units.

    x and y span the lip contour of the mean face widened by MOUTH_MARGIN of the mouth's
    width each side; z spans the whole face (the mouth interior lies behind the lips).
    """
    triangles = model.triangles[model.region_triangles(*regions)]
    lo, hi = mean_face_box(model, triangles)
    lips = np.asarray(model.landmarks(model.neutral.astype(np.float64)))[list(LIP_LANDMARKS)]
    margin = MOUTH_MARGIN * float(lips[:, 0].max() - lips[:, 0].min())
    box_lo = np.array([lips[:, 0].min() - margin, lips[:, 1].min() - margin, lo[2]])
    box_hi = np.array([lips[:, 0].max() + margin, lips[:, 1].max() + margin, hi[2]])
    scale = 1.0 / np.maximum(hi - lo, 1e-6)
    return np.clip(np.stack([(box_lo - lo) * scale, (box_hi - lo) * scale]), 0.0, 1.0).astype(
        np.float32)
