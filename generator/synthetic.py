"""A synthetic target with something to learn, for tests and benchmarks without a renderer.

A textured disk (the "face") moves, breathes and turns its light over a fixed background.
Its conditioning is what a renderer would give: colour (albedo x shading), a
correspondence image (position on the disk, normalised to [0, 1]^3) and a gaze map (a pupil
dot); the mask is the disk. The ground-truth frame is that disk as a camera would see it:
softer edges, a specular highlight, a dark "hair" crescent outside the disk and the
background, none of which the colour rendering shows, so a network has to learn them.
"""

from __future__ import annotations

import numpy as np

from generator.dataset import TrainingData
from generator.target import holdout_start_for

#: The disk's "mouth" in its correspondence units ((u + 1) / 2, (v + 1) / 2, z): the lower
#: middle of the disk (|u| < 0.45, 0.25 < v < 0.75).
MOUTH_BOX = np.array([[0.275, 0.625, 0.0], [0.725, 0.875, 1.0]], np.float32)


def synthetic_data(frames: int = 64, size: int = 64, fps: float = 30.0, n_w: int = 11,
                   seed: int = 0, dropped: tuple[int, ...] = ()) -> TrainingData:
    """A TrainingData of `frames` frames at `size` px (uint8 conditioning and frames).

    `dropped` frame numbers are skipped in time (their timestamps are missing, as when a
    camera drops frames), so timestamps are `k / fps` for the kept k. The last 10 % of the
    frames are held out.
    """
    rng = np.random.default_rng(seed)
    kept = np.array([k for k in range(frames + len(dropped)) if k not in set(dropped)])[:frames]
    t = kept / fps
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size  # pixel centres in [0, 1]
    background = np.stack([0.3 + 0.4 * xx, 0.25 + 0.3 * yy, 0.5 - 0.2 * xx * yy], -1)
    background += 0.01 * rng.standard_normal((size, size, 3))
    phase = rng.uniform(0, 2 * np.pi, 3)
    cond = np.zeros((frames, 9, size, size), np.uint8)
    truth = np.zeros((frames, size, size, 3), np.uint8)
    masks = np.zeros((frames, 1, size, size), np.uint8)
    for i, ti in enumerate(t):
        cx = 0.5 + 0.2 * np.sin(2 * np.pi * ti / 3.1 + phase[0])
        cy = 0.5 + 0.15 * np.sin(2 * np.pi * ti / 2.3 + phase[1])
        r = 0.22 + 0.03 * np.sin(2 * np.pi * ti / 1.7 + phase[2])
        u, v = (xx - cx) / r, (yy - cy) / r
        rho2 = u**2 + v**2
        inside = rho2 < 1.0
        z = np.sqrt(np.clip(1.0 - rho2, 0.0, 1.0))
        light = np.array([np.sin(ti), -0.4, 1.2 + 0.3 * np.cos(0.7 * ti)])
        light /= np.linalg.norm(light)
        shade = np.clip(u * light[0] + v * light[1] + z * light[2], 0.0, 1.0)
        albedo = np.stack([0.8 + 0.1 * np.sin(6 * u), 0.55 + 0.1 * np.cos(6 * v),
                           0.45 + 0.05 * u], -1)
        colour = albedo * (0.25 + 0.75 * shade)[..., None]
        gaze = np.exp(-((u - 0.35 * np.sin(1.3 * ti)) ** 2 + (v + 0.3) ** 2) / 0.01)
        channels = np.concatenate([colour.transpose(2, 0, 1), [(u + 1) / 2, (v + 1) / 2, z],
                                   [gaze, gaze, 1 - gaze]])
        cond[i] = _to_uint8(np.where(inside, channels, 0.0))
        masks[i, 0] = inside
        soft = np.clip((1.0 - np.sqrt(rho2)) * r * size / 1.5, 0.0, 1.0)[..., None]
        spec = 0.4 * np.clip(shade, 0, 1)[..., None] ** 20
        hair = ((rho2 > 1.0) & (rho2 < 1.6) & (v < -0.1))[..., None]
        face = np.clip(colour * 1.1 + spec, 0, 1) * (1 - 0.5 * gaze[..., None])
        scene = np.where(hair, 0.15 + 0.05 * np.sin(20 * u)[..., None], background)
        truth[i] = _to_uint8(soft * face + (1 - soft) * scene)
    return TrainingData(conditioning=cond, masks=masks, frames=truth,
                        timestamps=t.astype(np.float32), fps=fps,
                        holdout_start=holdout_start_for(frames), n_w=n_w, mouth_box=MOUTH_BOX)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, 0.0, 1.0) * 255).round().astype(np.uint8)
