"""Image regions of a target frame, from its conditioning: face, mouth, background.

- **face**: the renderer's mask (the drawn head: face, scalp, neck, mouth and eyes);
- **mouth**: face pixels whose correspondence (position on the mean face, the conditioning
  channels 3-5 in [0, 1]) lies inside the target's mouth box (`TrainingData.mouth_box`,
  `renderer.regions.mouth_box` for the face model): lips, teeth, mouth interior, the skin
  around them;
- **background**: everything else (hair, body, room).

Training weighs the L1 term by them (`GeneratorConfig.face_weight`, `mouth_weight`) and
`generator.metrics.evaluate` reports each one's figures.
"""

from __future__ import annotations

import numpy as np
import torch

#: Region names in report order.
REGION_NAMES = ("face", "mouth", "background")


def mouth_mask(correspondence: torch.Tensor, face: torch.Tensor,
               box: np.ndarray | torch.Tensor | None) -> torch.Tensor:
    """Mouth pixels `[B, 1, S, S]` bool.

    correspondence: `[B, 3, S, S]` in [0, 1] (float) or uint8 (value/255); face: `[B, 1, S, S]`
    bool; box: `(2, 3)` lower and upper corners in correspondence units, None: no mouth.
    """
    if box is None:
        return torch.zeros_like(face)
    corr = correspondence.float() / 255.0 if correspondence.dtype == torch.uint8 \
        else correspondence.float()
    box_t = (box if isinstance(box, torch.Tensor)
             else torch.from_numpy(np.asarray(box, np.float32))).to(corr.device, torch.float32)
    lo, hi = (box_t[k][None, :, None, None] for k in (0, 1))
    inside = ((corr >= lo) & (corr <= hi)).all(dim=1, keepdim=True)
    return inside & face


def region_masks(conditioning: torch.Tensor, mask: torch.Tensor,
                 box: np.ndarray | torch.Tensor | None) -> dict[str, torch.Tensor]:
    """{'face', 'mouth', 'background'}: `[B, 1, S, S]` bool masks of one frame per item.

    conditioning: the frame's `[B, 9, S, S]` (float in [0, 1] or uint8); mask: the renderer's
    `[B, 1, S, S]` (any dtype, > 0 is face); box: as in `mouth_mask`.
    """
    face = mask > 0
    return {"face": face, "mouth": mouth_mask(conditioning[:, 3:6], face, box),
            "background": ~face}


def pixel_weights(conditioning: torch.Tensor, mask: torch.Tensor,
                  box: np.ndarray | torch.Tensor | None, face_weight: float,
                  mouth_weight: float) -> torch.Tensor:
    """L1 weights `[B, 1, S, S]` float32: 1 + face_weight on the face, + mouth_weight on the
    mouth, normalised to a mean of 1 over the batch."""
    regions = region_masks(conditioning, mask, box)
    w = 1.0 + face_weight * regions["face"].float() + mouth_weight * regions["mouth"].float()
    return w / w.mean()
