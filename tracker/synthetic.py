"""Synthetic landmark sequences with known parameters (for tests and benchmarks).

A random identity moves smoothly in front of a pinhole camera: head rotation and translation
follow slow sinusoids, a few expressions rise and fall (jawOpen, a smile, brows, blinks),
the eyes look around; the face model's 478 landmarks are projected and noise is added.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from tracker.face_model import FaceModel, gaze_to_eyelook
from tracker.fitting import Camera, LandmarkModel, project
from tracker.landmarks import Landmarks
from tracker.rotation import axis_angle_to_matrix


@dataclass(frozen=True)
class SyntheticSequence:
    """T frames of ground truth (numpy) and their noisy landmarks.

    identity (100,); rotation (T, 3) axis-angle; translation (T, 3) cm; expression (T, 53);
    gaze (T, 2, 2); focal px; image_size (h, w); timestamps (T,) s; clean (T, 478, 2) and
    noisy (T, 478, 2) pixels.
    """

    identity: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    gaze: np.ndarray
    focal: float
    image_size: tuple[int, int]
    timestamps: np.ndarray
    clean: np.ndarray
    noisy: np.ndarray

    @property
    def frames(self) -> int:
        return int(self.rotation.shape[0])

    def landmarks(self, noisy: bool = True) -> list[Landmarks]:
        pts = self.noisy if noisy else self.clean
        return [Landmarks(p.astype(np.float32), 1.0, self.image_size) for p in pts]


def synthetic_sequence(model: FaceModel | LandmarkModel, frames: int = 60, seed: int = 0,
                       noise_px: float = 1.0, image_size: tuple[int, int] = (480, 640),
                       focal: float = 600.0, fps: float = 30.0, depth: float = 55.0,
                       motion: float = 1.0, identity_scale: float = 1.0) -> SyntheticSequence:
    """A smooth random sequence (see the module doc); `motion` scales the head's swing
    (1: yaw +-30, pitch +-15, roll +-10 degrees)."""
    lm = model if isinstance(model, LandmarkModel) else LandmarkModel(model)
    lm = lm.to("cpu", torch.float32)
    rng = np.random.default_rng(seed)
    t = np.arange(frames) / fps
    names = lm.expression_names
    identity = (rng.standard_normal(lm.identity.shape[0]) * identity_scale).astype(np.float32)

    def wave(amplitude: float, period: float) -> np.ndarray:
        phase = rng.uniform(0, 2 * math.pi)
        return amplitude * np.sin(2 * math.pi * t / period + phase)

    rot = np.stack([wave(math.radians(15) * motion, 3.1), wave(math.radians(30) * motion, 4.3),
                    wave(math.radians(10) * motion, 5.3)], 1)
    trans = np.stack([wave(3.0, 3.7), wave(2.0, 4.1), depth + wave(6.0, 5.9)], 1)
    expr = np.zeros((frames, len(names)), np.float32)

    def bump(name: str, period: float, height: float) -> None:
        expr[:, names.index(name)] = np.clip(height * (0.5 + 0.5 * np.sin(
            2 * math.pi * t / period + rng.uniform(0, 2 * math.pi))), 0.0, 1.0)

    bump("jawOpen", 1.3, 0.8)
    for side in ("_L", "_R"):
        bump("mouthSmile" + side, 2.9, 0.6)
        bump("browInnerUp" + side, 2.3, 0.5)
    blink = np.zeros(frames, np.float32)
    for start in range(int(fps * 0.7), frames, int(fps * 1.9)):
        blink[start:start + 4] = [0.5, 1.0, 1.0, 0.5][:len(blink[start:start + 4])]
    expr[:, names.index("eyeBlink_L")] = blink
    expr[:, names.index("eyeBlink_R")] = blink
    yaw = wave(0.3, 2.7)
    pitch = wave(0.2, 3.3)
    gaze = np.stack([np.stack([yaw + 0.02, pitch], 1), np.stack([yaw - 0.02, pitch], 1)], 1)
    gaze = gaze.astype(np.float32)
    expr[:, lm.eyelook.numpy()] = gaze_to_eyelook(gaze)
    with torch.no_grad():
        ident_t = torch.as_tensor(identity)[None].expand(frames, -1)
        pts = lm.points(ident_t, torch.as_tensor(expr), torch.as_tensor(gaze))
        rmat = axis_angle_to_matrix(torch.as_tensor(rot, dtype=torch.float32))
        h, w = image_size
        cam = Camera.make(focal, np.asarray([w / 2.0, h / 2.0], np.float32), frames, "cpu")
        clean = project(pts, rmat, torch.as_tensor(trans, dtype=torch.float32), cam).numpy()
    noisy = clean + rng.standard_normal(clean.shape).astype(np.float32) * noise_px
    return SyntheticSequence(identity, rot.astype(np.float32), trans.astype(np.float32), expr,
                             gaze, float(focal), (int(h), int(w)), t.astype(np.float32),
                             clean.astype(np.float32), noisy.astype(np.float32))
