"""Per-session device state of the live engine, made before any session runs.

A `SessionSlot` is what one session needs on the device of its own: high-priority streams
for its landmarks and its fit (small work on the critical path, so it is not queued behind
another session's batch) and, on CUDA, its warm fit captured as a CUDA graph
(`tracker.graphs.GraphedWarmFit`, over a `LandmarkFitter` of its own). The engine makes
`max_sessions` of them when it starts, while nothing else runs on the GPU, and lends one to
each session for its lifetime (`SlotPool`); so no graph is ever captured while other
sessions run, and sessions share no buffer, stream or graph on the hot path.
"""

from __future__ import annotations

import logging
import queue
import time
from typing import Any

from streamer.live.device import DeviceKit
from tracker.errors import DvpError

log = logging.getLogger(__name__)


class SlotError(DvpError):
    """No session slot is free (the engine runs as many sessions as it was made for)."""


class SessionSlot:
    """One session's fit stream and fit graph (None on the CPU or with graphs off), and the
    stream its landmarks run on (its landmark networks' CUDA graphs are captured there:
    the same streams serve every session the slot is lent to, so nothing keyed by stream,
    such as cuBLAS's workspaces, grows as sessions come and go)."""

    def __init__(self, kit: DeviceKit, face_model: Any, tracker_config: Any,
                 graphs: bool) -> None:
        self.stream = kit.stream(high_priority=True)
        self.landmark_stream = kit.stream(high_priority=True)
        self.fit_graph: Any = None
        if graphs and kit.cuda and tracker_config.cuda_graphs:
            from tracker.fitting import LandmarkFitter
            from tracker.graphs import GraphedWarmFit

            fitter = LandmarkFitter(face_model, tracker_config, kit.device)
            with kit.on(self.stream):
                self.fit_graph = GraphedWarmFit(fitter, 1, tracker_config.iterations_warm)


class SlotPool:
    """`count` slots made now; `acquire()` lends one (SlotError when none is free),
    `release(slot)` takes it back."""

    def __init__(self, kit: DeviceKit, count: int, face_model: Any, tracker_config: Any,
                 graphs: bool) -> None:
        started = time.perf_counter()
        self.count = count
        self._free: queue.SimpleQueue[SessionSlot] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(SessionSlot(kit, face_model, tracker_config, graphs))
        kit.synchronize()
        log.info("%d session slot(s) made in %.1f s", count, time.perf_counter() - started)

    def acquire(self) -> SessionSlot:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            raise SlotError(f"all {self.count} session slots are in use") from None

    def release(self, slot: SessionSlot) -> None:
        self._free.put(slot)
