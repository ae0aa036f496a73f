"""The serial reference of one session: source frame -> reenacted target frame, every
stage one after another; and what the live engine shares with it.

`dvp serve` runs the live engine (streamer.live.engine: stages overlapped in threads,
batched over sessions, CUDA graphs, the output made on the GPU); `LivePipeline.process` is
the reference it is tested and benchmarked against: the eager render, the generator's
output downloaded and marked on the CPU, no overlap. Shared by both: the stage protocols
(`FaceTracker`, `Retargeter`, `SessionStages`), `OutputFrame`, `LatestSlot`, the face-loss
easing, `SessionStats` (and its `p50_p95` summary of times) and the `params` message.

Per frame (DESIGN.md, "Drive it"): landmarks and fit of the source face (the session's
`FaceTracker`), transfer onto the target relative to both actors' neutrals (the session's
`Retargeter`, which keeps the source's neutral calibration), conditioning images of the
target (`LoadedTarget.render`), the space-time window of the last N_w frames sampled at the
target's fps by timestamp (`renderer.conditioning.LiveWindow`), the generator (`LoadedTarget.generate`), and the
visible "synthetic" mark.

`LivePipeline` runs that in its own worker thread fed by a latest-frame-wins slot: `submit`
never blocks and never queues, so a frame that arrives while the worker is busy replaces the
one waiting (it is dropped and counted), and latency cannot pile up. The asyncio loop only
calls `submit`, `set_controls` and `set_neutral`. Finished frames go to `on_output` (called
in the worker thread). Source frames are never kept: the worker drops each one as soon as the
tracker has seen it.

A source frame without a face keeps the stream going: the output holds the last transferred
pose and eases back to the target's neutral over `streamer.ease_seconds` (smoothstep); when
the face returns it blends back to the tracked pose over a quarter of that.

Per-stage times (milliseconds) of every frame come with it (`OutputFrame.stage_ms`) and as
running figures in `stats()`: `convert`, `landmarks`, `fit`, `transfer`, `render`,
`window`, `generator`, `output`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import torch

from renderer.conditioning import LiveWindow
from streamer.cli.config import Config
from streamer.live.controls import Controls
from streamer.video.convert import frame_to_rgb
from streamer.video.mark import draw_synthetic_mark
from streamer.video.stamp import read_stamp, write_stamp
from tracker.params import FaceParams
from tracker.rotation import slerp

log = logging.getLogger(__name__)

STAGES = ("convert", "landmarks", "fit", "transfer", "render", "window", "generator", "output")
#: Frames of history for the latency percentiles in `stats()`.
_HISTORY = 300


# ---- the stages a pipeline is made of ------------------------------------------------------
class FaceTracker(Protocol):
    """One session's source tracking (stateful: the landmark track, the live fit), in two
    halves that the live engine runs in two threads (landmarks of frame t+1 while frame t
    is fitted):

    - `landmarks(rgb)`: the CPU half; rgb `(H, W, 3)` uint8 -> the frame's landmarks
      (whatever `fit` takes; tracker.landmarks.Landmarks for the real stage);
    - `fit(landmarks, timestamp, stage_ms)`: the device half -> the source's FaceParams of
      one frame, or None when no face was found; records its time as `fit` in `stage_ms`;
    - `tracker(rgb, timestamp, stage_ms)`: both, recording `landmarks` and `fit` times.
    """

    def landmarks(self, rgb: np.ndarray) -> Any: ...

    def fit(self, landmarks: Any, timestamp: float,
            stage_ms: dict[str, float]) -> FaceParams | None: ...

    def __call__(self, rgb: np.ndarray, timestamp: float,
                 stage_ms: dict[str, float]) -> FaceParams | None: ...

    def close(self) -> None: ...


class Retargeter(Protocol):
    """One session's transfer onto the target (keeps the source's neutral calibration).

    `retarget(source, controls)`: the source's FaceParams of one frame -> the target's
    FaceParams of one frame (target identity, lighting and camera). `rest(controls)`: the
    target at its neutral (what a lost face eases to). `set_neutral()`: take the source's
    next frames as its neutral.
    """

    def __call__(self, source: FaceParams, controls: Controls) -> FaceParams: ...

    def rest(self, controls: Controls) -> FaceParams: ...

    def set_neutral(self) -> None: ...


class Target(Protocol):
    """What a pipeline needs of a loaded target (streamer.live.stages.LoadedTarget)."""

    size: int
    n_w: int
    fps: float
    expression_names: list[str]
    lock: threading.Lock

    def render(self, params: FaceParams) -> torch.Tensor: ...

    def generate(self, window: torch.Tensor) -> np.ndarray: ...

    def colour_image(self, conditioning: torch.Tensor) -> np.ndarray: ...


@dataclass
class SessionStages:
    """The per-session stages of a pipeline (made in its worker thread). monitor: optional
    re-tracking of generated frames at a low rate (streamer.jobs.retrack.RetrackMonitor:
    `offer(image, params)`, `summary()`, `close()`), reported as `retrack` in the stats."""

    tracker: FaceTracker
    retarget: Retargeter
    monitor: Any = None

    def close(self) -> None:
        self.tracker.close()
        if self.monitor is not None:
            self.monitor.close()

    def transfer(self, source: FaceParams | None, controls: Controls, easing: FaceLossEasing,
                 timestamp: float) -> FaceParams:
        """The transfer stage of one frame: the tracked `source` (None: no face) moved onto
        the target with `controls`, through the face-loss `easing` at `timestamp` (s)."""
        tracked = self.retarget(source, controls) if source is not None else None
        return easing(tracked, self.retarget.rest(controls), timestamp)

    def send_vmc(self, vmc: Any, params: FaceParams, face: bool, name: str) -> None:
        """Send one frame's target `params` to a VMC feed (streamer.vmc), the rest pose
        without edits beside; a failure is logged as session `name`'s, never raised."""
        try:
            vmc.send_params(params, self.retarget.rest(Controls()), face)
        except Exception:
            log.exception("%s: VMC send failed", name)


# ---- frames in and out ---------------------------------------------------------------------
@dataclass(frozen=True)
class OutputFrame:
    """One reenacted frame and what made it.

    image `(S, S, 3)` uint8 RGB (marked unless `streamer.synthetic_mark` is off), or None
    when the frame was made as `yuv`: `(S*3/2, S)` uint8 yuv420p planes (Y, then U and V,
    PyAV's yuv420p ndarray layout; streamer.live.output), what the live engine gives a
    video encoder; index: the source frame's number in this session; timestamp: the source
    frame's, seconds; received / done: `time.monotonic()` when the source frame was
    submitted and when this frame was finished; face: whether the source frame had a face;
    params: the target's FaceParams of this frame (one frame); stage_ms: milliseconds per
    stage; dropped: source frames dropped so far; stamp: the frame id echoed from the
    source (`streamer.echo_stamp`), else None; conditioning: the colour conditioning image
    `(S, S, 3)` uint8 when asked for; batch: frames of all sessions the device stage made
    together with this one.
    """

    image: np.ndarray | None
    index: int
    timestamp: float
    received: float
    done: float
    face: bool
    params: FaceParams
    stage_ms: dict[str, float]
    dropped: int
    mode: str
    stamp: int | None = None
    conditioning: np.ndarray | None = None
    yuv: np.ndarray | None = None
    batch: int = 1

    @property
    def latency_ms(self) -> float:
        """Time from submission to output, milliseconds."""
        return (self.done - self.received) * 1000.0


class LatestSlot:
    """A one-item queue where `put` replaces what is waiting (latest frame wins)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False
        self.dropped = 0

    def put(self, item: Any) -> bool:
        """Offer `item`; returns True when it replaced (dropped) a waiting one."""
        with self._cond:
            replaced = self._item is not None
            if replaced:
                self.dropped += 1
            self._item = item
            self._cond.notify()
            return replaced

    def get(self, timeout: float | None = None) -> Any:
        """The waiting item (removing it), or None on timeout or once closed."""
        with self._cond:
            if self._item is None and not self._closed:
                self._cond.wait(timeout)
            item, self._item = self._item, None
            if item is not None:
                self._cond.notify_all()  # for `wait_taken`
            return item

    def wait_taken(self, timeout: float | None = None) -> bool:
        """Wait until no item waits (taken, or closed); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: self._item is None or self._closed, timeout)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()


# ---- easing a lost face back to neutral ----------------------------------------------------
def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


def blend_params(a: FaceParams, b: FaceParams, weight: float,
                 eyelook: Callable[[np.ndarray], np.ndarray] | None = None,
                 eyelook_index: np.ndarray | None = None) -> FaceParams:
    """Frame-wise blend of two one-frame FaceParams: `weight` 0 gives `a`, 1 gives `b`.

    Expression, gaze, translation and lighting are interpolated linearly, rotation along the
    shortest arc (slerp); identity and camera are `b`'s. With `eyelook` (gaze -> the eight
    eyeLook coefficients) and their indices, the eyeLook coefficients are recomputed from the
    blended gaze (DESIGN.md: they always follow gaze).
    """
    w = float(weight)
    expr = (1 - w) * a.expression + w * b.expression
    gaze = (1 - w) * a.gaze + w * b.gaze
    if eyelook is not None and eyelook_index is not None:
        expr = expr.copy()
        expr[:, eyelook_index] = eyelook(gaze)
    return replace(
        b,
        expression=expr.astype(np.float32),
        rotation=slerp(a.rotation[0], b.rotation[0], w)[None],
        translation=((1 - w) * a.translation + w * b.translation).astype(np.float32),
        sh=((1 - w) * a.sh + w * b.sh).astype(np.float32),
        gaze=gaze.astype(np.float32),
        valid=b.valid.copy(),
        timestamps=b.timestamps.copy(),
    )


class FaceLossEasing:
    """Holds the last pose when the face is lost and eases it to the rest pose; blends back
    in when the face returns. All times are source timestamps (seconds)."""

    def __init__(self, ease_seconds: float, eyelook: Callable[[np.ndarray], np.ndarray] | None,
                 eyelook_index: np.ndarray | None) -> None:
        self.ease = max(1e-3, float(ease_seconds))
        self.back = self.ease / 4.0
        self._eyelook, self._eyelook_index = eyelook, eyelook_index
        self._last: FaceParams | None = None  # the last output
        self._from: FaceParams | None = None  # where the current blend started
        self._since: float | None = None
        self._lost = True

    def __call__(self, tracked: FaceParams | None, rest: FaceParams, t: float) -> FaceParams:
        """The output parameters for a frame at time `t`: `tracked` (None: no face)."""
        lost = tracked is None
        if lost != self._lost:  # the face was just lost or just came back
            self._from, self._since, self._lost = self._last, t, lost
        goal = rest if lost else tracked
        assert goal is not None
        if self._from is None or self._since is None:
            out = goal
        else:
            span = self.ease if lost else self.back
            w = _smoothstep((t - self._since) / span)
            out = goal if w >= 1.0 else blend_params(self._from, goal, w, self._eyelook,
                                                     self._eyelook_index)
            if w >= 1.0 and not lost:
                self._from = None
        self._last = out
        return out


# ---- the pipeline --------------------------------------------------------------------------
def to_rgb(image: Any) -> np.ndarray:
    """A source frame as `(H, W, 3)` uint8 RGB: numpy passes, a PyAV VideoFrame converts."""
    if isinstance(image, np.ndarray):
        return image
    return frame_to_rgb(image)


def p50_p95(ms: Any) -> dict[str, float | None]:
    """{"p50", "p95"} of a sequence of times in ms (linear interpolation, rounded to 0.01
    ms); both None when it is empty. The one summary every live figure of times uses."""
    a = np.asarray(ms, np.float64)
    if not a.size:
        return {"p50": None, "p95": None}
    return {"p50": round(float(np.percentile(a, 50)), 2),
            "p95": round(float(np.percentile(a, 95)), 2)}


class SessionStats:
    """Running figures of one session (thread-safe): frames in, out, dropped, failed; output
    fps over the last two seconds; latency p50/p95 (ms, submit to output) and per-stage ms
    (moving averages, factor 0.1) of the last `_HISTORY` frames."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted = 0
        self.processed = 0
        self.errors = 0
        self._stage_ema: dict[str, float] = {}
        self._latency: deque[float] = deque(maxlen=_HISTORY)
        self._done_times: deque[float] = deque(maxlen=_HISTORY)
        self._last_face = False

    def record(self, out: OutputFrame) -> None:
        """Count one finished frame."""
        with self._lock:
            self.processed += 1
            for key, value in out.stage_ms.items():
                old = self._stage_ema.get(key)
                self._stage_ema[key] = value if old is None else 0.9 * old + 0.1 * value
            self._latency.append(out.latency_ms)
            self._done_times.append(out.done)
            self._last_face = out.face

    def failed(self) -> None:
        with self._lock:
            self.errors += 1

    def figures(self, dropped: int, mode: str, monitor: Any = None) -> dict[str, Any]:
        """`LivePipeline.stats()`'s dict; with a re-tracking `monitor` (SessionStages'),
        its `summary()` as `retrack`."""
        with self._lock:
            latency = list(self._latency)
            done = list(self._done_times)
            stages = {k: round(v, 2) for k, v in self._stage_ema.items()}
            face, processed, errors = self._last_face, self.processed, self.errors
        now = time.monotonic()
        recent = [t for t in done if now - t <= 2.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 and \
            recent[-1] > recent[0] else 0.0
        out = {
            "submitted": self.submitted,
            "processed": processed,
            "dropped": dropped,
            "errors": errors,
            "fps": round(fps, 2),
            "latency_ms": p50_p95(latency),
            "stage_ms": stages,
            "face": face,
            "mode": mode,
        }
        if monitor is not None:
            out["retrack"] = monitor.summary()
        return out

    def latency_estimate(self) -> float:
        """Median submit-to-output time of the last 30 frames, seconds (0 before any)."""
        with self._lock:
            if not self._latency:
                return 0.0
            return float(np.median(np.asarray(self._latency)[-30:])) / 1000.0


def _rounded(values: np.ndarray, digits: int = 4) -> list[Any]:
    return np.round(np.asarray(values, np.float64), digits).tolist()


class LivePipeline:
    """One session's pipeline: its stages, window, easing, and a worker thread.

    `stages` is a SessionStages or a callable that makes one (called in the worker thread,
    so heavy set-up such as MediaPipe's graph never runs on the asyncio loop). Call
    `start()` to run the worker, `submit()` per source frame, `close()` at the end; or call
    `process()` directly (offline, one frame after another, nothing dropped).
    """

    def __init__(self, target: Target, stages: SessionStages | Callable[[], SessionStages],
                 config: Config, on_output: Callable[[OutputFrame], None] | None = None,
                 name: str = "session", vmc: Any = None,
                 eyelook: Callable[[np.ndarray], np.ndarray] | None = None,
                 eyelook_index: np.ndarray | None = None,
                 keep_conditioning: bool = False) -> None:
        self.target = target
        self.config = config
        self.name = name
        self.on_output = on_output
        self.vmc = vmc
        self.keep_conditioning = keep_conditioning
        self._stage_factory = stages if callable(stages) else None
        self.stages: SessionStages | None = None if callable(stages) else stages
        self.controls = Controls()
        self.window = LiveWindow(target.fps, target.n_w)
        self.easing = FaceLossEasing(config.streamer.ease_seconds, eyelook, eyelook_index)
        self._slot = LatestSlot()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._neutral_requested = False
        self.setup_error: BaseException | None = None
        self._stats = SessionStats()

    # -- control (any thread) --
    def set_controls(self, controls: Controls) -> None:
        """Replace the mode and edits (takes effect on the next frame)."""
        self.controls = controls

    def set_neutral(self) -> None:
        """Calibrate the source's neutral from its next frames (the page's "set neutral")."""
        self._neutral_requested = True

    # -- the worker --
    def start(self) -> None:
        """Start the worker thread (it makes the session's stages first)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=f"dvp-{self.name}", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait until the worker has made its stages; False on timeout."""
        return self._ready.wait(timeout)

    def submit(self, image: Any, timestamp: float) -> None:
        """Hand a source frame (numpy RGB or av.VideoFrame) to the worker; never blocks.

        A frame still waiting from before is dropped (latest frame wins)."""
        self._stats.submitted += 1
        self._slot.put((image, float(timestamp), time.monotonic(), self._stats.submitted - 1))

    def _run(self) -> None:
        try:
            if self.stages is None:
                assert self._stage_factory is not None
                self.stages = self._stage_factory()
        except BaseException as err:  # report and stop: the session cannot run
            log.exception("%s: could not set up the pipeline", self.name)
            self.setup_error = err
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                item = self._slot.get(timeout=0.5)
                if item is None:
                    continue
                image, timestamp, received, index = item
                del item
                try:
                    out = self.process(image, timestamp, received=received, index=index)
                except Exception:  # one bad frame never ends the stream
                    self._stats.failed()
                    log.exception("%s: frame %d failed", self.name, index)
                    continue
                finally:
                    del image  # no source frame is kept
                if self.on_output is not None and not self._stop.is_set():
                    self.on_output(out)
        finally:
            if self.stages is not None:
                self.stages.close()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker, wait for it, release the stages. Idempotent."""
        self._stop.set()
        self._slot.close()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: worker thread did not stop within %.0f s", self.name, timeout)
            self._thread = None
        elif self.stages is not None:
            self.stages.close()
            self.stages = None
        if self.vmc is not None:
            self.vmc.close()
            self.vmc = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- one frame --
    def process(self, image: Any, timestamp: float, received: float | None = None,
                index: int | None = None) -> OutputFrame:
        """Reenact one source frame (synchronously, in the calling thread)."""
        if self.stages is None:
            if self._stage_factory is None:
                raise RuntimeError("pipeline has no stages")
            self.stages = self._stage_factory()
        received = time.monotonic() if received is None else received
        index = self._stats.processed if index is None else index
        ms: dict[str, float] = {}
        tick = time.perf_counter()
        rgb = to_rgb(image)
        stamp = read_stamp(rgb) if self.config.streamer.echo_stamp else None
        tock = time.perf_counter()
        ms["convert"] = (tock - tick) * 1e3
        if self._neutral_requested:
            self._neutral_requested = False
            self.stages.retarget.set_neutral()
        source = self.stages.tracker(rgb, timestamp, ms)
        del rgb, image
        tick = time.perf_counter()
        controls = self.controls
        params = self.stages.transfer(source, controls, self.easing, timestamp)
        tock = time.perf_counter()
        ms["transfer"] = (tock - tick) * 1e3
        target = self.target
        with target.lock:
            tick = time.perf_counter()
            cond = target.render(params)  # 9,S,S
            tock = time.perf_counter()
            ms["render"] = (tock - tick) * 1e3
            window = self.window.push(timestamp, cond)  # 9*n_w,S,S
            tick = time.perf_counter()
            ms["window"] = (tick - tock) * 1e3
            frame = target.generate(window)  # S,S,3 uint8
            tock = time.perf_counter()
            ms["generator"] = (tock - tick) * 1e3
        del window
        if self.stages.monitor is not None:  # before the mark: the output as generated
            self.stages.monitor.offer(frame, params)
        colour = target.colour_image(cond) if self.keep_conditioning else None
        if self.config.streamer.synthetic_mark:
            draw_synthetic_mark(frame)
        if stamp is not None:
            write_stamp(frame, stamp)
        done = time.monotonic()
        ms["output"] = (time.perf_counter() - tock) * 1e3
        out = OutputFrame(image=frame, index=index, timestamp=timestamp, received=received,
                          done=done, face=source is not None, params=params, stage_ms=ms,
                          dropped=self._slot.dropped, mode=controls.mode, stamp=stamp,
                          conditioning=colour)
        self._record(out)
        if self.vmc is not None:
            self.stages.send_vmc(self.vmc, params, out.face, self.name)
        return out

    def _record(self, out: OutputFrame) -> None:
        self._stats.record(out)

    # -- figures --
    def stats(self) -> dict[str, Any]:
        """Running figures: frames in/out/dropped/failed, output fps over the last second or
        so, latency p50/p95 (ms, submit to output), per-stage ms (moving averages), and with
        a monitor `retrack` (streamer.jobs.retrack: the output re-tracked at a low rate)."""
        return self._stats.figures(self._slot.dropped, self.controls.mode,
                                   getattr(self.stages, "monitor", None))

    def latency_estimate(self) -> float:
        """Median submit-to-output time of recent frames, seconds (0 before any frame)."""
        return self._stats.latency_estimate()


def params_message(out: OutputFrame, names: list[str]) -> str:
    """The `params` data-channel message of one output frame (JSON text, docs/protocol.md)."""
    p = out.params
    return json.dumps({
        "type": "params",
        "frame": out.index,
        "t": round(out.timestamp, 4),
        "face": out.face,
        "mode": out.mode,
        "rotation": _rounded(p.rotation[0]),
        "translation": _rounded(p.translation[0], 3),
        "gaze": _rounded(p.gaze[0]),
        "expression": dict(zip(names, _rounded(p.expression[0], 3))),
        "stage_ms": {k: round(v, 2) for k, v in out.stage_ms.items()},
        "latency_ms": round(out.latency_ms, 2),
        "dropped": out.dropped,
    }, separators=(",", ":"))
