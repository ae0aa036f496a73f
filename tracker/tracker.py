"""Frame-by-frame face tracking: landmarks in, DESIGN.md's face parameters out.

`FaceTracker` is the live tracker: `step(landmarks, t)` (or `track(frame, t)`, which runs
MediaPipe too) fits each frame warm-started from the previous one, from the regressor on
the first frame or after the track was lost (no face, a cut, a fit gone bad). Identity and
focal length are fitted jointly over keyframes and then frozen: live, over the first
`calibration_seconds` of frames with a face (until then the mean identity and the focal
guess are used; `recalibrate()` starts over); offline, `calibrate(all landmarks)` before
the first frame. `track_landmarks` is the offline path: calibrate, then step through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
import torch

from tracker.config import TrackerConfig
from tracker.face_model import FaceModel, gaze_to_eyelook
from tracker.fitting import (
    Camera,
    FitInfo,
    FitState,
    LandmarkFitter,
    initial_translation,
    params_landmarks,
)
from tracker.graphs import GraphedWarmFit
from tracker.landmarks import FrameError, Landmarks, LandmarkSource, box_iou, make_landmark_detector
from tracker.params import FaceParams
from tracker.regressor import Regressor, load_or_train, settings_from_config
from tracker.rotation import matrix_to_axis_angle
from tracker.smoothing import ParamSmoother, SmoothingSettings

log = logging.getLogger(__name__)

#: Fewest frames with a face before the live calibration runs.
_MIN_CALIBRATION_FRAMES = 8


@dataclass(frozen=True)
class TrackedFrame:
    """One frame's tracking result (numpy, CPU).

    rotation (3,) axis-angle; translation (3,) cm; expression (53,) in [0, 1] (eyeLook =
    gaze_to_eyelook(gaze)); gaze (2, 2) yaw, pitch radians per eye (0 = subject's left):
    filtered (One-Euro) when smoothing is on. When no face was found (`valid` False) they
    hold the last tracked face (or the neutral face before any). residual_px: median
    distance in pixels between the observed and fitted mesh landmarks (NaN when invalid);
    iterations: Levenberg-Marquardt iterations run; cold: started from the regressor.
    """

    rotation: np.ndarray
    translation: np.ndarray
    expression: np.ndarray
    gaze: np.ndarray
    valid: bool
    timestamp: float
    residual_px: float
    iterations: int
    cold: bool


class FaceTracker:
    """Live face tracker for one stream of frames of one size (see the module doc).

    model: the face model; device: torch device of the fit; regressor: a trained one
    (default: the cached one, trained on first use); image_size (h, w): known in advance
    or taken from the first frame; focal (px) and identity (100,): fixed values that skip
    their calibration (both given: no calibration at all); principal_point (cx, cy) px of
    `image_size`: a fixed one (default: the image centre), e.g. a target's crop camera.
    """

    def __init__(self, model: FaceModel, config: TrackerConfig | None = None,
                 device: torch.device | str = "cpu", regressor: Regressor | None = None,
                 image_size: tuple[int, int] | None = None, focal: float | None = None,
                 identity: np.ndarray | None = None,
                 principal_point: np.ndarray | None = None) -> None:
        self.config = config or TrackerConfig()
        self._fixed_principal = None if principal_point is None else \
            (np.asarray(principal_point, np.float32), image_size)
        self.device = torch.device(device)
        self.model = model
        self.fitter = LandmarkFitter(model, self.config, self.device)
        self.regressor = (regressor or load_or_train(
            model, settings_from_config(self.config))).to(self.device)
        self._fixed_focal = focal
        self._fixed_identity = identity is not None
        self._identity = torch.zeros(model.identity_basis.shape[0], device=self.device)
        if identity is not None:
            self._identity = torch.as_tensor(np.asarray(identity, np.float32),
                                             device=self.device)
        self._focal: float | None = focal
        self.image_size: tuple[int, int] | None = None
        self.calibrated = identity is not None and focal is not None
        self._pending: list[Landmarks] = []
        self._pending_since: float | None = None
        self._calibration_job: Future[tuple[torch.Tensor, float, int]] | None = None
        self._prev: FitState | None = None
        self._prev_box: np.ndarray | None = None
        self._last: TrackedFrame | None = None
        self._smoother = ParamSmoother(SmoothingSettings(
            self.config.smoothing_min_cutoff, self.config.smoothing_beta,
            self.config.smoothing_d_cutoff)) if self.config.smoothing else None
        self._detector: LandmarkSource | None = None
        self._shape_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._graph: GraphedWarmFit | None = None
        self._graph_failed = False
        self._camera_cache: dict[int, tuple[object, Camera]] = {}
        self._eyelook = self.fitter.lm.eyelook.cpu().numpy()
        if image_size is not None:
            self._set_image_size(image_size)

    # ---- calibration state ---------------------------------------------------------------
    @property
    def identity(self) -> np.ndarray:
        """Identity coefficients (100,) in use."""
        return self._identity.detach().cpu().numpy().astype(np.float32)

    @property
    def focal(self) -> float:
        """Focal length in pixels in use."""
        if self._focal is None:
            raise FrameError("the tracker has seen no frame yet: focal length unknown")
        return float(self._focal)

    @property
    def principal_point(self) -> np.ndarray:
        """(cx, cy) pixels: the image centre, or the fixed one (scaled with the image)."""
        if self.image_size is None:
            raise FrameError("the tracker has seen no frame yet: image size unknown")
        h, w = self.image_size
        if self._fixed_principal is not None:
            point, size = self._fixed_principal
            scale = 1.0 if size is None else max(h, w) / max(size)
            return (point * scale).astype(np.float32)
        return np.asarray([w / 2.0, h / 2.0], np.float32)

    def _set_image_size(self, size: tuple[int, int]) -> None:
        h, w = int(size[0]), int(size[1])
        if self.image_size is not None and self._focal is not None:
            # a new resolution of the same camera: scale the focal length along
            self._focal *= max(h, w) / max(self.image_size)
            self.reset()
        elif self._focal is None:
            self._focal = self.config.focal_guess * max(h, w)
        self.image_size = (h, w)

    def _camera(self, batch: int = 1) -> Camera:
        key = (self.focal, self.image_size)
        cached = self._camera_cache.get(batch)
        if cached is None or cached[0] != key:
            cached = (key, Camera.make(self.focal, self.principal_point, batch, self.device))
            self._camera_cache[batch] = cached
        return cached[1]

    def reset(self) -> None:
        """Lose the track: the next face starts from the regressor."""
        self._prev = None
        self._prev_box = None
        if self._smoother is not None:
            self._smoother.reset()

    def recalibrate(self) -> None:
        """Fit identity and focal length again over the next `calibration_seconds`."""
        self.calibrated = False
        self._pending = []
        self._pending_since = None
        self._calibration_job = None  # a running one is dropped

    def set_calibration(self, identity: np.ndarray, focal: float) -> None:
        """Freeze identity (100,) and focal length (px) to given values."""
        self._identity = torch.as_tensor(np.asarray(identity, np.float32), device=self.device)
        self._focal = float(focal)
        self.calibrated = True
        self._pending = []

    def calibrate(self, frames: Sequence[Landmarks]) -> None:
        """Fit identity and focal length jointly over keyframes chosen among `frames` (those
        with a face), then freeze them. Without a face in any frame nothing changes."""
        found = [f for f in frames if f.found]
        if not found:
            return
        if self.image_size is None:
            self._set_image_size(found[0].image_size)
        result = self._calibration(found, self.focal, self._identity)
        self._apply_calibration(*result)

    def _calibration(self, found: list[Landmarks], focal: float, identity: torch.Tensor
                     ) -> tuple[torch.Tensor, float, int]:
        """(identity, focal, keyframe count) fitted over keyframes of `found` (no state is
        changed: the live tracker runs this in a background thread)."""
        obs = torch.as_tensor(np.stack([f.points for f in found]), device=self.device)
        principal = self.principal_point
        cam_all = Camera.make(focal, principal, len(found), self.device)
        guess = self.regressor.predict(obs, cam_all.focal, cam_all.principal)
        times = np.linspace(0.0, 1.0, len(found))
        keys = select_keyframes(matrix_to_axis_angle(guess.rotation.cpu().numpy()), times,
                                self.config.keyframes)
        idx = torch.as_tensor(keys, device=self.device)
        obs_k = obs[idx]
        k = len(keys)
        cam = Camera.make(focal, principal, k, self.device)
        ident0 = identity.clone() if self._fixed_identity else guess.identity[idx].mean(0)
        expr = guess.expression[idx]
        rot = guess.rotation[idx]
        pts = self.fitter.lm.points(ident0[None].expand(k, -1), expr)[:, :468]
        init = FitState(rot, initial_translation(pts, rot, obs_k[:, :468], cam), expr,
                        torch.zeros(k, 2, 2, device=self.device))
        init, _ = self.fitter.fit(obs_k, init, ident0, cam, self.config.iterations_cold,
                                  damping=1e-2)
        init.gaze = self.fitter.fit_gaze(obs_k, init, ident0, cam)
        if self._fixed_identity and self._fixed_focal is not None:
            return ident0, focal, k
        ident, cam_fit, _ = self.fitter.calibrate(
            obs_k, init, ident0, cam, self.config.iterations_calibration,
            fit_focal=self._fixed_focal is None, fit_identity=not self._fixed_identity)
        return ident, float(cam_fit.focal[0]), k

    def _apply_calibration(self, identity: torch.Tensor, focal: float, keyframes: int) -> None:
        if not self._fixed_identity:
            self._identity = identity
        if self._fixed_focal is None:
            self._focal = focal
        self.calibrated = True
        self._pending = []
        self._pending_since = None
        self.reset()  # the next frame starts afresh with the new identity
        log.info("calibrated on %d keyframes: focal %.1f px, |identity| %.2f", keyframes,
                 self.focal, float(self._identity.norm()))

    # ---- per frame -----------------------------------------------------------------------
    def track(self, frame: np.ndarray, timestamp: float) -> TrackedFrame:
        """Landmarks (`tracker.landmarks` backend, streaming) and fit of one RGB frame (H, W, 3) uint8."""
        if self._detector is None:
            self._detector = make_landmark_detector(self.config, self.device)
        return self.step(self._detector(frame), timestamp)

    def close(self) -> None:
        """Release the landmark detector (if `track` made one)."""
        if self._detector is not None:
            self._detector.close()
            self._detector = None

    def step(self, landmarks: Landmarks, timestamp: float) -> TrackedFrame:
        """Fit one frame's landmarks; no face gives valid=False (never an exception)."""
        if self.image_size != tuple(landmarks.image_size):
            self._set_image_size(landmarks.image_size)
        if not landmarks.found or not np.all(np.isfinite(landmarks.points)):
            self.reset()
            return self._invalid(timestamp)
        if not self.calibrated:
            self._collect(landmarks, timestamp)
        obs = torch.as_tensor(landmarks.points, device=self.device)[None]
        cam = self._camera()
        box = landmarks.box
        cfg = self.config
        prev = self._prev
        cold = prev is None or self._prev_box is None or \
            box_iou(self._prev_box, box) < cfg.cut_iou
        with_gaze = False
        if prev is not None and not cold:
            graphed = self._graphed()
            if graphed is not None:  # CUDA: one graph replay for fit and gaze
                state, info = graphed(obs, prev, self._identity, cam)
                with_gaze = True
            else:
                state, info = self.fitter.fit(obs, prev, self._identity, cam,
                                              cfg.iterations_warm, previous=prev)
            if not float(info.residual[0]) <= cfg.restart_residual:
                cold_state, cold_info = self._cold(obs, cam)
                if float(cold_info.cost[0]) < float(info.cost[0]):
                    state, info, cold, with_gaze = cold_state, cold_info, True, False
        else:
            state, info = self._cold(obs, cam)
        if not with_gaze:
            held = None if cold or prev is None else prev.gaze
            state.gaze = self.fitter.fit_gaze(obs, state, self._identity, cam, previous=held)
            state = self.fitter.with_gaze(state)
        values = torch.cat([state.rotation.reshape(1, 9), state.translation,
                            state.expression, state.gaze.reshape(1, 4)], 1)[0]
        values = values.detach().cpu().numpy().astype(np.float64)  # one transfer
        if not np.all(np.isfinite(values)):
            self.reset()
            return self._invalid(timestamp)
        self._prev = state
        self._prev_box = box
        return self._output(values, timestamp, float(info.residual_px[0]), info.iterations,
                            cold)

    def use_fit_graph(self, graph: GraphedWarmFit) -> None:
        """Replay warm fits from `graph`, captured beforehand (one frame, this config's
        `iterations_warm`), instead of capturing one at the first warm frame: a process
        where other threads run CUDA work captures its graphs before they start."""
        if graph.batch != 1 or graph.iterations != self.config.iterations_warm:
            raise ValueError(f"the fit graph replays {graph.batch} frame(s) of "
                             f"{graph.iterations} iterations; this tracker fits 1 frame of "
                             f"{self.config.iterations_warm}")
        self._graph, self._graph_failed = graph, False

    def _graphed(self) -> GraphedWarmFit | None:
        """The CUDA-graph warm fit (made on first use; None on the CPU or when off)."""
        if self.device.type != "cuda" or not self.config.cuda_graphs or self._graph_failed:
            return None
        if self._graph is None:
            try:
                self._graph = GraphedWarmFit(self.fitter, 1, self.config.iterations_warm)
            except Exception as err:  # noqa: BLE001 - fall back to eager launches
                log.warning("CUDA graph of the warm fit unavailable (%s); eager fits", err)
                self._graph_failed = True
                return None
        return self._graph

    def _cold(self, obs: torch.Tensor, cam: Camera) -> tuple[FitState, FitInfo]:
        guess = self.regressor.predict(obs, cam.focal, cam.principal)
        pts = self.fitter.lm.points(self._identity[None], guess.expression,
                                    shape=self._shape())[:, :468]
        init = FitState(guess.rotation, initial_translation(pts, guess.rotation,
                                                            obs[:, :468], cam),
                        guess.expression, torch.zeros(1, 2, 2, device=self.device))
        return self.fitter.fit(obs, init, self._identity, cam, self.config.iterations_cold,
                               damping=1e-2)

    def _shape(self) -> torch.Tensor:
        """The identity's resting landmarks [478, 3] (cached per identity)."""
        if self._shape_cache is None or self._shape_cache[0] is not self._identity:
            self._shape_cache = (self._identity, self.fitter.lm.shape(self._identity))
        return self._shape_cache[1]

    def _collect(self, landmarks: Landmarks, timestamp: float) -> None:
        """Live calibration: gather frames; after calibration_seconds fit identity and focal
        length over them, in a background thread (`calibrate_in_background`) so that the
        stream does not stall; the result is applied at the next frame after it is done."""
        job = self._calibration_job
        if job is not None:
            if job.done():
                self._calibration_job = None
                try:
                    self._apply_calibration(*job.result())
                except Exception as err:  # noqa: BLE001 - a failed fit: try again later
                    log.warning("live calibration failed (%s); collecting again", err)
                    self._pending, self._pending_since = [], None
            return
        if self._pending_since is None:
            self._pending_since = timestamp
        self._pending.append(landmarks)
        enough = len(self._pending) >= _MIN_CALIBRATION_FRAMES
        if enough and timestamp - self._pending_since >= self.config.calibration_seconds:
            frames, self._pending = self._pending, []
            if not self.config.calibrate_in_background:
                self.calibrate(frames)
                return
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dvp-calibration")
            self._calibration_job = pool.submit(self._calibration, frames, self.focal,
                                                self._identity.clone())
            pool.shutdown(wait=False)

    def wait_for_calibration(self, timeout: float | None = None) -> bool:
        """Block until a running live calibration is done and apply it; True if calibrated."""
        job = self._calibration_job
        if job is not None:
            job.result(timeout)
            self._calibration_job = None
            self._apply_calibration(*job.result())
        return self.calibrated

    def _output(self, values: np.ndarray, timestamp: float, residual: float,
                iterations: int, cold: bool) -> TrackedFrame:
        n = len(self.fitter.lm.expression_names)
        rot = matrix_to_axis_angle(values[:9].reshape(3, 3))
        trans, expr, gaze = values[9:12], values[12:12 + n], values[12 + n:].reshape(2, 2)
        if self._smoother is not None:
            rot, trans, expr, gaze = self._smoother.smooth(rot, trans, expr, gaze, timestamp)
            expr = expr.copy()
            expr[self._eyelook] = gaze_to_eyelook(np.asarray(gaze, np.float32))
        out = TrackedFrame(np.asarray(rot, np.float32), np.asarray(trans, np.float32),
                           np.asarray(expr, np.float32), np.asarray(gaze, np.float32), True,
                           float(timestamp), residual, iterations, cold)
        self._last = out
        return out

    def fitted_points(self, frames: Sequence[TrackedFrame]) -> np.ndarray:
        """The model's 478 landmarks [T, 478, 2] (pixels, irises turned by gaze) of tracked
        frames, with this tracker's identity and camera."""
        if not frames:
            return np.zeros((0, 478, 2), np.float32)
        return params_landmarks(self.fitter.lm, self.to_params(frames), self.device)

    def _invalid(self, timestamp: float) -> TrackedFrame:
        last = self._last
        if last is None:
            n = len(self.fitter.lm.expression_names)
            return TrackedFrame(np.zeros(3, np.float32), np.asarray([0, 0, 50.0], np.float32),
                                np.zeros(n, np.float32), np.zeros((2, 2), np.float32), False,
                                float(timestamp), float("nan"), 0, False)
        return TrackedFrame(last.rotation, last.translation, last.expression, last.gaze, False,
                            float(timestamp), float("nan"), 0, False)

    def to_params(self, frames: Sequence[TrackedFrame]) -> FaceParams:
        """FaceParams of tracked frames (this tracker's identity and camera)."""
        if self.image_size is None:
            raise FrameError("the tracker has seen no frame: no parameters to write")
        names = list(self.fitter.lm.expression_names)
        n = len(frames)
        base = replace(FaceParams.empty(n, names, self.image_size, self.focal,
                                        np.asarray([f.timestamp for f in frames], np.float32)),
                       principal_point=self.principal_point)
        if n == 0:
            return replace(base, identity=self.identity)
        return replace(
            base,
            identity=self.identity,
            rotation=np.stack([f.rotation for f in frames]),
            translation=np.stack([f.translation for f in frames]),
            expression=np.stack([f.expression for f in frames]),
            gaze=np.stack([f.gaze for f in frames]),
            valid=np.asarray([f.valid for f in frames], bool),
        )


def select_keyframes(rotations: np.ndarray, times: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to `count` frames spread over head poses (axis-angle [N, 3], radians)
    and time ([N] in [0, 1]): farthest-point sampling from the most frontal frame, with
    20 degrees of pose worth the whole time span."""
    n = len(rotations)
    if n <= count:
        return np.arange(n)
    feats = np.concatenate([np.degrees(rotations), 20.0 * np.asarray(times)[:, None]], 1)
    chosen = [int(np.argmin(np.linalg.norm(rotations, axis=1)))]
    dist = np.linalg.norm(feats - feats[chosen[0]], axis=1)
    while len(chosen) < count:
        nxt = int(np.argmax(dist))
        chosen.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(feats - feats[nxt], axis=1))
    return np.sort(np.asarray(chosen))


def track_landmarks(landmarks: Sequence[Landmarks], timestamps: Sequence[float],
                    model: FaceModel, config: TrackerConfig | None = None,
                    device: torch.device | str = "cpu", regressor: Regressor | None = None,
                    focal: float | None = None,
                    progress: Callable[[int], None] | None = None,
                    identity: np.ndarray | None = None
                    ) -> tuple[FaceParams, list[TrackedFrame]]:
    """Offline tracking of a whole sequence: calibrate identity and focal length over
    keyframes of all frames with a face (either given: kept), then fit frame by frame.
    Returns the parameters and the per-frame results. `progress(1)` is called after each
    frame."""
    if len(landmarks) != len(timestamps):
        raise ValueError(f"{len(landmarks)} landmark frames but {len(timestamps)} timestamps")
    tracker = FaceTracker(model, config, device, regressor, focal=focal, identity=identity)
    if landmarks:
        tracker._set_image_size(landmarks[0].image_size)
    tracker.calibrate(landmarks)
    tracker.calibrated = True  # frozen, also when no frame had a face
    frames = []
    for lm, t in zip(landmarks, timestamps):
        frames.append(tracker.step(lm, float(t)))
        if progress is not None:
            progress(1)
    return tracker.to_params(frames), frames
