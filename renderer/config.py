"""Settings of the renderer stage (section `renderer` of the YAML config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RendererConfig:
    """Renderer settings; every field can be set with `--set renderer.NAME=VALUE`."""

    #: Square output size S of the conditioning images, pixels (256 or 512).
    resolution: int = 256
    #: Frames in the space-time window N_w.
    window: int = 11
    #: Rasterizer backend: 'auto' (CuPy on CUDA, else reference), 'cupy', 'reference'.
    rasterizer: str = "auto"
    #: Albedo texture size (pixels, square) of the photometric fit.
    albedo_size: int = 256
    #: Iterations of the photometric (albedo and lighting) fit.
    photometric_steps: int = 200
    #: Analysis-by-synthesis refinement of the tracking (renderer/refine.py) in `dvp track`
    #: and `dvp prepare`: a dense colour term over the face on top of the landmarks.
    #: false (the default: on synthetic video it moved no error by more than 0.1 deg, and it
    #: has not yet been shown to help the picture on real footage, bench/refine_target.py),
    #: true, or null (auto: on with a CUDA device, off on the CPU, where it runs at about a
    #: frame per second).
    refine: bool | None = False
    #: Side (pixels) of the face crop the refinement renders and compares.
    refine_size: int = 128
    #: Keyframes and Adam steps of its first stage (identity, focal length, albedo, light).
    refine_keyframes: int = 16
    refine_keyframe_steps: int = 100
    #: Levenberg-Marquardt iterations per frame of its second stage (pose, expression).
    refine_iterations: int = 3
    #: Weight of the colour term against the landmarks (1: as much as 468 landmarks at
    #: their noise), and the colour residual (0-1 units) above which a pixel's weight falls
    #: (Cauchy), so that occluders weigh little.
    refine_photometric_weight: float = 1.0
    #: Factor on the landmark term in the refinement (0: colour alone, from the landmark
    #: fit's start).
    refine_landmark_weight: float = 1.0
    refine_colour_sigma: float = 0.06
    #: Frames refined at once (memory: about 40 MB per frame at refine_size 128 on CUDA).
    refine_batch: int = 32
