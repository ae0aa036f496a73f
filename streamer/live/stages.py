"""The pieces of the other packages a live or offline reenactment is made of.

- `LoadedTarget`: one target directory made ready to drive, once per server (shared by its
  sessions): `generator.target.TargetDir` (checked), the face model, the target's
  `renderer.conditioning.ConditioningRenderer` (its albedo) and the generator runtime of its
  latest checkpoint (`generator.runtime.load_runtime`, backend from `generator.backend`,
  TensorRT engine or ONNX export from `TDIR/engine/` when exported from that checkpoint).
  Per-target constants are built here once, never per frame. Its `render` and `generate`
  are the serial reference's (`LivePipeline.process`, which serialises them by `lock`); the
  live engine (streamer.live.engine) drives the same conditioner and runtime from its one
  device thread, batched over sessions, without the lock.
- `make_session_stages(target, config)`: one session's source tracker (`TrackerStage`:
  tracker.landmarks + tracker.tracker.FaceTracker, in a CPU half and a device half;
  offline `ReplayTracker` of the whole source tracked beforehand), transfer
  (`TransferStage`: tracker.transfer with the session's source neutral and spread, and the
  target's ranges) and the low-rate re-tracking monitor of the output
  (streamer.jobs.retrack.RetrackMonitor).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamer.cli.config import Config
from streamer.live.controls import Controls
from streamer.live.pipeline import SessionStages
from tracker.params import FaceParams
from tracker.rotation import axis_rotation, matrix_to_axis_angle

log = logging.getLogger(__name__)


class LoadedTarget:
    """A target directory ready to drive (see the module doc). Thread-safe through `lock`.

    `render(params)` -> the conditioning `[9, S, S]` float32 on `device` of one frame;
    `generate(window [9*N_w, S, S])` -> `(S, S, 3)` uint8 RGB numpy; `colour_image(cond)` ->
    the colour rendering `(S, S, 3)` uint8. `conditioner` and `runtime` may be given
    (anything with `frames(params) -> [T, 9, S, S]` and DESIGN.md's runtime contract).
    """

    def __init__(self, root: str | Path, config: Config, device: torch.device,
                 conditioner: Any = None, runtime: Any = None, face_model: Any = None) -> None:
        from generator.target import TargetDir
        from tracker.face_model import gaze_to_eyelook

        started = time.perf_counter()
        self.root = Path(root)
        self.dir = TargetDir(self.root)
        self.info = self.dir.info
        self.size = int(self.info.resolution)
        self.n_w = int(self.info.window)
        self.fps = float(self.info.fps)
        self.config = config
        self.device = device
        self.params: FaceParams = self.dir.params()
        if face_model is None:
            from tracker.assets import load_face_model

            face_model = load_face_model()
        self.face_model = face_model
        self.expression_names = [str(n) for n in self.params.expression_names]
        self.eyelook_index = np.asarray(face_model.eyelook_indices)
        self.eyelook = gaze_to_eyelook
        self.neutral = self.dir.neutral()
        self.rest = rest_params(self.params, self.neutral, self.eyelook_index)
        from tracker.transfer import Neutral

        rest = self.rest
        #: The target's neutral (tracker.transfer.Neutral) and its pose ranges around it
        #: (tracker.ranges.Ranges from ranges.npz, computed when absent; None without faces).
        self.neutral_params = Neutral(rest.rotation[0], rest.translation[0],
                                      rest.expression[0], rest.gaze[0])
        self.ranges = self.dir.ranges(self.neutral_params)
        if conditioner is None:
            from renderer.conditioning import ConditioningRenderer

            conditioner = ConditioningRenderer(face_model, self.dir.albedo(), self.size, device,
                                               rasterizer=config.renderer.rasterizer)
        self.conditioner = conditioner
        if runtime is None:
            from generator.runtime import load_runtime

            runtime = load_runtime(self.dir, config.generator.backend, device)
        self.runtime = runtime
        self.lock = threading.Lock()
        self._shared_lock = threading.Lock()
        self._regressor: Any = None
        log.info("loaded target %s (%d px, window %d, %.3g fps) in %.1f s", self.root,
                 self.size, self.n_w, self.fps, time.perf_counter() - started)

    @property
    def backend(self) -> str:
        return str(getattr(self.runtime, "backend", "unknown"))

    def render(self, params: FaceParams) -> torch.Tensor:
        """Conditioning `[9, S, S]` float32 in [0, 1] of a one-frame FaceParams."""
        frames = self.conditioner.frames(params)  # 1,9,S,S
        return frames[0].to(self.device, torch.float32)

    def generate(self, window: torch.Tensor) -> np.ndarray:
        """One frame `(S, S, 3)` uint8 RGB from a window `[9*N_w, S, S]`."""
        out = self.runtime(window[None].to(self.runtime.device, torch.float32))  # 1,S,S,3
        return out[0].cpu().numpy()

    def regressor(self) -> Any:
        """The tracker's landmark regressor, loaded (or trained and cached) once and shared
        by the sessions."""
        with self._shared_lock:
            if self._regressor is None:
                from tracker.regressor import load_or_train, settings_from_config

                self._regressor = load_or_train(self.face_model,
                                                settings_from_config(self.config.tracker))
            return self._regressor

    def colour_image(self, conditioning: torch.Tensor) -> np.ndarray:
        """The colour rendering of a conditioning frame `[9, S, S]` as `(S, S, 3)` uint8."""
        rgb = conditioning[:3].clamp(0, 1).mul(255).round().to(torch.uint8)
        return rgb.permute(1, 2, 0).cpu().numpy()


def rest_params(params: FaceParams, neutral: dict[str, np.ndarray],
                eyelook_index: np.ndarray) -> FaceParams:
    """The target at rest (one frame): what the output eases to when the source face is lost.

    Pose, expression, gaze and lighting come from `neutral.npz` where it has them (keys
    `rotation (3,)`, `translation (3,)`, `expression (53,)`, `gaze (2, 2)`, `sh (9, 3)`, each
    optionally with a leading axis of 1); what it lacks is the median over the target's valid
    frames (pose, lighting), zero expression and straight-ahead gaze. Identity and camera are
    the target's. INTEGRATION POINT: neutral.npz's keys are fixed by `dvp prepare` /
    tracker.transfer; this reads the obvious names.
    """
    from tracker.face_model import gaze_to_eyelook

    valid = np.nonzero(params.valid)[0]
    pool = params.select(valid) if len(valid) else params
    defaults = {
        "rotation": np.median(pool.rotation, 0),
        "translation": np.median(pool.translation, 0),
        "expression": np.zeros(params.expression.shape[1], np.float32),
        "gaze": np.zeros((2, 2), np.float32),
        "sh": np.median(pool.sh, 0),
    }
    values = {}
    for key, default in defaults.items():
        value = np.asarray(neutral.get(key, default), np.float32)
        if value.shape == (1,) + default.shape:
            value = value[0]
        if value.shape != default.shape or not np.all(np.isfinite(value)):
            log.warning("neutral.npz: ignoring '%s' of shape %s (expected %s)", key,
                        value.shape, default.shape)
            value = np.asarray(default, np.float32)
        values[key] = value[None]
    values["expression"][:, eyelook_index] = gaze_to_eyelook(values["gaze"])
    one = params.select([0])
    return replace(one, **values, valid=np.ones(1, bool), timestamps=np.zeros(1, np.float32))


# ---- the session stages: the tracker's live fit and transfer -------------------------------
class TrackerStage:
    """The source's landmarks (tracker.landmarks.LandmarkDetector, streaming) and live fit
    (tracker.tracker.FaceTracker.step: warm-started, identity and focal calibrated over the
    first `tracker.calibration_seconds`, One-Euro smoothed). One per session."""

    def __init__(self, target: LoadedTarget, config: Config) -> None:
        from tracker.landmarks import make_landmark_detector
        from tracker.tracker import FaceTracker

        tc = config.tracker
        self.tracker = FaceTracker(target.face_model, tc, target.device,
                                   regressor=target.regressor())
        self.detector = make_landmark_detector(tc, target.device)

    @property
    def calibrated(self) -> bool:
        return bool(self.tracker.calibrated)

    def landmarks(self, rgb: np.ndarray) -> Any:
        """The CPU half: the frame's landmarks (tracker.landmarks.Landmarks)."""
        return self.detector(rgb)

    def fit(self, landmarks: Any, timestamp: float,
            stage_ms: dict[str, float]) -> FaceParams | None:
        """The device half: the live fit of one frame's landmarks (None: no face)."""
        tick = time.perf_counter()
        frame = self.tracker.step(landmarks, timestamp)
        params = self.tracker.to_params([frame]) if frame.valid else None
        stage_ms["fit"] = (time.perf_counter() - tick) * 1e3
        return params

    def __call__(self, rgb: np.ndarray, timestamp: float,
                 stage_ms: dict[str, float]) -> FaceParams | None:
        tick = time.perf_counter()
        landmarks = self.landmarks(rgb)
        stage_ms["landmarks"] = (time.perf_counter() - tick) * 1e3
        return self.fit(landmarks, timestamp, stage_ms)

    def use_fit_graph(self, graph: Any) -> None:
        """Replay the warm fit from `graph` (a tracker.graphs.GraphedWarmFit captured before
        the session started, see streamer.live.engine) instead of capturing one lazily."""
        self.tracker.use_fit_graph(graph)

    def recalibrate(self) -> None:
        self.tracker.recalibrate()

    def close(self) -> None:
        self.detector.close()
        self.tracker.close()


class TransferStage:
    """The source's motion onto the target (tracker.transfer.transfer), relative to both
    neutrals and, with `transfer.range` = `adapt`, fitted into the target's ranges
    (tracker.ranges.RangeMap); keeps the session's source calibration. One per session.

    Source neutral (live): the median of the source's first resting frames
    (tracker.transfer.rest_scores: stable, frontal, closed mouth, eyes open) once they
    span `transfer.neutral_seconds`, or of the best frames of the first
    `transfer.neutral_timeout_seconds` when the face never rests that long; until then
    the best of the frames so far. Taken again once the tracker has calibrated identity and
    focal length (its estimates shift then) and whenever `set_neutral()` is called (the
    page's button). The source's spread: `tracker.ranges.SpreadEstimate` (the last
    `transfer.spread_seconds`, recomputed each second, scales eased). Offline,
    `use_source_statistics` fixes both from the whole source video instead.

    Target: its neutral (`LoadedTarget.rest`), its ranges (`LoadedTarget.ranges`) and its
    own tracked frames played along in time (forward and back, at the target's fps), so that
    what a mode does not take from the source (the target's blinks and gaze in `dub`, its
    head motion in `face`) stays alive.
    """

    def __init__(self, target: LoadedTarget, config: Config,
                 tracker: TrackerStage | None = None) -> None:
        from tracker.ranges import SpreadEstimate, check_range_setting

        self.target = target
        self.config = config
        self.settings = config.transfer
        self.range = check_range_setting(self.settings.range)
        self.tracker = tracker
        self.target_neutral = target.neutral_params
        self.ranges = getattr(target, "ranges", None) if self.range == "adapt" else None
        self.source_neutral: Any = None
        self.source_spread: Any = None  # fixed from a whole video (use_source_statistics)
        self._spread = SpreadEstimate(self.settings.spread_seconds,
                                      self.settings.spread_min_seconds,
                                      self.settings.spread_smoothing_seconds)
        self._collected: list[FaceParams] = []
        self._collect = True
        self._fixed = False
        self._user_set = False
        self._was_calibrated = tracker.calibrated if tracker is not None else True
        self.play = np.nonzero(target.params.valid)[0]

    @property
    def neutral_settled(self) -> bool:
        """Whether the source's neutral is taken (no longer collecting frames for it)."""
        return not self._collect

    def set_neutral(self) -> None:
        self._collected = []
        self._collect = True
        self._user_set = True

    def use_source_statistics(self, neutral: Any, spread: Any) -> None:
        """Fix the source's neutral (tracker.transfer.Neutral) and spread
        (tracker.ranges.Ranges around it, or None) from the whole source video (offline)."""
        self.source_neutral, self.source_spread = neutral, spread
        self._collect, self._fixed, self._collected = False, True, []

    def _update_neutral(self, source: FaceParams) -> None:
        from tracker.ranges import concat_frames
        from tracker.transfer import Neutral, rest_scores

        calibrated = self.tracker.calibrated if self.tracker is not None else True
        if calibrated and not self._was_calibrated and not self._user_set and not self._fixed:
            self._collected, self._collect = [], True  # estimates moved: take it again
        self._was_calibrated = calibrated
        if not self._collect or not bool(source.valid[0]):
            return
        self._collected.append(source)
        seq = concat_frames(self._collected)
        scores = rest_scores(seq, self.settings)
        rest = np.nonzero(scores <= 1.0)[0]
        times = seq.timestamps
        settled = len(rest) >= 3 and float(times[rest[-1]] - times[rest[0]]) >= \
            self.settings.neutral_seconds
        timed_out = float(times[-1] - times[0]) >= self.settings.neutral_timeout_seconds
        if len(rest) < 3:  # not resting yet: the frames nearest to rest so far
            rest = np.sort(np.argsort(scores, kind="stable")[:min(5, len(scores))])
        self.source_neutral = Neutral.from_params(seq.select(rest), percentile=50.0)
        if settled or timed_out:
            self._collect, self._collected = False, []

    def _target_frame(self, timestamp: float) -> FaceParams:
        """The target's own frame played along at `timestamp` (its rest when it has none)."""
        if len(self.play) == 0:
            return self.target.rest
        n = len(self.play)
        k = int(timestamp * self.target.fps) % max(1, 2 * n - 2) if n > 1 else 0
        index = self.play[k if k < n else 2 * n - 2 - k]
        return self.target.params.select([int(index)])

    def _range_map(self, source: FaceParams) -> Any:
        from tracker.ranges import RangeMap

        if self.ranges is None:
            return None
        s = self.settings
        if self._fixed:
            return RangeMap(self.ranges, self.source_spread, s.expression_narrow, s.soft_knee)
        self._spread.add(source)
        depth_ratio = float(self.target_neutral.translation[2]) / max(
            float(self.source_neutral.translation[2]), 1e-3)
        scales = self._spread.scales(self.ranges, self.source_neutral, depth_ratio,
                                     float(source.timestamps[0]))
        return RangeMap(self.ranges, None, s.expression_narrow, s.soft_knee, scales=scales)

    def __call__(self, source: FaceParams, controls: Controls) -> FaceParams:
        from tracker.transfer import transfer

        self._update_neutral(source)
        if self.source_neutral is None:  # no valid source frame yet
            return self.target.rest
        frame = self._target_frame(float(source.timestamps[0]))
        return transfer(source, self.source_neutral, frame, self.target_neutral,
                        controls.mode, edit_of(controls, self.target.expression_names),
                        ranges=self._range_map(source))

    def rest(self, controls: Controls) -> FaceParams:
        return self.target.rest


def edit_of(controls: Controls, names: list[str]) -> Any:
    """The sliders as tracker.transfer's Edit (mode `edit` applies it): rotation offsets
    R_z(roll) R_y(yaw) R_x(pitch) as axis-angle (head frame), translation offsets (cm), one
    gain times the per-coefficient gains, gaze offsets in radians."""
    from tracker.transfer import Edit

    if controls.mode != "edit":
        return None
    pitch, yaw, roll = np.deg2rad(controls.head_rotation_deg)
    r_off = axis_rotation(2, roll) @ axis_rotation(1, yaw) @ axis_rotation(0, pitch)
    gains = np.full(len(names), controls.expression_gain, np.float32)
    for name, gain in controls.expression_gains.items():
        if name in names:
            gains[names.index(name)] *= gain
    return Edit(rotation_offset=matrix_to_axis_angle(r_off).astype(np.float32),
                translation_offset=np.asarray(controls.head_translation_cm, np.float32),
                expression_gain=gains,
                gaze_offset=np.deg2rad(np.asarray(controls.gaze_offset_deg, np.float32)))


class ReplayTracker:
    """The source's parameters tracked beforehand from the whole video (offline): frame i
    of the pipeline gets frame i of `params` (None where it has no face). Its timestamps
    must match the frames'."""

    calibrated = True

    def __init__(self, params: FaceParams) -> None:
        self.params = params
        self.index = 0

    def landmarks(self, rgb: np.ndarray) -> None:
        """Nothing to find: the parameters are known."""

    def fit(self, landmarks: Any, timestamp: float,
            stage_ms: dict[str, float]) -> FaceParams | None:
        """The next frame's parameters (None: no face), checked against `timestamp`."""
        from streamer.video.io import VideoError

        i = self.index
        if i >= self.params.frames or abs(float(self.params.timestamps[i]) - timestamp) > 1e-3:
            raise VideoError(f"source frame {i} at {timestamp:.3f} s does not match the "
                             f"source's tracked parameters ({self.params.frames} frames): "
                             "the video was read differently")
        self.index += 1
        stage_ms["fit"] = 0.0
        return self.params.select([i]) if bool(self.params.valid[i]) else None

    def __call__(self, rgb: np.ndarray, timestamp: float,
                 stage_ms: dict[str, float]) -> FaceParams | None:
        stage_ms["landmarks"] = 0.0
        return self.fit(None, timestamp, stage_ms)

    def recalibrate(self) -> None:
        pass

    def close(self) -> None:
        pass


def source_statistics(params: FaceParams, config: Config) -> tuple[Any, Any]:
    """The source's neutral (tracker.transfer.Neutral.from_rest: its resting frames over the
    whole video) and spread (tracker.ranges.Ranges around it; None without faces)."""
    from tracker.ranges import Ranges
    from tracker.transfer import Neutral

    neutral = Neutral.from_rest(params, config.transfer)
    return neutral, Ranges.from_params(params, neutral)


def make_session_stages(target: LoadedTarget, config: Config,
                        source: FaceParams | None = None, monitor: bool = True
                        ) -> SessionStages:
    """One session's tracker and transfer (call it in the session's worker thread).

    source: the whole source video's parameters, tracked beforehand (offline): they are
    replayed frame by frame and give the source's neutral and spread. monitor: re-track
    the output every `streamer.retrack_seconds` (0: never) in the background
    (streamer.jobs.retrack.RetrackMonitor, the stats' `retrack`)."""
    if source is not None:
        if not np.asarray(source.valid, bool).any():
            from tracker.transfer import TransferError

            raise TransferError("no frame of the source video has a face")
        tracker: Any = ReplayTracker(source)
        retarget = TransferStage(target, config)
        retarget.use_source_statistics(*source_statistics(source, config))
    else:
        tracker = TrackerStage(target, config)
    try:
        if source is None:
            retarget = TransferStage(target, config, tracker)
        watch = None
        if monitor and config.streamer.retrack_seconds > 0:
            from streamer.jobs.retrack import RetrackMonitor

            watch = RetrackMonitor(target, config, config.streamer.retrack_seconds)
        return SessionStages(tracker=tracker, retarget=retarget, monitor=watch)
    except BaseException:
        tracker.close()
        raise
