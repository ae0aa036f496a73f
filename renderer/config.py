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
