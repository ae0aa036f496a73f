"""Settings of the tracker stage (section `tracker` of the YAML config)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrackerConfig:
    """Tracker settings; every field can be set with `--set tracker.NAME=VALUE`."""

    #: MediaPipe minimum detection / tracking confidence.
    min_detection_confidence: float = 0.5
    min_tracking_confidence: float = 0.5
    #: Levenberg-Marquardt iterations per frame when warm-started / cold-started.
    iterations_warm: int = 3
    iterations_cold: int = 12
    #: Robust (Huber) loss threshold on landmark reprojection, pixels.
    huber_px: float = 3.0
    #: Weights of the priors: identity N(0,1), expression sparsity (L1), temporal smoothness.
    identity_weight: float = 1.0
    expression_sparsity: float = 0.02
    temporal_weight: float = 0.5
    #: Number of keyframes over which identity and focal length are fitted, then frozen.
    keyframes: int = 24
    #: Seconds of live video used to calibrate identity and focal length.
    calibration_seconds: float = 2.0
    #: One-Euro filter: minimum cutoff (Hz), speed coefficient, derivative cutoff (Hz).
    smoothing_min_cutoff: float = 1.5
    smoothing_beta: float = 0.05
    smoothing_d_cutoff: float = 1.0
