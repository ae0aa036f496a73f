"""The pieces of the other packages a live or offline reenactment is made of.

- `LoadedTarget`: one target directory made ready to drive, once per server (shared by its
  sessions): `generator.target.TargetDir` (checked), the face model, the target's
  `renderer.conditioning.ConditioningRenderer` (its albedo) and the generator runtime of its
  latest checkpoint (`generator.checkpoint.load_generator` + `generator.runtime.make_runtime`,
  backend from `generator.backend`, TensorRT engine from `TDIR/engine/` when present).
  Per-target constants are built here once, never per frame. Render and generator calls of
  all sessions are serialised by `lock` (one GPU stream, CUDA-graph buffers).
- `make_session_stages(target, config)`: one session's source tracker and transfer
  (the integration points with `tracker`: see `TrackerStage` and `TransferStage`).
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

from generator.errors import TargetError
from streamer.config import Config
from streamer.controls import Controls
from streamer.pipeline import SessionStages
from tracker.errors import DvpError
from tracker.params import FaceParams

log = logging.getLogger(__name__)


class StageUnavailableError(DvpError):
    """A pipeline stage whose package has not been delivered (or failed to import)."""


def load_runtime(root: Path, size: int, n_w: int, backend: str, device: torch.device) -> Any:
    """The generator runtime of the latest checkpoint in `root/checkpoints`.

    Raises TargetError when there is no checkpoint or its network does not match the
    target's resolution and window; BackendError (generator.errors) for a backend that
    cannot run here.
    """
    from generator.checkpoint import latest_checkpoint, load_generator
    from generator.export import ENGINE_NAME
    from generator.runtime import make_runtime

    path = latest_checkpoint(root / "checkpoints")
    if path is None:
        raise TargetError(f"{root} has no trained generator in {root / 'checkpoints'}: "
                          f"run 'dvp train {root}' first")
    model = load_generator(path)
    if (model.size, model.n_w) != (size, n_w):
        raise TargetError(f"{path} holds a generator for {model.size} px and a window of "
                          f"{model.n_w}, but the target is {size} px with a window of {n_w}")
    engine = root / "engine" / ENGINE_NAME
    runtime = make_runtime(model, backend, device, engine=engine if engine.is_file() else None)
    log.info("generator %s on %s (backend %s)", path.name, device, runtime.backend)
    return runtime


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
        with np.load(self.dir.neutral_path, allow_pickle=False) as data:
            self.neutral = {k: data[k] for k in data.files}
        self.rest = rest_params(self.params, self.neutral, self.eyelook_index)
        if conditioner is None:
            from renderer.conditioning import ConditioningRenderer

            conditioner = ConditioningRenderer(face_model, self.dir.albedo(), self.size, device,
                                               rasterizer=config.renderer.rasterizer)
        self.conditioner = conditioner
        if runtime is None:
            runtime = load_runtime(self.root, self.size, self.n_w, config.generator.backend,
                                   device)
        self.runtime = runtime
        self.lock = threading.Lock()
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


# ---- the session stages: integration points with `tracker` ---------------------------------
class TrackerStage:
    """Source landmarks (tracker.landmarks.LandmarkDetector, streaming) and the live fit.

    INTEGRATION POINT: the live fit (identity and focal calibrated over the first seconds,
    warm-started, smoothed) is the Tracker issue's; this class calls it as
    `fit(landmarks, timestamp) -> FaceParams | None` on the object `_live_fitter` makes.
    """

    def __init__(self, face_model: Any, config: Config, device: torch.device) -> None:
        from tracker.landmarks import LandmarkDetector

        tc = config.tracker
        self.detector = LandmarkDetector(stream=True,
                                         min_detection_confidence=tc.min_detection_confidence,
                                         min_tracking_confidence=tc.min_tracking_confidence)
        try:
            self.fit = _live_fitter(face_model, config, device)
        except BaseException:
            self.detector.close()
            raise

    def __call__(self, rgb: np.ndarray, timestamp: float,
                 stage_ms: dict[str, float]) -> FaceParams | None:
        tick = time.perf_counter()
        landmarks = self.detector(rgb)
        tock = time.perf_counter()
        stage_ms["landmarks"] = (tock - tick) * 1e3
        params = self.fit(landmarks, timestamp)
        stage_ms["fit"] = (time.perf_counter() - tock) * 1e3
        return params

    def close(self) -> None:
        self.detector.close()


def _live_fitter(face_model: Any, config: Config, device: torch.device) -> Any:
    """The tracker's live fitter for one stream (INTEGRATION POINT, see TrackerStage)."""
    try:
        from tracker.live import LiveFitter  # type: ignore[import-not-found]
    except ImportError as err:
        raise StageUnavailableError(
            "the live face fit (tracker.live.LiveFitter, Tracker issue) is not available: "
            f"{err}") from err
    return LiveFitter(face_model, config.tracker, device)


class TransferStage:
    """Transfer of the source's parameters onto the target, relative to both neutrals.

    INTEGRATION POINT: tracker.transfer (Tracker issue) does the modes; this class keeps the
    session's source-neutral calibration and calls it.
    """

    def __init__(self, target: LoadedTarget, config: Config) -> None:
        try:
            from tracker import transfer  # type: ignore[attr-defined]
        except ImportError as err:
            raise StageUnavailableError(
                f"the transfer (tracker.transfer, Tracker issue) is not available: {err}"
            ) from err
        self._transfer = transfer
        self.target = target
        self.config = config
        self._source_neutral: FaceParams | None = None
        self._calibrate = True

    def set_neutral(self) -> None:
        self._calibrate = True

    def __call__(self, source: FaceParams, controls: Controls) -> FaceParams:
        if self._calibrate:
            self._source_neutral = source
            self._calibrate = False
        raise StageUnavailableError("tracker.transfer is not wired yet")

    def rest(self, controls: Controls) -> FaceParams:
        raise StageUnavailableError("tracker.transfer is not wired yet")


def make_session_stages(target: LoadedTarget, config: Config) -> SessionStages:
    """One session's tracker and transfer (call it in the session's worker thread)."""
    tracker = TrackerStage(target.face_model, config, target.device)
    try:
        return SessionStages(tracker=tracker, retarget=TransferStage(target, config))
    except BaseException:
        tracker.close()
        raise
