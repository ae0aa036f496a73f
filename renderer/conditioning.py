"""Conditioning images and the space-time window (DESIGN.md, "Conditioning").

The window is the last N_w frames sampled at the target's fps by timestamp: for each instant
t - k/fps (k = N_w-1 .. 0) the nearest frame at or before it, so dropped frames do not
stretch the window; before the first frame the earliest frame repeats. It is frame-major,
oldest first, each frame [colour, correspondence, gaze]: `[9*N_w, S, S]`.
"""

from __future__ import annotations

import numpy as np
import torch

#: Slack when comparing an instant with a timestamp, in frame periods: timestamps stored as
#: float32 (about 60 us resolution after ten minutes) still land on their own frame.
_SLACK_PERIODS = 0.01


def window_indices(timestamps: np.ndarray, t_index: int, fps: float, n_w: int = 11) -> np.ndarray:
    """Frame indices `(n_w,)` int64 of the window ending at frame `t_index`, oldest first.

    timestamps: `(T,)` seconds, non-decreasing. Entry k (k = 0 .. n_w-1) is the last frame
    whose timestamp is at or before `timestamps[t_index] - (n_w-1-k)/fps` (never after
    `t_index`); an instant before the first frame gives frame 0.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    if not 0 <= t_index < len(ts):
        raise IndexError(f"frame index {t_index} outside 0..{len(ts) - 1}")
    period = 1.0 / fps
    instants = ts[t_index] - np.arange(n_w - 1, -1, -1) * period + _SLACK_PERIODS * period
    idx = np.searchsorted(ts[: t_index + 1], instants, side="right") - 1
    return np.clip(idx, 0, t_index).astype(np.int64)


def stack_window(per_frame: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
    """Stack `per_frame[indices]` (`[T, 9, S, S]`) frame-major into `[9*n_w, S, S]`.

    The dtype and device of `per_frame` are kept (the contract's window is float32 in [0, 1]).
    """
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=per_frame.device)
    frames = per_frame.index_select(0, idx)  # n_w,9,S,S
    return frames.reshape(-1, *per_frame.shape[2:])
