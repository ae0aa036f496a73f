"""CUDA-graph replay of the warm per-frame fit: one launch instead of hundreds.

A warm-started frame runs a few hundred small kernels (`LandmarkFitter.fit` with a fixed
number of iterations, then `fit_gaze`); launched one by one from Python, their launch cost
dominates on a GPU. `GraphedWarmFit` captures them once for a batch size and iteration
count into a CUDA graph over static buffers and replays it per frame (the fit's
batched path has no host synchronisation, so it can be captured). CUDA only.
"""

from __future__ import annotations

import torch

from tracker.errors import DvpError
from tracker.fitting import Camera, FitInfo, FitState, LandmarkFitter


class GraphError(DvpError):
    """A CUDA graph that cannot be made here (no CUDA device)."""


class GraphedWarmFit:
    """fit + fit_gaze of B frames, captured in a CUDA graph.

    `graphed(observed [B, 478, 2], previous: FitState, identity [100], camera) ->
    (FitState, FitInfo)` returns what `fitter.fit(observed, previous, identity, camera,
    iterations, previous=previous)` followed by `fit_gaze` (held by previous.gaze) and
    `with_gaze` return, as fresh tensors.
    """

    def __init__(self, fitter: LandmarkFitter, batch: int, iterations: int,
                 warmup: int = 3) -> None:
        if fitter.device.type != "cuda":
            raise GraphError(f"CUDA graphs need a CUDA device, the fitter is on {fitter.device}")
        dev, dt = fitter.device, fitter.dtype
        self.fitter = fitter
        self.batch = batch
        self.iterations = iterations
        n_exp = len(fitter.lm.expression_names)
        self._obs = torch.zeros(batch, 478, 2, device=dev, dtype=dt)
        self._obs[:, :, 0] = torch.linspace(100.0, 200.0, 478, device=dev)
        self._obs[:, :, 1] = torch.linspace(100.0, 200.0, 478, device=dev).flip(0)
        self._prev = FitState.neutral(batch, 50.0, dev, dt)
        self._prev.expression = torch.zeros(batch, n_exp, device=dev, dtype=dt)
        self._ident = torch.zeros(fitter.lm.identity.shape[0], device=dev, dtype=dt)
        self._cam = Camera(torch.full((batch,), 500.0, device=dev, dtype=dt),
                           torch.full((batch, 2), 150.0, device=dev, dtype=dt))
        stream = torch.cuda.Stream(dev)
        stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # allocations, caches (rotation generators), cuBLAS/cuSOLVER
                self._run()
        torch.cuda.current_stream(dev).wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self._out = self._run()

    def _run(self) -> tuple[FitState, FitInfo]:
        f = self.fitter
        state, info = f.fit(self._obs, self._prev, self._ident, self._cam, self.iterations,
                            previous=self._prev)
        state.gaze = f.fit_gaze(self._obs, state, self._ident, self._cam,
                                previous=self._prev.gaze)
        return f.with_gaze(state), info

    def __call__(self, observed: torch.Tensor, previous: FitState, identity: torch.Tensor,
                 camera: Camera) -> tuple[FitState, FitInfo]:
        self._obs.copy_(observed[:, :478])
        self._prev.rotation.copy_(previous.rotation)
        self._prev.translation.copy_(previous.translation)
        self._prev.expression.copy_(previous.expression)
        self._prev.gaze.copy_(previous.gaze)
        self._ident.copy_(identity.reshape(-1))
        self._cam.focal.copy_(camera.focal)
        self._cam.principal.copy_(camera.principal)
        self.graph.replay()
        state, info = self._out
        return (FitState(state.rotation.clone(), state.translation.clone(),
                         state.expression.clone(), state.gaze.clone()),
                FitInfo(info.iterations, info.cost.clone(), info.residual_px.clone(),
                        info.residual.clone()))
