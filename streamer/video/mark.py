"""The visible "synthetic" mark and the metadata tag of reenactment output (DESIGN.md,
"Responsible use").

Every frame that `streamer` sends or writes as reenactment output carries, by default, the
word SYNTHETIC in white capitals on a dark box in its bottom-left corner (a built-in 5 x 7
pixel font, scaled by 1 px per 200 px of the frame's shorter side, at least 1); only the
config switch `streamer.synthetic_mark: false` turns it off. Files get container tags
saying the same (`SYNTHETIC_METADATA`).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

TEXT = "SYNTHETIC"
#: Container tags of written reenactment files (`comment` is shown by most players).
SYNTHETIC_METADATA = {
    "comment": "synthetic: reenacted video made by live-dvp (Deep Video Portraits); "
               "the person shown did not perform these motions",
    "synthetic": "true",
}
_GLYPHS = {
    "S": ("01111", "10000", "10000", "01110", "00001", "00001", "11110"),
    "Y": ("10001", "10001", "01010", "00100", "00100", "00100", "00100"),
    "N": ("10001", "11001", "10101", "10011", "10001", "10001", "10001"),
    "T": ("11111", "00100", "00100", "00100", "00100", "00100", "00100"),
    "H": ("10001", "10001", "10001", "11111", "10001", "10001", "10001"),
    "E": ("11111", "10000", "10000", "11110", "10000", "10000", "11111"),
    "I": ("01110", "00100", "00100", "00100", "00100", "00100", "01110"),
    "C": ("01111", "10000", "10000", "10000", "10000", "10000", "01111"),
}
_GLYPH_W, _GLYPH_H = 5, 7
#: Darkening of the box behind the text (the box shows the frame at this fraction).
_BOX_KEEP = 0.35


def _text_bitmap() -> np.ndarray:
    """The text at scale 1 with 1 px spacing: `(7, 9*6-1)` bool."""
    cols = []
    for i, ch in enumerate(TEXT):
        glyph = np.array([[c == "1" for c in row] for row in _GLYPHS[ch]], bool)
        if i:
            cols.append(np.zeros((_GLYPH_H, 1), bool))
        cols.append(glyph)
    return np.concatenate(cols, axis=1)


def mark_scale(height: int, width: int) -> int:
    """Pixels per font pixel for a frame of this size."""
    return max(1, min(height, width) // 200)


@functools.lru_cache(maxsize=32)
def mark_layout(height: int, width: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """Where the mark goes in an `height x width` frame: the box's (rows, cols) slices and
    the text mask inside the box (bool, the box's shape). The box is clipped to the frame."""
    scale = mark_scale(height, width)
    text = np.kron(_text_bitmap(), np.ones((scale, scale), bool))
    pad = 2 * scale
    box = np.zeros((text.shape[0] + 2 * pad, text.shape[1] + 2 * pad), bool)
    box[pad:pad + text.shape[0], pad:pad + text.shape[1]] = text
    margin = scale
    bh, bw = min(box.shape[0], height - margin), min(box.shape[1], width - margin)
    bh, bw = max(bh, 0), max(bw, 0)
    rows = slice(height - margin - bh, height - margin)
    cols = slice(margin, margin + bw)
    mask = box[:bh, :bw]
    mask.setflags(write=False)
    return (rows, cols), mask


def draw_synthetic_mark(frame: np.ndarray) -> np.ndarray:
    """Draw the mark into `frame` (`(H, W, 3)` uint8 RGB, modified in place) and return it."""
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 frame, got {frame.shape} {frame.dtype}")
    mark_frames(torch.from_numpy(frame))  # shares the array's memory
    return frame


def mark_frames(frames: torch.Tensor) -> torch.Tensor:
    """Draw the mark into each of `frames` (`[..., H, W, 3]` uint8 RGB on any device,
    modified in place: the live engine marks whole batches on the GPU); returns them.

    The one implementation of the mark: the box keeps `_BOX_KEEP` of the frame
    (integer arithmetic, `(x * 89) >> 8`), the text is white."""
    if frames.ndim < 3 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        raise ValueError(f"expected [..., H, W, 3] uint8 frames, got {list(frames.shape)} "
                         f"{frames.dtype}")
    (rows, cols), mask = mark_layout(int(frames.shape[-3]), int(frames.shape[-2]))
    text = _mask_tensor(mask, frames.device)  # bh,bw,1
    region = frames[..., rows, cols, :]
    dark = ((region.to(torch.int32) * int(_BOX_KEEP * 256)) >> 8).to(torch.uint8)
    frames[..., rows, cols, :] = torch.where(text, torch.full_like(dark, 255), dark)
    return frames


_MASKS: dict[tuple[int, int, str], torch.Tensor] = {}


def _mask_tensor(mask: np.ndarray, device: torch.device) -> torch.Tensor:
    """`mask` as a `[h, w, 1]` bool tensor on `device` (cached: made once per size)."""
    key = (mask.shape[0], mask.shape[1], str(device))
    cached = _MASKS.get(key)
    if cached is None:
        cached = torch.from_numpy(np.array(mask, dtype=bool)).to(device)[..., None]
        _MASKS[key] = cached
    return cached


def has_synthetic_mark(frame: np.ndarray, contrast: float = 60.0) -> bool:
    """True when `frame` shows the mark where `draw_synthetic_mark` puts it: the text's
    pixels brighter than the box's other pixels by `contrast` grey levels on average
    (tolerant of lossy video coding)."""
    (rows, cols), mask = mark_layout(frame.shape[0], frame.shape[1])
    region = frame[rows, cols].astype(np.float32).mean(axis=2)
    if not mask.any() or mask.all():
        return False
    return float(region[mask].mean() - region[~mask].mean()) >= contrast
