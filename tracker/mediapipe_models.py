"""MediaPipe's face networks, read from the installed `mediapipe` package at run time and run
as torch modules (tracker/tflite_graph.py), plus CUDA-graph replay of them per batch size.

Nothing is copied into the repository: the files are those of the pinned mediapipe wheel
(`mediapipe/modules/face_detection/face_detection_short_range.tflite`, BlazeFace, 128x128
input in [-1, 1]; `mediapipe/modules/face_landmark/face_landmark_with_attention.tflite`, the
478-point mesh with lips, eyes and irises refined, 192x192 input in [0, 1]). The package is
located without importing it (importing mediapipe loads its whole C++ runtime).
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import torch

from tracker.errors import DvpError
from tracker.tflite_graph import TFLiteNet, fuse_depthwise, read_tflite

log = logging.getLogger(__name__)

DETECTOR_FILE = "modules/face_detection/face_detection_short_range.tflite"
LANDMARK_FILE = "modules/face_landmark/face_landmark_with_attention.tflite"
#: Input sizes of the two networks (square tensors).
DETECTOR_SIZE = 128
LANDMARK_SIZE = 192
#: CUDA graphs are captured for these batch sizes; a batch runs in the smallest that fits.
GRAPH_BATCHES = (1, 2, 4, 8, 16, 32, 64)


def model_path(relative: str) -> Path:
    """The path of a model file inside the installed mediapipe package; DvpError naming the
    package or the file when it is absent."""
    spec = importlib.util.find_spec("mediapipe")
    if spec is None or not spec.submodule_search_locations:
        raise DvpError("the torch landmark backend reads MediaPipe's model files from the "
                       "mediapipe package (mediapipe==0.10.21), which is not installed")
    root = Path(next(iter(spec.submodule_search_locations)))
    path = root / relative
    if not path.is_file():
        raise DvpError(f"the mediapipe package at {root} has no {relative} (the torch "
                       f"landmark backend needs mediapipe==0.10.21's face models)")
    return path


_NETS: dict[tuple[str, str, torch.dtype, bool, bool], TFLiteNet] = {}
_NETS_LOCK = threading.Lock()


def load_net(relative: str, device: torch.device, dtype: torch.dtype = torch.float32,
             channels_last: bool = False, fuse: bool = False) -> TFLiteNet:
    """The network of `relative` (a path under mediapipe/) as an eval-mode TFLiteNet on
    `device` in `dtype` (`fuse`: depthwise convolutions merged into the 1x1 ones after
    them, tflite_graph.fuse_depthwise); parsed once per process and shared (read-only) by
    every caller."""
    key = (relative, str(device), dtype, channels_last, fuse)
    with _NETS_LOCK:
        net = _NETS.get(key)
        if net is None:
            path = model_path(relative)
            graph = read_tflite(path)
            net = TFLiteNet(fuse_depthwise(graph) if fuse else graph, name=path.name).eval()
            net = net.to(device=device, dtype=dtype)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
            log.debug("loaded %s on %s (%s)", path.name, device, dtype)
            _NETS[key] = net
    return net


def bucket(n: int) -> int:
    """The batch size a CUDA graph is captured for: the next power of two from n."""
    return 1 << max(0, int(n) - 1).bit_length()


class GraphRunner:
    """Runs `fn(*inputs) -> tensor` (one output, first axis the batch), on CUDA by
    replaying a CUDA graph captured per `key` (the caller's bucketed shapes).

    `runner(key, inputs, rows)`: each input is copied into the leading rows of its static
    buffer (sized from `shapes(key)`; the rows past the input keep earlier, valid values),
    the graph replays and the first `rows` rows of the output come back as a fresh tensor.
    mode: "graph" (CUDA graphs; on a CPU device this falls back to "eager"), "static" (the
    same static buffers, fn called on them each time: the padding without a capture, for
    checking it on any device) or "eager" (fn on the inputs as given). compile: fn through
    torch.compile (inductor) first, falling back to fn itself if that fails. A capture that
    fails is logged and the runner goes on eagerly. Not thread-safe: one runner per thread.
    """

    def __init__(self, fn, device: torch.device, mode: str,  # type: ignore[no-untyped-def]
                 shapes, name: str = "stage", compile: bool = False) -> None:
        if mode not in ("graph", "static", "eager"):
            raise ValueError(f"GraphRunner mode must be graph, static or eager, got '{mode}'")
        self.plain = fn
        if compile:  # inductor: fused kernels; one compile per key (shape), before capture
            fn = _Compiled(fn, name)
        self.fn, self.device, self.name = fn, device, name
        self.shapes = shapes  # key -> [(shape, dtype)] of the static inputs
        self.mode = "eager" if mode == "graph" and device.type != "cuda" else mode
        self._captured: dict[tuple, tuple[torch.cuda.CUDAGraph | None, list[torch.Tensor],
                                          torch.Tensor | None]] = {}
        self._pool: Any = None
        self._side: torch.cuda.Stream | None = None

    @torch.no_grad()
    def __call__(self, key: tuple, inputs: list[torch.Tensor], rows: int) -> torch.Tensor:
        if self.mode == "eager":
            return self.fn(*inputs)[:rows]
        entry = self._captured.get(key)
        if entry is None:
            try:
                entry = self._capture(key)
            except RuntimeError as err:  # a capture the device refuses: run eagerly
                log.warning("%s: CUDA graph capture failed (%s); running without CUDA "
                            "graphs", self.name, err)
                self.mode = "eager"
                self._captured.clear()
                self._pool = None
                return self.fn(*inputs)[:rows]
        graph, static_in, static_out = entry
        for buf, x in zip(static_in, inputs):
            buf[:x.shape[0]].copy_(x)
        if graph is None:
            return self.fn(*static_in)[:rows].clone()
        graph.replay()
        assert static_out is not None
        return static_out[:rows].clone()

    def release(self) -> None:
        """Drop the captured graphs and their buffers (they are captured again if needed)."""
        self._captured.clear()
        self._pool = None

    def _capture_stream(self, current: torch.cuda.Stream) -> torch.cuda.Stream:
        """The stream to warm up and capture on: the caller's own when it is not the default
        stream (the live engine's per-slot landmark stream), else one side stream per runner,
        made once. Never a new stream per capture: cuBLAS keeps a workspace (32 MiB on
        Hopper) per stream it ran on, for the life of the process."""
        if current != torch.cuda.default_stream(self.device):
            return current
        if self._side is None:
            self._side = torch.cuda.Stream(self.device)
        return self._side

    def _capture(self, key: tuple) -> tuple[torch.cuda.CUDAGraph | None, list[torch.Tensor],
                                            torch.Tensor | None]:
        static_in = [torch.zeros(shape, dtype=dtype, device=self.device)
                     for shape, dtype in self.shapes(key)]
        if self.mode == "static":
            self._captured[key] = (None, static_in, None)
            return self._captured[key]
        current = torch.cuda.current_stream(self.device)
        stream = self._capture_stream(current)
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.fn(*static_in)
        current.wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads (other sessions' streams) may use CUDA meanwhile; on a
        # stream of this runner's (torch's default capture stream is shared by all threads)
        with torch.cuda.graph(graph, pool=self._pool, stream=stream,
                              capture_error_mode="thread_local"):
            static_out = self.fn(*static_in)
        self._captured[key] = (graph, static_in, static_out)
        log.debug("captured a CUDA graph of %s for %s", self.name, key)
        return self._captured[key]


class _Compiled:
    """`torch.compile(fn, fullgraph=True)`, falling back to `fn` (logged once) when the
    compile or a compiled call fails."""

    def __init__(self, fn, name: str) -> None:  # type: ignore[no-untyped-def]
        self.fn, self.name = fn, name
        self.compiled = torch.compile(fn, fullgraph=True, dynamic=False)
        self.failed = False

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run uncompiled
                log.warning("%s: torch.compile failed (%s: %s); running uncompiled", self.name,
                            type(err).__name__, err)
                self.failed = True
        return self.fn(*args)
