"""Synthetic face parameters of an actor in motion, shared by the tests of the transfer."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tracker.face_model import EYELOOK_NAMES, gaze_to_eyelook
from tracker.params import FaceParams


def moving(names: list[str], frames: int, seed: int, yaw_deg: float, shift_cm: float,
           jaw: float, fps: float = 25.0) -> FaceParams:
    """An actor swinging its head over +-yaw_deg and sideways over +-shift_cm at 60 cm,
    opening the jaw up to `jaw`, eyes moving a little."""
    rng = np.random.default_rng(seed)
    phase = np.linspace(0, 4 * np.pi, frames)
    p = FaceParams.empty(frames, names, (256, 256), 300.0,
                         timestamps=np.arange(frames, dtype=np.float32) / fps)
    rot = np.zeros((frames, 3), np.float32)
    rot[:, 1] = np.radians(yaw_deg) * np.sin(phase)
    rot[:, 0] = 0.02 * rng.standard_normal(frames)
    trans = np.tile(np.asarray([0.0, 0.0, 60.0], np.float32), (frames, 1))
    trans[:, 0] = shift_cm * np.sin(phase)
    expr = np.zeros((frames, len(names)), np.float32)
    expr[:, names.index("jawOpen")] = jaw * (0.5 + 0.5 * np.sin(3 * phase))
    gaze = (0.05 * np.sin(phase)[:, None, None] * np.ones((1, 2, 2))).astype(np.float32)
    expr[:, [names.index(n) for n in EYELOOK_NAMES]] = gaze_to_eyelook(gaze)
    return replace(p, rotation=rot, translation=trans, expression=expr, gaze=gaze,
                   valid=np.ones(frames, bool))
