"""Re-tracking check: the generated frames tracked again with the project's own tracker and
compared with the parameters that were asked for.

A reenactment asks the network for a pose, an expression and a gaze (the transferred
parameters it renders); the network may or may not give them, and outside the target's
range it tends not to. Tracking its output (landmarks, then `tracker.tracker.FaceTracker`
with the target's own identity, focal length and principal point, so the figures are in
the target's terms)
says what it gave. Figures (`compare`, keys `REPORT_KEYS`):

- `requested_in_range`: fraction of frames whose requested head pose (after the range
  adaptation) lies inside the target's range: its own tracked [1st, 99th] percentile per
  axis of rotation and translation, widened by 10 % of that spread on each side
  (tracker.ranges.inside);
- `retracked_in_range`: the same for the re-tracked pose; a frame with no face found counts
  as outside;
- `faces_found`: fraction of generated frames in which the tracker found a face;
- `rotation_error_deg_median`: median angle (degrees) between the requested and the
  re-tracked head rotation, over the frames with a face;
- `jaw_open_corr`, `eye_blink_corr`: Pearson correlation over the frames with a face of the
  requested and re-tracked jawOpen, and of the mean of eyeBlink_L and eyeBlink_R;
- `range`: the transfer's range setting (`adapt` or `raw`).

A figure that cannot be computed (no face found; fewer than 3 frames; a constant series; a
target without ranges) is null.

`RetrackReport`: every frame of an offline reenactment (`dvp reenact --report`), tracked as
a video (streaming landmarks, warm-started fit, smoothing as configured). `RetrackMonitor`:
live, one generated frame every `streamer.retrack_seconds` of stream time re-tracked in a
background thread (each frame on its own: static landmarks, cold fit, no smoothing), the
figures over the last `MONITOR_FRAMES` of them in the session stats (`retrack`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from streamer.cli.config import Config
from tracker.params import FaceParams
from tracker.ranges import concat_frames, inside
from tracker.rotation import angle_between_deg

log = logging.getLogger(__name__)

REPORT_KEYS = ("requested_in_range", "retracked_in_range", "faces_found",
               "rotation_error_deg_median", "jaw_open_corr", "eye_blink_corr", "range")
#: Live: re-tracked frames the figures are taken over (the last minute at one a second).
MONITOR_FRAMES = 60


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.std(a) < 1e-6 or np.std(b) < 1e-6:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def rotation_error_deg(a: FaceParams, b: FaceParams) -> np.ndarray:
    """(T,) float64: the angle in degrees of the rotation between `a` and `b`, per frame."""
    return angle_between_deg(a.rotation, b.rotation)


def compare(requested: FaceParams, retracked: FaceParams, neutral: Any, ranges: Any,
            range_setting: str) -> dict[str, Any]:
    """The re-tracking figures (module doc) of T requested frames and their T re-tracked
    frames (`retracked.valid`: a face was found). neutral: the target's
    tracker.transfer.Neutral; ranges: its tracker.ranges.Ranges around it, or None."""
    if requested.frames != retracked.frames:
        raise ValueError(f"{requested.frames} requested frames but {retracked.frames} "
                         "re-tracked")
    n = requested.frames
    found = np.asarray(retracked.valid, bool)
    names = [str(x) for x in requested.expression_names]
    jaw = names.index("jawOpen")
    blinks = [names.index("eyeBlink_L"), names.index("eyeBlink_R")]
    req_in = ret_in = None
    if ranges is not None and n:
        req_in = float(np.mean(inside(requested, neutral, ranges)))
        ret_in = float(np.mean(inside(retracked, neutral, ranges) & found))
    error = rotation_error_deg(requested, retracked)[found]
    req_f, ret_f = requested.expression[found], retracked.expression[found]
    return {
        "requested_in_range": _rounded(req_in),
        "retracked_in_range": _rounded(ret_in),
        "faces_found": _rounded(float(found.mean()) if n else None),
        "rotation_error_deg_median": _rounded(float(np.median(error)) if len(error) else None,
                                              3),
        "jaw_open_corr": _rounded(_correlation(req_f[:, jaw], ret_f[:, jaw])),
        "eye_blink_corr": _rounded(_correlation(req_f[:, blinks].mean(1),
                                                ret_f[:, blinks].mean(1))),
        "range": range_setting,
    }


def write_report(path: str | Path, report: dict[str, Any]) -> Path:
    """Write `report` as JSON (aside, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(report, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _target_tracker(target: Any, config: Config, device: Any, smoothing: bool) -> Any:
    """A FaceTracker for the target's generated S x S frames: the target's identity and
    focal length fixed (no calibration)."""
    import copy

    import torch

    from tracker.tracker import FaceTracker

    tc = config.tracker if smoothing else replace(config.tracker, smoothing=False)
    regressor = target.regressor()
    if torch.device(device) != regressor.device:  # moving it would move the shared one
        regressor = copy.deepcopy(regressor)
    return FaceTracker(target.face_model, tc, device, regressor=regressor,
                       image_size=(target.size, target.size),
                       focal=float(target.params.focal[0]), identity=target.params.identity,
                       principal_point=target.params.principal_point)


class RetrackReport:
    """Re-tracks every generated frame of an offline reenactment (module doc).

    `add(image, requested)` per frame in order: image `(S, S, 3)` uint8 RGB, unmarked;
    requested: the one-frame FaceParams it was generated from. `result()` -> the figures.
    device: where the fit runs (default the CPU: the reenactment keeps the GPU, and no CUDA
    graph is captured while other threads may use it).
    """

    def __init__(self, target: Any, config: Config, device: Any = "cpu") -> None:
        from tracker.landmarks import make_landmark_detector

        self.target = target
        self.range = config.transfer.range
        self.tracker = _target_tracker(target, config, device, smoothing=True)
        self.detector = make_landmark_detector(config.tracker, device)
        self._requested: list[FaceParams] = []
        self._frames: list[Any] = []

    def add(self, image: np.ndarray, requested: FaceParams) -> None:
        t = float(requested.timestamps[0])
        self._frames.append(self.tracker.step(self.detector(image), t))
        self._requested.append(requested)

    def retracked(self) -> FaceParams:
        """The re-tracked parameters of the frames so far (valid: a face was found)."""
        return self.tracker.to_params(self._frames)

    def result(self) -> dict[str, Any]:
        """The figures over all frames added (module doc)."""
        if not self._requested:
            raise ValueError("no frame was re-tracked")
        return compare(concat_frames(self._requested), self.retracked(),
                       self.target.neutral_params, self.target.ranges, self.range)

    def close(self) -> None:
        self.detector.close()
        self.tracker.close()


class RetrackMonitor:
    """Live re-tracking at a low rate in a background thread (module doc).

    `offer(image, requested)`: called per generated frame (unmarked `(S, S, 3)` uint8);
    copies and hands on one frame each `interval` seconds of stream time, never blocks (a
    frame still waiting is replaced). `summary()`: the figures over the last
    `MONITOR_FRAMES` re-tracked frames, with `frames` (how many). Runs on the CPU, so the
    GPU path is untouched.
    """

    def __init__(self, target: Any, config: Config, interval: float = 1.0,
                 device: Any = "cpu") -> None:
        self.target = target
        self.config = config
        self.interval = float(interval)
        self.device = device
        self.range = config.transfer.range
        self._next_t: float | None = None
        self._cond = threading.Condition()
        self._item: tuple[Any, Any, FaceParams] | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._requested: deque[FaceParams] = deque(maxlen=MONITOR_FRAMES)
        self._retracked: deque[FaceParams] = deque(maxlen=MONITOR_FRAMES)
        self.errors = 0
        self._thread = threading.Thread(target=self._run, name="dvp-retrack", daemon=True)
        self._thread.start()

    def offer(self, image: Any, requested: FaceParams) -> bool:
        """Take this frame if one is due; True when taken. image: `(S, S, 3)` uint8, numpy
        or a torch tensor (the live engine's, on its device: copied there, with an event
        the background thread waits on before it downloads the copy)."""
        t = float(requested.timestamps[0])
        if self._closed or (self._next_t is not None and t < self._next_t):
            return False
        self._next_t = t + self.interval
        if isinstance(image, np.ndarray):
            item: Any = (np.array(image, copy=True), None)
        else:
            import torch

            copy = image.detach().clone()
            ready = None
            if copy.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
            item = (copy, ready)
        with self._cond:
            self._item = (*item, requested)
            self._cond.notify()
        return True

    def _run(self) -> None:
        from tracker.landmarks import make_landmark_detector

        detector = tracker = None
        try:
            detector = make_landmark_detector(self.config.tracker, self.device, stream=False)
            tracker = _target_tracker(self.target, self.config, self.device, smoothing=False)
            while True:
                with self._cond:
                    while self._item is None and not self._closed:
                        self._cond.wait(0.5)
                    if self._closed:
                        return
                    image, ready, requested = self._item  # type: ignore[misc]
                    self._item = None
                try:
                    if ready is not None:
                        ready.synchronize()
                    if not isinstance(image, np.ndarray):
                        image = image.cpu().numpy()
                    tracker.reset()  # frames a second apart: each one on its own
                    frame = tracker.step(detector(image), float(requested.timestamps[0]))
                    retracked = tracker.to_params([frame])
                except Exception:
                    self.errors += 1
                    log.exception("re-tracking a generated frame failed")
                    continue
                with self._lock:
                    self._requested.append(requested)
                    self._retracked.append(retracked)
        except Exception:
            self.errors += 1
            log.exception("the re-tracking monitor could not start")
        finally:
            if detector is not None:
                detector.close()
            if tracker is not None:
                tracker.close()

    def summary(self) -> dict[str, Any]:
        """The figures over the recent re-tracked frames, plus `frames`."""
        with self._lock:
            requested, retracked = list(self._requested), list(self._retracked)
        if not requested:
            return {**dict.fromkeys(REPORT_KEYS), "range": self.range, "frames": 0}
        out = compare(concat_frames(requested), concat_frames(retracked),
                      self.target.neutral_params, self.target.ranges, self.range)
        return {**out, "frames": len(requested)}

    def wait_for(self, frames: int, timeout: float = 30.0) -> bool:
        """Block until `frames` frames are re-tracked (tests); False on timeout."""
        import time

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if len(self._retracked) >= frames:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._item = None
            self._cond.notify_all()
        self._thread.join(10)
