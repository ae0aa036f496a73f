"""Per-session device state of the live engine, made before any session runs.

A `SessionSlot` is what one session needs on the device of its own: high-priority streams
for its landmarks and its fit (small work on the critical path, so it is not queued behind
another session's batch) and, on CUDA, its warm fit captured as a CUDA graph
(`tracker.graphs.GraphedWarmFit`, over a `LandmarkFitter` of its own). The engine makes
`max_sessions` of them when it starts, while nothing else runs on the GPU, and lends one to
each session for its lifetime (`SlotPool`); so no graph is ever captured while other
sessions run, and sessions share no buffer, stream or graph on the hot path.

A slot also owns the two threads its sessions run on (`dvp-slot<k>-landmarks`,
`dvp-slot<k>-fit`: one-thread executors, each session's loop a task on them). Threads that
outlive sessions keep the pairs of a thread's cuBLAS handle and a slot stream fixed: cuBLAS
keeps a 32 MiB workspace per (handle, stream) for the life of the process, and a new thread
per session took whichever handle the pool gave it, so new pairs (and workspaces) turned up
as sessions came and went (130 MiB after 20 sessions on an H200).
"""

from __future__ import annotations

import logging
import queue
import time
from concurrent.futures import ThreadPoolExecutor
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
                 graphs: bool, index: int = 0) -> None:
        self.stream = kit.stream(high_priority=True)
        self.landmark_stream = kit.stream(high_priority=True)
        #: the threads of the slot's sessions (see the module doc), started now
        self.landmark_thread = ThreadPoolExecutor(1, f"dvp-slot{index}-landmarks")
        self.fit_thread = ThreadPoolExecutor(1, f"dvp-slot{index}-fit")
        for thread in (self.landmark_thread, self.fit_thread):
            thread.submit(kit.bind_thread).result()
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
        self._all = [SessionSlot(kit, face_model, tracker_config, graphs, k)
                     for k in range(count)]
        for slot in self._all:
            self._free.put(slot)
        kit.synchronize()
        log.info("%d session slot(s) made in %.1f s", count, time.perf_counter() - started)

    def acquire(self) -> SessionSlot:
        try:
            return self._free.get_nowait()
        except queue.Empty:
            raise SlotError(f"all {self.count} session slots are in use") from None

    def release(self, slot: SessionSlot) -> None:
        self._free.put(slot)

    def close(self) -> None:
        """End the slots' threads (after their sessions have ended)."""
        for slot in self._all:
            slot.landmark_thread.shutdown(wait=False)
            slot.fit_thread.shutdown(wait=False)
