"""The live engine: one loaded target driven by many sessions at once, stages overlapped.

What `dvp serve` runs (and what the benches time). Per session two loops on the threads of
its device slot (streamer.live.session: landmarks; fit + transfer; streamer.live.slots),
then two threads shared by all sessions:

    session A: [landmarks t+1] [fit, transfer t+1] --\\
    session B: [landmarks    ] [fit, transfer    ] ---+-> device thread: render, window,
    ...                                               |   generator, mark, yuv420p of all
                                                      |   sessions' newest frames at once,
                                                      |   download queued  --> output thread:
                                                      |   waits for the download, hands each
                                                      |   session its frame --> aiortc encodes
                                                      |   (its own executor threads)

So the CPU landmarks of frame t+1 run while the GPU works on frame t, and frame t-1 is
encoded beside both. Every hand-over holds at most one frame per session and the newest
replaces a waiting one (latest frame wins): latency cannot pile up, nothing queues without
bound (the output side holds at most `RING` batches; the device thread waits for a slab).

**Why one shared device stage.** Sessions are threads of one process, so they share one
interpreter lock: eight sessions at 30 fps each running render and generator themselves
would take the lock 240 times a second for those alone, and take `LoadedTarget.lock` in
turn. The device thread takes each session's newest frame, renders and generates them as
one batch (streamer.live.batch) and converts and downloads them together
(streamer.live.output): the GPU gets fewer, larger launches and the lock is taken once per
batch. No lock serialises sessions: each has its own fit graph, stream, window and slots,
and only the device thread touches the shared render and generator graphs. MediaPipe's
`process()` releases the interpreter lock while it works (measured, docs/engine.md), so
the sessions' landmark threads run side by side on the host's cores.

**Graphs.** Every CUDA graph (each session slot's warm fit, the render and the generator
per batch size) is captured when the engine is made, before any session runs; a capture
never overlaps other threads' CUDA work, which is what failed before ("operation not
permitted when stream is capturing").

**Streams.** Each session's fit runs on its slot's high-priority stream, the device stage
on the engine's device stream, the downloads on a copy stream: the fit of frame t+1 does
not queue behind frame t's generator.

**CPU.** The same code runs on the CPU: streams, events and pinned memory degrade to
no-ops (streamer.live.device), the render is the eager reference render, the generator
the `cpu` runtime; the overlap of landmarks, fit, device stage and encoding stays.

The serial reference is `streamer.live.pipeline.LivePipeline.process` (every stage one
after another, the eager render, the CPU colour conversion); tests compare the two.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from streamer.cli.config import Config
from streamer.live.batch import DeviceStage, StageChoice
from streamer.live.capacity import (
    PROBE_BATCH,
    estimate_max_sessions,
    process_sessions,
    time_fit,
)
from streamer.live.device import DeviceKit, Fence
from streamer.live.output import Download, HostRing, finish_frames, rgb_to_yuv420p
from streamer.live.pipeline import OutputFrame, SessionStages
from streamer.live.session import DeviceJob, EngineSession
from streamer.live.slots import SessionSlot, SlotPool
from tracker.errors import DvpError

log = logging.getLogger(__name__)

#: Batches whose download may be in flight at once (pinned host slabs).
RING = 2
#: Device stage times of each frame, beside the session's own (`OutputFrame.stage_ms`).
DEVICE_STAGES = ("queue", "render", "window", "generator", "output", "download")


@dataclass
class _Batch:
    """A batch between the device thread and the output thread."""

    jobs: list[DeviceJob]
    download: Download
    fences: list[Fence]  # before render, window, generator, output; after output
    groups: list[list[int]]  # the jobs of each downloaded part, in order


class LiveEngine:
    """A loaded target's live engine (module doc).

    target: a streamer.live.stages.LoadedTarget; max_sessions: sessions at once (None:
    estimated, streamer.live.capacity); stage_factory(target, config) -> SessionStages:
    one session's tracker and transfer (default streamer.live.stages.make_session_stages);
    graphs: capture CUDA graphs (CUDA only; off: every stage eager, for comparison);
    gpu_share: the fraction of the GPU this engine may fill when it estimates its sessions
    (1/K for each of K cluster workers sharing a GPU, streamer.cluster).
    """

    def __init__(self, target: Any, config: Config, max_sessions: int | None = None,
                 stage_factory: Callable[[Any, Config], SessionStages] | None = None,
                 graphs: bool = True, gpu_share: float = 1.0) -> None:
        if max_sessions is not None and max_sessions < 1:
            raise DvpError(f"max_sessions must be at least 1, got {max_sessions}")
        if not 0.0 < gpu_share <= 1.0:
            raise DvpError(f"gpu_share must lie in (0, 1], got {gpu_share}")
        self.gpu_share = gpu_share
        started = time.perf_counter()
        self.target = target
        self.config = config
        self.kit = DeviceKit(target.device)
        self.graphs = graphs and self.kit.cuda
        if self.kit.cuda:  # cuDNN picks its fastest kernels per batch size before capture
            torch.backends.cudnn.benchmark = True
        if stage_factory is None:
            from streamer.live.stages import make_session_stages

            stage_factory = make_session_stages
        self.stage_factory = stage_factory
        self.capacity_note = "given"
        if max_sessions is None:
            max_sessions, self.capacity_note = self._estimate()
        elif max_sessions > (held := process_sessions(config.streamer.fps)):
            log.warning("%d sessions in one process: one holds about %d at %g fps (its "
                        "sessions share one interpreter lock); for more, run "
                        "'dvp serve TDIR --ray local --workers-per-gpu K'", max_sessions, held,
                        config.streamer.fps)
        self.max_sessions = int(max_sessions)
        self.stage = DeviceStage(target, self.kit, self.max_sessions, self.graphs)
        self.slots = SlotPool(self.kit, self.max_sessions, target.face_model, config.tracker,
                              self.graphs)
        s = int(target.size)
        self.ring = HostRing(self.kit, RING, self.max_sessions * s * s * 3)
        self.device_stream = self.kit.stream()
        self.copy_stream = self.kit.stream()
        self._cond = threading.Condition()
        self._pending: dict[EngineSession, DeviceJob] = {}
        self._stopped = False
        self._idle = True
        self._last_take = 0.0
        self._interval_ms = 0.0
        self._out: queue.Queue[_Batch | None] = queue.Queue()
        self._threads = [
            threading.Thread(target=self._device_loop, name="dvp-engine-device", daemon=True),
            threading.Thread(target=self._output_loop, name="dvp-engine-output", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("live engine ready in %.1f s: %d session(s) (%s)",
                 time.perf_counter() - started, self.max_sessions, self.capacity_note)

    def _estimate(self) -> tuple[int, str]:
        """Sessions at once from the GPU time, memory and host cores (capacity module)."""
        if not self.kit.cuda:
            return estimate_max_sessions(None, 0.0, self.config.streamer.fps, 0.0,
                                         self.kit.device)
        before = torch.cuda.memory_reserved(self.kit.device)
        probe = DeviceStage(self.target, self.kit, PROBE_BATCH, self.graphs)
        items = sum(probe.generator_sizes) or 1
        activation = (torch.cuda.memory_reserved(self.kit.device) - before) / items
        slot = SessionSlot(self.kit, self.target.face_model, self.config.tracker, self.graphs)
        return estimate_max_sessions(probe, time_fit(slot), self.config.streamer.fps,
                                     activation, self.kit.device, self.gpu_share)

    # -- what runs --
    def choices(self, stages: SessionStages | None = None) -> dict[str, StageChoice]:
        """What each live stage runs and why not something faster; `stages` (one session's,
        e.g. the server's start-up probe) adds the landmark backend."""
        cuda = self.kit.cuda
        out: dict[str, StageChoice] = {}
        if stages is not None:
            detector = getattr(stages.tracker, "detector", None)
            backend = getattr(detector, "backend", type(stages.tracker).__name__)
            why = "CPU, in each session's landmarks thread (it releases the interpreter lock)" \
                if backend == "mediapipe" else "on the device"
            out["landmarks"] = StageChoice(str(backend), why)
        fit_graph = self.graphs and self.config.tracker.cuda_graphs
        out["fit"] = StageChoice(
            "CUDA graph per session, on the session's own stream" if fit_graph else "eager",
            "captured before any session" if fit_graph else
            "CPU device" if not cuda else "tracker.cuda_graphs is off" if self.graphs
            else "CUDA graphs are off")
        raster = str(getattr(self.target.conditioner, "backend", "?"))
        out["rasterizer"] = StageChoice(raster, "CuPy kernel" if raster == "cupy" else
                                        "CPU: the CuPy rasterizer needs CUDA" if not cuda else
                                        "CuPy absent: pip install 'live-dvp[gpu]'")
        out["render"] = self.stage.render_choice
        out["generator"] = self.stage.generator_choice
        out["output"] = StageChoice(
            "mark and yuv420p on the GPU, pinned asynchronous download" if cuda else
            "mark and yuv420p by torch on the CPU", "batched over sessions")
        out["sessions"] = StageChoice(str(self.max_sessions), self.capacity_note)
        return out

    def report(self, stages: SessionStages | None = None) -> None:
        """Say what each stage runs and why nothing faster does, once per process
        (tracker.choices: the `dvp` CLI shows these lines at its default level)."""
        from tracker.choices import report_choice

        for what, choice in self.choices(stages).items():
            report_choice(f"live {what}", choice.chosen, choice.why)

    # -- sessions --
    def open_session(self, on_output: Callable[[OutputFrame], None] | None = None,
                     name: str = "session", vmc: Any = None, output: str = "yuv420p",
                     stages: SessionStages | Callable[[], SessionStages] | None = None
                     ) -> EngineSession:
        """A new session (call `start()` on it). output: `yuv420p` (planes for a video
        encoder, `OutputFrame.yuv`) or `rgb` (`OutputFrame.image`); stages: the session's
        SessionStages or a factory (default: this engine's stage_factory, called in the
        session's fit thread)."""
        if self._stopped:
            raise DvpError("the live engine is closed")
        target = self.target
        factory = stages if stages is not None else (
            lambda: self.stage_factory(target, self.config))
        return EngineSession(self, factory, self.config, on_output, name, vmc, output,
                             getattr(target, "eyelook", None),
                             getattr(target, "eyelook_index", None))

    def offer(self, job: DeviceJob) -> None:
        """A session's newest frame for the device stage (replaces its waiting one)."""
        job.offered = time.perf_counter()
        with self._cond:
            if self._stopped or job.session.closed:
                job.session.release()
                return
            if self._pending.get(job.session) is not None:
                job.session.device_dropped += 1
                job.session.release()
            self._pending[job.session] = job
            self._cond.notify()

    def withdraw(self, session: EngineSession) -> None:
        """Forget a session's waiting frame (it is closing)."""
        with self._cond:
            if self._pending.pop(session, None) is not None:
                session.release()

    def device_interval_ms(self) -> float:
        """Moving average of the time between batches while the device stage was never
        short of frames (0 until it has been busy): what one batch costs it."""
        return self._interval_ms

    def device_eta(self) -> float:
        """`time.perf_counter()` at which the device thread is expected to take its next
        batch: now when it waits for frames, else after its usual interval."""
        if self._idle:
            return time.perf_counter()
        return self._last_take + self._interval_ms / 1e3

    # -- the device thread --
    def _take(self) -> list[DeviceJob] | None:
        """The waiting frames, oldest first, at most max_sessions (None: stopped)."""
        with self._cond:
            waited = not self._pending
            self._idle = waited
            while not self._pending and not self._stopped:
                self._cond.wait()
            self._idle = False
            if self._stopped:
                return None
            now = time.perf_counter()
            if not waited and self._last_take:  # busy since the last batch: its cost
                interval = (now - self._last_take) * 1e3
                self._interval_ms = interval if not self._interval_ms else \
                    0.8 * self._interval_ms + 0.2 * interval
            elif waited:
                self._interval_ms *= 0.8  # frames were short: the device keeps up
            self._last_take = now
            jobs = sorted(self._pending.values(), key=lambda j: j.offered)
            jobs = jobs[:self.max_sessions]
            for job in jobs:
                del self._pending[job.session]
                job.session.release()
            return jobs

    def _device_loop(self) -> None:
        self.kit.bind_thread()
        try:
            while True:
                jobs = self._take()
                if jobs is None:
                    break
                try:
                    self._out.put(self._run_batch(jobs))
                except Exception:  # one bad batch never ends the engine
                    log.exception("live engine: a batch of %d frame(s) failed", len(jobs))
                    for job in jobs:
                        job.session._stats.failed()
                del jobs  # nothing of a session outlives it while this thread waits
        finally:
            self._out.put(None)

    @torch.inference_mode()
    def _run_batch(self, jobs: list[DeviceJob]) -> _Batch:
        taken = time.perf_counter()
        for job in jobs:
            job.stage_ms["queue"] = (taken - job.offered) * 1e3
        kit, stage = self.kit, self.stage
        with kit.on(self.device_stream):
            fences = [kit.fence()]
            conds = stage.render([job.params for job in jobs])  # n x [9,S,S]
            fences.append(kit.fence())
            windows = [job.session.window.push(job.timestamp, cond)  # n x [9*N_w,S,S]
                       for job, cond in zip(jobs, conds)]
            fences.append(kit.fence())
            rgb = stage.generate(windows)  # n,S,S,3 uint8
            del windows, conds
            fences.append(kit.fence())
            for i, job in enumerate(jobs):  # the output as generated, before the mark
                monitor = getattr(job.session.stages, "monitor", None)
                if monitor is not None:  # once a second: a copy on the device
                    monitor.offer(rgb[i], job.params)
            finish_frames(kit, rgb, [job.stamp for job in jobs],
                          self.config.streamer.synthetic_mark)
            yuv = [i for i, job in enumerate(jobs) if job.session.output == "yuv420p"]
            plain = [i for i, job in enumerate(jobs) if job.session.output != "yuv420p"]
            parts, groups = [], []
            if len(yuv) == len(jobs):
                parts, groups = [rgb_to_yuv420p(rgb)], [yuv]
            elif not yuv:
                parts, groups = [rgb], [plain]
            else:
                parts = [rgb_to_yuv420p(torch.stack([rgb[i] for i in yuv])),
                         torch.stack([rgb[i] for i in plain])]
                groups = [yuv, plain]
            fences.append(kit.fence())
            # queued after the work above (its fence is recorded on the device stream)
            download = self.ring.download(parts, self.copy_stream)
        return _Batch(jobs, download, fences, groups)

    # -- the output thread --
    def _output_loop(self) -> None:
        self.kit.bind_thread()
        while True:
            batch = self._out.get()
            if batch is None:
                break
            try:
                self._finish(batch)
            except Exception:
                log.exception("live engine: delivering a batch failed")
            del batch  # nothing of a session outlives it while this thread waits

    def _finish(self, batch: _Batch) -> None:
        arrays = batch.download.wait()
        f = batch.fences
        device_ms = {"render": f[1].ms_since(f[0]), "window": f[2].ms_since(f[1]),
                     "generator": f[3].ms_since(f[2]), "output": f[4].ms_since(f[3]),
                     "download": batch.download.fence.ms_since(f[4])}
        frames: dict[int, np.ndarray] = {}
        for array, group in zip(arrays, batch.groups):
            for k, i in enumerate(group):
                frames[i] = array[k]
        n = len(batch.jobs)
        for i, job in enumerate(batch.jobs):
            job.stage_ms.update(device_ms)
            job.session._deliver(job, frames[i], n)

    def close(self) -> None:
        """Stop the engine's threads (close the sessions first). Idempotent."""
        with self._cond:
            self._stopped = True
            self._pending.clear()
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(30)
        self.slots.close()
