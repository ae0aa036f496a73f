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
from dataclasses import dataclass, replace

import numpy as np
import torch

from tracker.config import TrackerConfig
from tracker.face_model import FaceModel, gaze_to_eyelook
from tracker.fitting import (
    REF_RADIUS_PX,
    Camera,
    FitInfo,
    FitState,
    LandmarkFitter,
    face_scale,
    initial_translation,
    project,
)
from tracker.geometry import axis_angle_to_matrix, matrix_to_axis_angle
from tracker.landmarks import FrameError, LandmarkDetector, Landmarks, box_iou
from tracker.params import FaceParams
from tracker.regressor import Regressor, load_or_train, settings_from_config
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
    iterations: Levenberg-Marquardt iterations run; cold: started from the regressor;
    points (478, 2) the fitted landmarks in pixels (irises rotated by gaze).
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
    points: np.ndarray


class FaceTracker:
    """Live face tracker for one stream of frames of one size (see the module doc).

    model: the face model; device: torch device of the fit; regressor: a trained one
    (default: the cached one, trained on first use); image_size (h, w): known in advance
    or taken from the first frame; focal (px) and identity (100,): fixed values that skip
    their calibration (both given: no calibration at all).
    """

    def __init__(self, model: FaceModel, config: TrackerConfig | None = None,
                 device: torch.device | str = "cpu", regressor: Regressor | None = None,
                 image_size: tuple[int, int] | None = None, focal: float | None = None,
                 identity: np.ndarray | None = None) -> None:
        self.config = config or TrackerConfig()
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
        self._prev: FitState | None = None
        self._prev_box: np.ndarray | None = None
        self._last: TrackedFrame | None = None
        self._smoother = ParamSmoother(SmoothingSettings(
            self.config.smoothing_min_cutoff, self.config.smoothing_beta,
            self.config.smoothing_d_cutoff)) if self.config.smoothing else None
        self._detector: LandmarkDetector | None = None
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
        """(cx, cy) pixels: the image centre."""
        if self.image_size is None:
            raise FrameError("the tracker has seen no frame yet: image size unknown")
        h, w = self.image_size
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
        return Camera.make(self.focal, self.principal_point, batch, self.device)

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
        obs = torch.as_tensor(np.stack([f.points for f in found]), device=self.device)
        cam_all = self._camera(len(found))
        guess = self.regressor.predict(obs, cam_all.focal, cam_all.principal)
        times = np.linspace(0.0, 1.0, len(found))
        keys = select_keyframes(matrix_to_axis_angle(guess.rotation.cpu().numpy()), times,
                                self.config.keyframes)
        idx = torch.as_tensor(keys, device=self.device)
        obs_k = obs[idx]
        k = len(keys)
        cam = self._camera(k)
        ident0 = self._identity.clone() if self._fixed_identity else \
            guess.identity[idx].mean(0)
        expr = guess.expression[idx]
        rot = guess.rotation[idx]
        lm = self.fitter.lm
        pts = lm.points(ident0[None].expand(k, -1), expr)[:, :468]
        init = FitState(rot, initial_translation(pts, rot, obs_k[:, :468], cam), expr,
                        torch.zeros(k, 2, 2, device=self.device))
        init, _ = self.fitter.fit(obs_k, init, ident0, cam, self.config.iterations_cold,
                                  damping=1e-2)
        init.gaze = self.fitter.fit_gaze(obs_k, init, ident0, cam, iterations=4)
        if self._fixed_identity and self._fixed_focal is not None:
            self.calibrated = True
            return
        ident, cam_fit, _ = self.fitter.calibrate(
            obs_k, init, ident0, cam, self.config.iterations_calibration,
            fit_focal=self._fixed_focal is None)
        if not self._fixed_identity:
            self._identity = ident
        if self._fixed_focal is None:
            self._focal = float(cam_fit.focal[0])
        self.calibrated = True
        self._pending = []
        self.reset()  # the next frame starts afresh with the new identity
        log.info("calibrated on %d keyframes: focal %.1f px, |identity| %.2f", k,
                 self.focal, float(self._identity.norm()))

    # ---- per frame -----------------------------------------------------------------------
    def track(self, frame: np.ndarray, timestamp: float) -> TrackedFrame:
        """Landmarks (MediaPipe, streaming) and fit of one RGB frame (H, W, 3) uint8."""
        if self._detector is None:
            self._detector = LandmarkDetector(
                stream=True, max_faces=self.config.max_faces,
                min_detection_confidence=self.config.min_detection_confidence,
                min_tracking_confidence=self.config.min_tracking_confidence)
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
        cold = self._prev is None or self._prev_box is None or \
            box_iou(self._prev_box, box) < cfg.cut_iou
        state, info = None, None
        if not cold:
            assert self._prev is not None
            state, info = self.fitter.fit(obs, self._prev, self._identity, cam,
                                          cfg.iterations_warm, previous=self._prev)
            scale = REF_RADIUS_PX / float(face_scale(obs)[0])
            if not float(info.residual_px[0]) * scale <= cfg.restart_residual:
                cold_state, cold_info = self._cold(obs, cam)
                if float(cold_info.cost[0]) < float(info.cost[0]):
                    state, info, cold = cold_state, cold_info, True
        if cold or state is None or info is None:
            state, info = self._cold(obs, cam)
            cold = True
        held = None if cold or self._prev is None else self._prev.gaze
        gaze = self.fitter.fit_gaze(obs, state, self._identity, cam, previous=held,
                                    iterations=5 if cold else 3)
        state = self.fitter.with_gaze(FitState(state.rotation, state.translation,
                                               state.expression, gaze))
        if not _finite(state):
            self.reset()
            return self._invalid(timestamp)
        self._prev = state
        self._prev_box = box
        return self._output(state, landmarks, timestamp, float(info.residual_px[0]),
                            info.iterations, cold)

    def _cold(self, obs: torch.Tensor, cam: Camera) -> tuple[FitState, FitInfo]:
        guess = self.regressor.predict(obs, cam.focal, cam.principal)
        pts = self.fitter.lm.points(self._identity[None], guess.expression)[:, :468]
        init = FitState(guess.rotation, initial_translation(pts, guess.rotation,
                                                            obs[:, :468], cam),
                        guess.expression, torch.zeros(1, 2, 2, device=self.device))
        return self.fitter.fit(obs, init, self._identity, cam, self.config.iterations_cold,
                               damping=1e-2)

    def _collect(self, landmarks: Landmarks, timestamp: float) -> None:
        """Live calibration: gather frames, calibrate after calibration_seconds."""
        if self._pending_since is None:
            self._pending_since = timestamp
        self._pending.append(landmarks)
        enough = len(self._pending) >= _MIN_CALIBRATION_FRAMES
        if enough and timestamp - self._pending_since >= self.config.calibration_seconds:
            self.calibrate(self._pending)

    def _output(self, state: FitState, landmarks: Landmarks, timestamp: float,
                residual: float, iterations: int, cold: bool) -> TrackedFrame:
        rot = matrix_to_axis_angle(state.rotation[0].detach().cpu().numpy())
        trans = state.translation[0].detach().cpu().numpy()
        expr = state.expression[0].detach().cpu().numpy()
        gaze = state.gaze[0].detach().cpu().numpy()
        if self._smoother is not None:
            eyelook = self.fitter.lm.eyelook.cpu().numpy()
            rot, trans, expr, gaze = self._smoother.smooth(rot, trans, expr, gaze, timestamp)
            expr = expr.copy()
            expr[eyelook] = gaze_to_eyelook(gaze)
        points = self.fitted_points(rot, trans, expr, gaze)
        out = TrackedFrame(np.asarray(rot, np.float32), np.asarray(trans, np.float32),
                           np.asarray(expr, np.float32), np.asarray(gaze, np.float32), True,
                           float(timestamp), residual, iterations, cold, points)
        self._last = out
        return out

    def fitted_points(self, rotation: np.ndarray, translation: np.ndarray,
                      expression: np.ndarray, gaze: np.ndarray) -> np.ndarray:
        """The model's 478 landmarks (pixels) for one frame's parameters."""
        dev = self.device
        rot = axis_angle_to_matrix(torch.as_tensor(np.asarray(rotation, np.float32),
                                                   device=dev)[None])
        pts = self.fitter.lm.points(self._identity[None],
                                    torch.as_tensor(expression, device=dev)[None],
                                    torch.as_tensor(gaze, device=dev)[None])
        proj = project(pts, rot, torch.as_tensor(translation, device=dev)[None],
                       self._camera())
        return proj[0].detach().cpu().numpy().astype(np.float32)

    def _invalid(self, timestamp: float) -> TrackedFrame:
        last = self._last
        if last is None:
            n = len(self.fitter.lm.expression_names)
            depth = 50.0
            return TrackedFrame(np.zeros(3, np.float32), np.asarray([0, 0, depth], np.float32),
                                np.zeros(n, np.float32), np.zeros((2, 2), np.float32), False,
                                float(timestamp), float("nan"), 0, False,
                                np.zeros((478, 2), np.float32))
        return TrackedFrame(last.rotation, last.translation, last.expression, last.gaze, False,
                            float(timestamp), float("nan"), 0, False, last.points)

    def to_params(self, frames: Sequence[TrackedFrame]) -> FaceParams:
        """FaceParams of tracked frames (this tracker's identity and camera)."""
        if self.image_size is None:
            raise FrameError("the tracker has seen no frame: no parameters to write")
        names = list(self.fitter.lm.expression_names)
        n = len(frames)
        base = FaceParams.empty(n, names, self.image_size, self.focal,
                                np.asarray([f.timestamp for f in frames], np.float32))
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


def _finite(state: FitState) -> bool:
    return bool(torch.isfinite(state.rotation).all() and torch.isfinite(state.translation).all()
                and torch.isfinite(state.expression).all() and torch.isfinite(state.gaze).all())


def track_landmarks(landmarks: Sequence[Landmarks], timestamps: Sequence[float],
                    model: FaceModel, config: TrackerConfig | None = None,
                    device: torch.device | str = "cpu", regressor: Regressor | None = None,
                    focal: float | None = None,
                    progress: Callable[[int], None] | None = None
                    ) -> tuple[FaceParams, list[TrackedFrame]]:
    """Offline tracking of a whole sequence: calibrate identity and focal length over
    keyframes of all frames with a face, then fit frame by frame. Returns the parameters
    and the per-frame results. `progress(1)` is called after each frame."""
    if len(landmarks) != len(timestamps):
        raise ValueError(f"{len(landmarks)} landmark frames but {len(timestamps)} timestamps")
    tracker = FaceTracker(model, config, device, regressor, focal=focal)
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
