"""The live fit for one stream: MediaPipe landmarks in, one frame of FaceParams out.

`LiveFitter(face_model, config, device)(landmarks, timestamp)` is what the live pipeline
(streamer.stages.TrackerStage) calls per frame. It wraps `FaceTracker`: warm-started fits,
identity and focal length calibrated over the first `calibration_seconds` with a face and
then frozen (`recalibrate()` starts over), One-Euro smoothing.
"""

from __future__ import annotations

import torch

from tracker.config import TrackerConfig
from tracker.face_model import FaceModel
from tracker.landmarks import Landmarks
from tracker.params import FaceParams
from tracker.regressor import Regressor
from tracker.tracker import FaceTracker, TrackedFrame


class LiveFitter:
    """Per-frame fit of one live stream (not thread-safe: one per session)."""

    def __init__(self, face_model: FaceModel, config: TrackerConfig | None = None,
                 device: torch.device | str = "cpu", regressor: Regressor | None = None
                 ) -> None:
        self.tracker = FaceTracker(face_model, config, device, regressor)
        self.last: TrackedFrame | None = None

    def __call__(self, landmarks: Landmarks, timestamp: float) -> FaceParams | None:
        """One frame's FaceParams (T = 1, valid), or None when the frame has no face."""
        frame = self.tracker.step(landmarks, timestamp)
        self.last = frame
        if not frame.valid:
            return None
        return self.tracker.to_params([frame])

    @property
    def calibrated(self) -> bool:
        """Whether identity and focal length are fitted and frozen."""
        return self.tracker.calibrated

    def recalibrate(self) -> None:
        """Fit identity and focal length again over the next seconds."""
        self.tracker.recalibrate()

    def reset(self) -> None:
        """Lose the track (the next face starts from the regressor)."""
        self.tracker.reset()
