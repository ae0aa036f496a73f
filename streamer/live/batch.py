"""The live engine's shared device stage: render, window and generator of a batch of
frames from any sessions at once.

One `DeviceStage` per engine, driven by the engine's one device thread: the frames that
sessions have ready (at most one per session, the newest) go through together, so eight
sessions at 30 fps cost the GPU 30 batches a second of a few frames each, not 240 single
frames, and the interpreter lock is taken once per batch, not once per frame.

- **render**: on CUDA with the CuPy rasterizer, the target's conditioning replayed from a
  CUDA graph (`renderer.conditioning.GraphedRenderer`) per batch size; the target's
  identity and camera are baked in (every session drives the same target), the per-frame
  parameters are uploaded in one packed copy. Elsewhere (the CPU, no CuPy, a frame whose
  identity or camera is not the target's) the eager reference render of each frame,
  `LoadedTarget.render`, what the serial reference runs.
- **window**: each session's own `renderer.conditioning.LiveWindow` takes its frame.
- **generator**: the windows stacked `[B, 99, S, S]` through the target's runtime (the
  `torch` runtime replays a CUDA graph per batch size).

Graphs exist for a few batch sizes (`bucket_sizes`: powers of two up to the engine's
largest batch, and that size); a batch is padded up to the next one (its padding rows
repeat the last frame and are dropped). Every graph is captured here, when the engine is
made, before any session runs: a capture while other threads launch CUDA work fails
("operation not permitted when stream is capturing"), so none happens later.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamer.live.device import DeviceKit
from tracker.params import FaceParams

log = logging.getLogger(__name__)

#: Largest batch x S x S the graphed render's dense path takes (renderer.conditioning).
_RENDER_PIXELS = 1 << 20


def bucket_sizes(max_batch: int) -> list[int]:
    """The batch sizes that get graphs: 1, 2, 4, ... below `max_batch`, and `max_batch`."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def bucket_of(n: int, sizes: list[int]) -> int:
    """The smallest of `sizes` (ascending) that holds `n` frames."""
    for b in sizes:
        if b >= n:
            return b
    raise ValueError(f"a batch of {n} frames exceeds the largest graphed batch {sizes[-1]}")


@dataclass(frozen=True)
class StageChoice:
    """What a stage runs and why (not something faster)."""

    chosen: str
    why: str


class DeviceStage:
    """Render, window and generator of batches of frames (see the module doc).

    target: a streamer.live.stages.LoadedTarget (its conditioner, runtime, params);
    max_batch: the most frames of one batch (the engine's session count); graphs: capture
    CUDA graphs (CUDA only)."""

    def __init__(self, target: Any, kit: DeviceKit, max_batch: int, graphs: bool = True
                 ) -> None:
        from renderer.conditioning import Camera

        self.target = target
        self.kit = kit
        self.size = int(target.size)
        self.max_batch = int(max_batch)
        self.runtime = target.runtime
        self.identity = np.asarray(target.params.identity, np.float32)
        self.camera = Camera.of(target.params)
        self.graphs = graphs and kit.cuda
        self.renderers: dict[int, Any] = {}
        self.render_sizes: list[int] = []
        self.generator_sizes: list[int] = []
        self.render_choice = self._make_render_graphs()
        self.generator_choice = self._make_generator_graphs()

    # -- set-up --------------------------------------------------------------------------
    def _make_render_graphs(self) -> StageChoice:
        conditioner = self.target.conditioner
        backend = getattr(conditioner, "backend", None)
        if not self.kit.cuda:
            return StageChoice("eager render, frame by frame", "CPU: no CUDA graphs")
        if not self.graphs:
            return StageChoice("eager render, frame by frame", "CUDA graphs are off")
        if backend != "cupy":
            return StageChoice("eager render, frame by frame",
                               f"rasterizer '{backend}': the graphed render needs the CuPy "
                               "rasterizer (pip install 'live-dvp[gpu]')")
        from renderer.conditioning import GraphedRenderer

        largest = max(1, min(self.max_batch, _RENDER_PIXELS // (self.size * self.size)))
        self.render_sizes = bucket_sizes(largest)
        try:
            for b in self.render_sizes:
                self.renderers[b] = GraphedRenderer(conditioner, self.identity, self.camera,
                                                    batch=b)
        except Exception as err:  # noqa: BLE001 - said once, the eager render still works
            self.renderers.clear()
            self.render_sizes = []
            return StageChoice("eager render, frame by frame",
                               f"the render's CUDA graph could not be captured: {err}")
        return StageChoice(f"CUDA graph per batch of {self.render_sizes}",
                           "CuPy rasterizer, graphs captured before any session")

    def _make_generator_graphs(self) -> StageChoice:
        backend = str(getattr(self.runtime, "backend", "unknown"))
        if backend != "torch":
            return StageChoice(f"'{backend}' runtime, batched", "no per-batch graphs")
        self.generator_sizes = bucket_sizes(self.max_batch)
        s, channels = self.size, 9 * int(self.target.n_w)
        started = time.perf_counter()
        for b in self.generator_sizes:  # the runtime captures a graph per new batch size
            self.runtime(torch.zeros((b, channels, s, s), device=self.runtime.device))
        self.kit.synchronize()
        log.info("generator graphs for batches %s captured in %.1f s", self.generator_sizes,
                 time.perf_counter() - started)
        return StageChoice(f"'torch' runtime (fp16), CUDA graph per batch of "
                           f"{self.generator_sizes}", "graphs captured before any session")

    # -- per batch -----------------------------------------------------------------------
    def _graphable(self, params: FaceParams) -> bool:
        from renderer.conditioning import Camera

        return bool(self.renderers) and Camera.of(params) == self.camera and \
            np.array_equal(np.asarray(params.identity, np.float32), self.identity)

    def render(self, frames: list[FaceParams]) -> list[torch.Tensor]:
        """The conditioning `[9, S, S]` float32 on the device of each of n one-frame
        FaceParams (each its own tensor: a session's window keeps it)."""
        if not all(self._graphable(p) for p in frames):
            return [self.target.render(p) for p in frames]
        out: list[torch.Tensor] = []
        largest = self.render_sizes[-1]
        n_expr = frames[0].expression.shape[1]
        for start in range(0, len(frames), largest):
            chunk = frames[start:start + largest]
            b = bucket_of(len(chunk), self.render_sizes)
            packed = np.stack([_pack(p) for p in chunk + [chunk[-1]] * (b - len(chunk))])
            x = self.kit.upload(packed)  # b,90
            cond = self.renderers[b](*torch.split(x, [n_expr, 3, 3, 27, 4], dim=1))
            # the graph's output is overwritten by its next replay: copy each frame out
            out.extend(cond.frames[i].clone() for i in range(len(chunk)))
        return out

    def generate(self, windows: list[torch.Tensor]) -> torch.Tensor:
        """Frames `[n, S, S, 3]` uint8 on the runtime's device of n windows
        `[9*N_w, S, S]`."""
        n = len(windows)
        b = bucket_of(n, self.generator_sizes) if self.generator_sizes else n
        batch = torch.stack(windows + [windows[-1]] * (b - n))
        batch = batch.to(self.runtime.device, torch.float32)
        return self.runtime(batch)[:n]


def _pack(p: FaceParams) -> np.ndarray:
    """One frame's render inputs in one row: expression, rotation, translation, sh, gaze."""
    return np.concatenate([p.expression[0], p.rotation[0], p.translation[0],
                           p.sh[0].reshape(-1), p.gaze[0].reshape(-1)]).astype(np.float32)
