"""One-Euro filter: lag at rest within one frame, jitter reduced, resets."""

from __future__ import annotations

import numpy as np
import pytest

from tracker.config import TrackerConfig
from tracker.smoothing import OneEuroFilter, ParamSmoother, SmoothingSettings

FPS = 30.0


def _lag_frames(f: OneEuroFilter, speed: float) -> float:
    """Steady-state delay (frames) of the filter on a ramp of `speed` units per second."""
    out = []
    for i in range(300):
        out.append(float(f(np.asarray([speed * i / FPS]), i / FPS)[0]))
    lag_units = speed * 299 / FPS - out[-1]
    return lag_units / (speed / FPS)


def test_default_lag_at_rest_within_one_frame() -> None:
    cfg = TrackerConfig()
    f = OneEuroFilter(cfg.smoothing_min_cutoff, cfg.smoothing_beta, cfg.smoothing_d_cutoff)
    assert _lag_frames(f, 1e-4) <= 1.0  # a slow drift: the cutoff stays at its minimum
    f.reset()
    assert _lag_frames(f, 1.0) < 0.5  # moving: the cutoff rises, the lag shrinks


def test_lag_follows_the_minimum_cutoff() -> None:
    lag = _lag_frames(OneEuroFilter(min_cutoff=1.0, beta=0.0), 0.01)
    assert lag == pytest.approx(FPS / (2 * np.pi * 1.0), rel=0.1)  # 1 / (2 pi fc) seconds


def test_jitter_at_rest_is_reduced() -> None:
    rng = np.random.default_rng(0)
    noise = rng.normal(0, 0.01, (300, 3))
    f = OneEuroFilter()
    out = np.stack([f(x, i / FPS) for i, x in enumerate(noise)])
    assert out[30:].std() < 0.75 * noise[30:].std()


def test_first_sample_passes_and_reset_forgets() -> None:
    f = OneEuroFilter()
    np.testing.assert_allclose(f(np.asarray([5.0]), 0.0), [5.0])
    f(np.asarray([5.0]), 1 / FPS)
    f.reset()
    np.testing.assert_allclose(f(np.asarray([-3.0]), 2 / FPS), [-3.0])
    # a repeated timestamp returns the last value, never NaN
    assert np.isfinite(f(np.asarray([1.0]), 2 / FPS)).all()


def test_bad_settings() -> None:
    with pytest.raises(ValueError, match="min_cutoff and d_cutoff must be > 0"):
        OneEuroFilter(min_cutoff=0.0)


def test_param_smoother_keeps_rotation_continuous() -> None:
    sm = ParamSmoother(SmoothingSettings())
    axis = np.asarray([0.0, 1.0, 0.0])
    expr = np.zeros(53)
    gaze = np.zeros((2, 2))
    a = sm.smooth(axis * (np.pi - 0.01), np.zeros(3), expr, gaze, 0.0)[0]
    # a turn just past pi comes written about the opposite axis: filtered, it stays put
    b = sm.smooth(-axis * (np.pi - 0.01), np.zeros(3), expr, gaze, 1 / FPS)[0]
    assert np.linalg.norm(b - a) < 0.05 and float(b @ axis) > 3.0
    out = sm.smooth(axis * 0.0, np.zeros(3), np.full(53, 2.0), gaze, 2 / FPS)[2]
    assert out.max() <= 1.0  # expressions stay in [0, 1]
