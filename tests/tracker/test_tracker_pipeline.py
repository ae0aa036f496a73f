"""The tracker end to end on synthetic landmarks: offline, live, lost faces, bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tracker.landmarks import Landmarks
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix, matrix_to_axis_angle
from tracker.tracker import FaceTracker, select_keyframes, track_landmarks


def _rot_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ma = axis_angle_to_matrix(torch.as_tensor(a)).numpy()
    mb = axis_angle_to_matrix(torch.as_tensor(b)).numpy()
    return np.degrees(np.linalg.norm(matrix_to_axis_angle(ma @ mb.transpose(0, 2, 1)), axis=1))


def test_offline_tracking_of_a_synthetic_sequence(face_model, regressor, tracker_config,
                                                  sequence) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(tracker_config, smoothing=False)
    params, frames = track_landmarks(sequence.landmarks(), sequence.timestamps, face_model,
                                     cfg, regressor=regressor)
    assert isinstance(params, FaceParams) and params.frames == sequence.frames
    assert params.valid.all()
    assert _rot_err(params.rotation, sequence.rotation).mean() < 1.0
    assert abs(float(params.focal[0]) - sequence.focal) / sequence.focal < 0.1
    face = face_model.region_vertices("face")
    n = params.frames
    v1 = face_model.vertices(np.broadcast_to(params.identity, (n, 100)), params.expression,
                             vertex_ids=face)
    v0 = face_model.vertices(np.broadcast_to(sequence.identity, (n, 100)),
                             sequence.expression, vertex_ids=face)
    assert np.linalg.norm(v1 - v0, axis=-1).mean() * 10 < 2.0  # mm
    # the first frame starts cold, every other one warm within the warm budget
    assert frames[0].cold and not any(f.cold for f in frames[1:])
    assert all(f.iterations == cfg.iterations_warm for f in frames[1:])
    assert np.median([f.residual_px for f in frames]) < 1.5
    from tracker.face_model import gaze_to_eyelook

    np.testing.assert_allclose(params.expression[:, face_model.eyelook_indices],
                               gaze_to_eyelook(params.gaze), atol=1e-6)
    assert np.degrees(np.abs(params.gaze - sequence.gaze)).mean() < 3.0


def test_lost_face_is_invalid_and_recovers(face_model, regressor, tracker_config,
                                           sequence) -> None:  # type: ignore[no-untyped-def]
    lms = sequence.landmarks()[:20]
    for i in (8, 9, 10):
        lms[i] = Landmarks.missing(sequence.image_size)
    nan = sequence.landmarks()[11].points.copy()
    nan[5] = np.nan
    lms[11] = Landmarks(nan, 1.0, sequence.image_size)  # a damaged frame: no face either
    params, frames = track_landmarks(lms, sequence.timestamps[:20], face_model,
                                     tracker_config, regressor=regressor)
    np.testing.assert_array_equal(params.valid, [i not in (8, 9, 10, 11) for i in range(20)])
    assert frames[12].cold and frames[12].valid  # back from the regressor
    assert _rot_err(params.rotation[12:], sequence.rotation[12:20]).mean() < 2.0
    # the lost frames hold the last face, finite
    np.testing.assert_array_equal(params.rotation[9], params.rotation[7])
    assert np.isfinite(params.rotation).all() and np.isnan(frames[9].residual_px)


def test_no_face_anywhere(face_model, regressor, tracker_config) -> None:  # type: ignore[no-untyped-def]
    lms = [Landmarks.missing((120, 160))] * 4
    params, _ = track_landmarks(lms, [0.0, 0.1, 0.2, 0.3], face_model, tracker_config,
                                regressor=regressor)
    assert params.frames == 4 and not params.valid.any()
    assert np.isfinite(params.translation).all()


def test_live_calibration_and_recalibration(face_model, regressor, tracker_config,
                                            sequence) -> None:  # type: ignore[no-untyped-def]
    """Calibration after calibration_seconds with a face, in a background thread (the
    stream keeps going), applied when done; recalibrate() starts over."""
    cfg = replace(tracker_config, calibration_seconds=0.5)
    live = FaceTracker(face_model, cfg, "cpu", regressor)
    assert not live.step(Landmarks.missing(sequence.image_size), 0.0).valid
    outs = [live.step(lm, float(t) + 0.1) for lm, t in zip(sequence.landmarks()[:25],
                                                           sequence.timestamps[:25])]
    assert all(out.valid for out in outs)
    params = live.to_params(outs[-1:])
    assert isinstance(params, FaceParams) and params.frames == 1 and params.valid.all()
    assert live.wait_for_calibration(60.0) and live.calibrated
    assert np.abs(live.identity).sum() > 0  # fitted, no longer the mean face
    assert live.focal != pytest.approx(cfg.focal_guess * 640)
    live.recalibrate()
    assert not live.calibrated
    for lm, t in zip(sequence.landmarks()[25:], sequence.timestamps[25:]):
        assert live.step(lm, float(t) + 0.1).valid
    assert live.wait_for_calibration(60.0)
    # in the foreground when asked
    sync = FaceTracker(face_model, replace(cfg, calibrate_in_background=False), "cpu",
                       regressor)
    for lm, t in zip(sequence.landmarks()[:20], sequence.timestamps[:20]):
        sync.step(lm, float(t))
    assert sync.calibrated


def test_new_frame_size_rescales_the_camera(face_model, regressor, tracker_config,
                                            sequence) -> None:  # type: ignore[no-untyped-def]
    tr = FaceTracker(face_model, tracker_config, "cpu", regressor, focal=600.0,
                     identity=sequence.identity)
    tr.step(sequence.landmarks()[0], 0.0)
    half = Landmarks(sequence.noisy[1] / 2, 1.0, (240, 320))
    out = tr.step(half, 0.04)
    assert out.valid and tr.focal == pytest.approx(300.0)
    assert tr.image_size == (240, 320)


def test_keyframes_spread_over_poses() -> None:
    rot = np.zeros((100, 3))
    rot[:, 1] = np.linspace(-0.5, 0.5, 100)
    keys = select_keyframes(rot, np.linspace(0, 1, 100), 5)
    assert list(keys) == [0, 24, 49, 74, 99]  # evenly spread from the most frontal (49)
    assert list(select_keyframes(rot[:3], np.linspace(0, 1, 3), 5)) == [0, 1, 2]
