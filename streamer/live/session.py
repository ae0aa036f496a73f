"""One session of the live engine: its source frames in, its reenacted frames out.

A session runs two loops, each on a thread of its device slot (`streamer.live.slots`:
`dvp-slot<k>-landmarks`, `dvp-slot<k>-fit`), and hands the rest to the engine's shared
stages:

1. **landmarks**: the newest source frame (a latest-frame-wins
   slot: a frame arriving while one waits replaces it, counted as dropped), converted to
   RGB, its echoed id read (`streamer.echo_stamp`), its landmarks found (MediaPipe on the
   CPU, which releases the interpreter lock while it works, see docs/engine.md; or the
   torch backend on the session slot's landmark stream). The source
   frame is let go here.
2. **fit**: the newest landmarks (latest wins again) fitted on the
   session's own stream (replaying the fit graph of its `SessionSlot`), transferred onto
   the target, eased when the face is lost; the parameters go to the VMC feed and, as a
   `DeviceJob`, to the engine's device stage (latest wins there too).

So the landmarks of frame t+1 are found while frame t is fitted and frame t-1 rendered and
generated; at most one frame of a session waits at each hand-over, none queues. The
engine's output thread calls `_deliver` with each finished frame; `on_output` gets the
`OutputFrame` there.

The public methods are those of `LivePipeline` (the serial reference), so the server drives
either: `start`, `wait_ready`, `submit`, `set_controls`, `set_neutral`, `stats`,
`latency_estimate`, `close`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import wait as wait_for
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from renderer.conditioning import LiveWindow
from streamer.cli.config import Config
from streamer.live.controls import Controls
from streamer.live.output import FORMATS
from streamer.live.pipeline import (
    FaceLossEasing,
    LatestSlot,
    OutputFrame,
    SessionStages,
    SessionStats,
    to_rgb,
)
from streamer.live.slots import SlotError
from streamer.video.stamp import read_stamp
from tracker.params import FaceParams

if TYPE_CHECKING:
    from streamer.live.engine import LiveEngine
    from streamer.live.slots import SessionSlot

log = logging.getLogger(__name__)

#: The session's own stages before the device stage (their sum paces the landmarks).
_UPSTREAM = ("convert", "landmarks", "fit", "transfer")


@dataclass
class DeviceJob:
    """One frame of one session on its way through the engine's device stage.

    params: the target's FaceParams of the frame (one frame); timestamp: source seconds;
    received: `time.monotonic()` at submit; offered: `time.perf_counter()` when it was
    handed to the device stage; stage_ms: the session's stage times so far."""

    session: EngineSession
    index: int
    timestamp: float
    received: float
    params: FaceParams
    face: bool
    mode: str
    stamp: int | None
    stage_ms: dict[str, float] = field(default_factory=dict)
    offered: float = 0.0


class EngineSession:
    """One session's threads and state (module doc). Made by `LiveEngine.open_session`."""

    def __init__(self, engine: LiveEngine, stages: SessionStages | Callable[[], SessionStages],
                 config: Config, on_output: Callable[[OutputFrame], None] | None,
                 name: str, vmc: Any, output: str, eyelook: Any, eyelook_index: Any) -> None:
        if output not in FORMATS:
            raise ValueError(f"unknown output format '{output}': use one of "
                             f"{', '.join(FORMATS)}")
        self.engine = engine
        self.config = config
        self.name = name
        self.on_output = on_output
        self.vmc = vmc
        self.output = output
        self._stage_factory = stages if callable(stages) else None
        self.stages: SessionStages | None = None if callable(stages) else stages
        self.controls = Controls()
        self.window = LiveWindow(engine.target.fps, engine.target.n_w)
        self.easing = FaceLossEasing(config.streamer.ease_seconds, eyelook, eyelook_index)
        self.setup_error: BaseException | None = None
        self.slot: SessionSlot | None = None
        self._frames = LatestSlot()  # source frames -> landmarks thread
        self._observed = LatestSlot()  # landmarks -> fit thread
        self._stats = SessionStats()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._neutral_requested = False
        self._loops: list[Future[None]] = []  # the two loops, on the slot's threads
        self.device_dropped = 0  # jobs replaced while waiting for the device stage
        self._gate = threading.Condition()
        self._inflight = 0  # frames between the landmarks thread and the device stage
        self._upstream_ms = 0.0  # moving average: convert + landmarks + fit + transfer
        self.closed = False

    # -- control (any thread) --
    def set_controls(self, controls: Controls) -> None:
        """Replace the mode and edits (takes effect on the next frame)."""
        self.controls = controls

    def set_neutral(self) -> None:
        """Calibrate the source's neutral from its next frames (the page's "set neutral")."""
        self._neutral_requested = True

    def start(self) -> None:
        """Take a device slot and start the session's two loops on its threads (the fit
        loop makes the stages first: MediaPipe's graph is never built on the asyncio loop).
        With no slot free, the session fails its setup (`setup_error`)."""
        if self._loops or self._ready.is_set():
            return
        try:
            self.slot = self.engine.slots.acquire()
        except SlotError as err:  # reported like any setup failure
            log.error("%s: could not set up the session: %s", self.name, err)
            self.setup_error = err
            self._ready.set()
            return
        self._loops = [self.slot.fit_thread.submit(self._run_fit),
                       self.slot.landmark_thread.submit(self._run_landmarks)]
        for loop in self._loops:
            loop.add_done_callback(self._loop_ended)

    def _loop_ended(self, loop: Future[None]) -> None:
        err = None if loop.cancelled() else loop.exception()
        if err is not None:
            log.error("%s: a session loop failed", self.name, exc_info=err)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the stages are made (or failed: see `setup_error`); False on timeout."""
        return self._ready.wait(timeout)

    def submit(self, image: Any, timestamp: float) -> None:
        """Hand a source frame (numpy RGB or av.VideoFrame) over; never blocks. A frame still
        waiting from before is dropped (latest frame wins)."""
        self._stats.submitted += 1
        self._frames.put((image, float(timestamp), time.monotonic(), self._stats.submitted - 1))

    @property
    def dropped(self) -> int:
        """Frames dropped at any hand-over (source, landmarks, device stage)."""
        return self._frames.dropped + self._observed.dropped + self.device_dropped

    def wait_input_taken(self, timeout: float | None = None) -> bool:
        """Wait until no submitted source frame waits for the landmarks thread (a feeder
        that wants no frame dropped submits after this); False on timeout."""
        return self._frames.wait_taken(timeout)

    @property
    def alive(self) -> bool:
        return any(not loop.done() for loop in self._loops)

    def stats(self) -> dict[str, Any]:
        """Running figures (as `LivePipeline.stats`, with the stages' re-tracking monitor)."""
        return self._stats.figures(self.dropped, self.controls.mode,
                                   getattr(self.stages, "monitor", None))

    def latency_estimate(self) -> float:
        """Median submit-to-output time of recent frames, seconds (0 before any frame)."""
        return self._stats.latency_estimate()

    # -- frames in flight: at most `_depth()` between the landmarks and the device stage --
    def _depth(self) -> int:
        """Frames of this session allowed between the start of their landmarks and the
        device stage: two while the device stage keeps up with the session (the landmarks
        of t+1 run while t is fitted), one while it is the slower (a second frame would
        only be replaced there: its landmarks and fit wasted)."""
        return 1 if self.engine.device_interval_ms() > self._upstream_ms else 2

    def _admit(self) -> bool:
        """Wait (landmarks thread) until a new frame may start, then until just in time:
        when the device stage is busy, the frame starts so that its landmarks, fit and
        transfer end as the device stage takes its next batch. False: stopping or waited
        long enough to look again."""
        with self._gate:
            if not self._gate.wait_for(
                    lambda: self._inflight < self._depth() or self._stop.is_set(), 0.5):
                return False
        if self._stop.is_set():
            return False
        wait = self.engine.device_eta() - time.perf_counter() - self._upstream_ms / 1e3
        if wait > 0:
            self._stop.wait(min(wait, 0.5))
        return not self._stop.is_set()

    def _hold(self) -> None:
        with self._gate:
            self._inflight += 1

    def release(self) -> None:
        """One of this session's frames left the way to the device stage (taken by the
        device thread, replaced, failed or withdrawn)."""
        with self._gate:
            self._inflight = max(0, self._inflight - 1)
            self._gate.notify_all()

    # -- the threads --
    def _setup(self) -> bool:
        assert self.slot is not None  # taken by start()
        try:
            if self.stages is None:
                assert self._stage_factory is not None
                self.stages = self._stage_factory()
            use_graph = getattr(self.stages.tracker, "use_fit_graph", None)
            if self.slot.fit_graph is not None and use_graph is not None:
                use_graph(self.slot.fit_graph)
            return True
        except BaseException as err:  # report and stop: the session cannot run
            log.exception("%s: could not set up the session", self.name)
            self.setup_error = err
            return False
        finally:
            self._ready.set()

    def _run_landmarks(self) -> None:
        self._ready.wait()
        if self.setup_error is not None:
            return
        assert self.stages is not None and self.slot is not None
        tracker = self.stages.tracker
        echo = self.config.streamer.echo_stamp
        kit = self.engine.kit
        kit.bind_thread()
        while not self._stop.is_set():
            if not self._admit():
                continue
            item = self._frames.get(timeout=0.5)
            if item is None:
                continue
            self._hold()
            image, timestamp, received, index = item
            del item
            try:
                ms: dict[str, float] = {}
                tick = time.perf_counter()
                rgb = to_rgb(image)
                del image  # no source frame is kept
                stamp = read_stamp(rgb) if echo else None
                tock = time.perf_counter()
                ms["convert"] = (tock - tick) * 1e3
                with kit.on(self.slot.landmark_stream):
                    landmarks = tracker.landmarks(rgb)
                ms["landmarks"] = (time.perf_counter() - tock) * 1e3
                del rgb
            except Exception:  # one bad frame never ends the stream
                self._stats.failed()
                self.release()
                log.exception("%s: landmarks of frame %d failed", self.name, index)
                continue
            if self._observed.put((landmarks, timestamp, received, index, stamp, ms)):
                self.release()  # it replaced a waiting one

    def _run_fit(self) -> None:
        if not self._setup():
            return
        assert self.stages is not None and self.slot is not None
        self.engine.kit.bind_thread()
        try:
            while not self._stop.is_set():
                item = self._observed.get(timeout=0.5)
                if item is None:
                    continue
                try:
                    job = self._fit(*item)
                except Exception:  # one bad frame never ends the stream
                    self._stats.failed()
                    self.release()
                    log.exception("%s: fit of frame %d failed", self.name, item[3])
                    continue
                upstream = sum(job.stage_ms.get(k, 0.0) for k in _UPSTREAM)
                self._upstream_ms = upstream if not self._upstream_ms else \
                    0.8 * self._upstream_ms + 0.2 * upstream
                self.engine.offer(job)
        finally:
            self.engine.withdraw(self)

    def _fit(self, landmarks: Any, timestamp: float, received: float, index: int,
             stamp: int | None, ms: dict[str, float]) -> DeviceJob:
        assert self.stages is not None and self.slot is not None
        if self._neutral_requested:
            self._neutral_requested = False
            self.stages.retarget.set_neutral()
        with self.engine.kit.on(self.slot.stream):
            source = self.stages.tracker.fit(landmarks, timestamp, ms)
        tick = time.perf_counter()
        controls = self.controls
        params = self.stages.transfer(source, controls, self.easing, timestamp)
        ms["transfer"] = (time.perf_counter() - tick) * 1e3
        if self.vmc is not None:
            self.stages.send_vmc(self.vmc, params, source is not None, self.name)
        return DeviceJob(self, index, timestamp, received, params, source is not None,
                         controls.mode, stamp, ms)

    # -- from the engine's output thread --
    def _deliver(self, job: DeviceJob, frame: np.ndarray, batch: int) -> None:
        if self.closed:
            return
        rgb = frame if self.output == "rgb" else None
        yuv = frame if self.output == "yuv420p" else None
        out = OutputFrame(image=rgb, index=job.index, timestamp=job.timestamp,
                          received=job.received, done=time.monotonic(), face=job.face,
                          params=job.params, stage_ms=job.stage_ms, dropped=self.dropped,
                          mode=job.mode, stamp=job.stamp, yuv=yuv, batch=batch)
        self._stats.record(out)
        if self.on_output is not None:
            try:
                self.on_output(out)
            except Exception:
                log.exception("%s: the output callback failed", self.name)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the threads, wait for them, release the stages and the slot. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        with self._gate:
            self._gate.notify_all()
        self._frames.close()
        self._observed.close()
        _, running = wait_for(self._loops, timeout)
        if running:
            log.warning("%s: %d of its loops did not stop within %.0f s", self.name,
                        len(running), timeout)
        self.engine.withdraw(self)
        if self.alive:  # a thread still runs: it keeps its stages and slot
            return
        if self.stages is not None:
            self.stages.close()
            self.stages = None
        if self.slot is not None:
            self.engine.slots.release(self.slot)
            self.slot = None
        if self.vmc is not None:
            self.vmc.close()
            self.vmc = None
