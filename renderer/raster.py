"""One entry point to the rasterizers: `rasterize(..., backend)`.

Backends: 'reference' (plain torch on the input's device, `raster_ref`; on CUDA it is the
benchmark's plain-torch baseline), 'cupy' (the CUDA kernel, `raster_cupy`), 'auto' (CuPy
for CUDA tensors when CuPy is installed, else the reference; the choice and the reason are
reported once through tracker.choices). A backend that was asked for and cannot run fails
with a message naming it, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from renderer.raster_ref import NEAR, Raster, RasterError, rasterize_reference
from tracker.choices import report_choice

BACKENDS = ("auto", "cupy", "reference")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend ('cupy' or 'reference') for `backend` on `device`."""
    from renderer.raster_cupy import cupy_available

    if backend == "torch":
        backend = "reference"
    if backend not in BACKENDS:
        raise RasterError(f"unknown rasterizer '{backend}': use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        chosen, why = _auto(device, cupy_available)
        report_choice("rasterizer", chosen, why)
        return chosen
    if backend == "cupy":
        if device.type != "cuda":
            raise RasterError(f"the 'cupy' rasterizer needs a CUDA device, got {device}")
        if not cupy_available():
            raise RasterError("the 'cupy' rasterizer needs CuPy with a CUDA device: "
                              "pip install 'live-dvp[gpu]'")
    return backend


def _auto(device: torch.device, cupy_available: Callable[[], bool]) -> tuple[str, str]:
    """('cupy' or 'reference', why) for `auto` on `device`."""
    if device.type != "cuda":
        return "reference", f"plain torch on {device}; the CuPy kernel needs a CUDA device"
    if cupy_available():
        return "cupy", "the CUDA kernel"
    if importlib.util.find_spec("cupy") is None:
        return "reference", ("plain torch, slower: CuPy absent, install it for the CUDA "
                             "kernel: pip install 'live-dvp[gpu]' (CUDA 12) or "
                             "'live-dvp[gpu-cuda13]'")
    return "reference", ("plain torch, slower: CuPy is installed but cannot use the GPU "
                         "(python -c 'import cupy; cupy.cuda.runtime.getDeviceCount()' "
                         "says why)")


def rasterize(screen: torch.Tensor, triangles: torch.Tensor, height: int, width: int,
              cull_back: bool = True, near: float = NEAR, backend: str = "auto",
              trusted_triangles: bool = False) -> Raster:
    """Rasterize `[B, V, 3]` screen vertices (u px, v px, z cm); see `raster_ref`."""
    name = resolve_backend(backend, screen.device)
    if name == "cupy":
        from renderer.raster_cupy import rasterize_cupy

        return rasterize_cupy(screen, triangles, height, width, cull_back, near,
                              trusted_triangles=trusted_triangles)
    return rasterize_reference(screen, triangles, height, width, cull_back, near,
                               trusted_triangles=trusted_triangles)
