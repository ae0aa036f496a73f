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

import torch
from torch import nn

from tracker.errors import DvpError
from tracker.tflite_graph import TFLiteNet, read_tflite

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
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / relative
    if not path.is_file():
        raise DvpError(f"the mediapipe package at {root} has no {relative} (the torch "
                       f"landmark backend needs mediapipe==0.10.21's face models)")
    return path


_NETS: dict[tuple[str, str, torch.dtype, bool], nn.Module] = {}
_NETS_LOCK = threading.Lock()


def load_net(relative: str, device: torch.device, dtype: torch.dtype = torch.float32,
             channels_last: bool = False) -> nn.Module:
    """The network of `relative` (a path under mediapipe/) as an eval-mode TFLiteNet on
    `device` in `dtype`; parsed once per process and shared (read-only) by every caller."""
    key = (relative, str(device), dtype, channels_last)
    with _NETS_LOCK:
        net = _NETS.get(key)
        if net is None:
            path = model_path(relative)
            net = TFLiteNet(read_tflite(path), name=path.name).eval()
            net = net.to(device=device, dtype=dtype)
            if channels_last:
                net = net.to(memory_format=torch.channels_last)
            log.debug("loaded %s on %s (%s)", path.name, device, dtype)
            _NETS[key] = net
    return net


class NetRunner:
    """Runs a TFLiteNet on batches `(B, 3, S, S)` float32 -> the net's outputs as float32.

    On CUDA with `graphs=True` each batch size runs by replaying a CUDA graph captured for
    the smallest size in GRAPH_BATCHES that fits (larger batches go in chunks of the largest);
    elsewhere the net runs eagerly. Outputs are fresh tensors (safe to keep). Not
    thread-safe: one runner per thread.
    """

    def __init__(self, net: nn.Module, device: torch.device, dtype: torch.dtype,
                 size: int, graphs: bool = True, channels_last: bool = False) -> None:
        self.net, self.device, self.dtype, self.size = net, device, dtype, size
        self.channels_last = channels_last
        self.graphs = graphs and device.type == "cuda"
        self._captured: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                        list[torch.Tensor]]] = {}
        self._pool = None

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not self.graphs:
            return [y.float() for y in self.net(self._prepare(x))]
        top = GRAPH_BATCHES[-1]
        if x.shape[0] > top:
            parts = [self(x[i:i + top]) for i in range(0, x.shape[0], top)]
            return [torch.cat(p) for p in zip(*parts)]
        b = x.shape[0]
        bucket = next(s for s in GRAPH_BATCHES if s >= b)
        graph, static_in, static_out = self._captured.get(bucket) or self._capture(bucket)
        static_in[:b].copy_(x)
        graph.replay()
        return [y[:b].to(torch.float32, copy=True) for y in static_out]

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor,
                                            list[torch.Tensor]]:
        static_in = self._prepare(torch.zeros(batch, 3, self.size, self.size,
                                              device=self.device))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.net(static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_out = self.net(static_in)
        self._captured[batch] = (graph, static_in, static_out)
        log.debug("captured a CUDA graph of %s at batch %d", getattr(self.net, "name", "net"),
                  batch)
        return self._captured[batch]
