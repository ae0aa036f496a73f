"""Gaze from the iris points: DESIGN.md's signs, exactness, blinks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracker.config import TrackerConfig
from tracker.face_model import IRIS_LEFT, IRIS_RIGHT, gaze_to_eyelook
from tracker.fitting import Camera, FitState, LandmarkFitter, project
from tracker.rotation import axis_angle_to_matrix

CAM = Camera.make(600.0, np.asarray([320.0, 240.0], np.float32), 1, "cpu")


def _face(lm, gaze, rotation=(0.0, 0.0, 0.0), blink=0.0):  # type: ignore[no-untyped-def]
    """A face at 50 cm with gaze [2, 2]: its state and projected landmarks [1, 478, 2]."""
    g = torch.as_tensor(gaze, dtype=torch.float32)[None]
    expr = torch.zeros(1, 53)
    expr[:, lm.eyelook] = gaze_to_eyelook(g)
    for name in ("eyeBlink_L", "eyeBlink_R"):
        expr[0, lm.expression_names.index(name)] = blink
    rot = axis_angle_to_matrix(torch.tensor([rotation]))
    trans = torch.tensor([[1.0, -2.0, 50.0]])
    pts = lm.points(torch.zeros(1, 100), expr, g)
    return FitState(rot, trans, expr, torch.zeros(1, 2, 2)), project(pts, rot, trans, CAM)


@pytest.fixture(scope="module")
def fitter(landmark_model):  # type: ignore[no-untyped-def]
    return LandmarkFitter(landmark_model, TrackerConfig())


def test_signs_follow_design(fitter, landmark_model) -> None:  # type: ignore[no-untyped-def]
    """yaw > 0 toward the subject's left: the irises move to the image's right (a frontal
    face); pitch > 0 up: the irises move up (smaller v); eye 0 is the subject's left,
    MediaPipe's 473-477, on the image's right."""
    _, rest = _face(landmark_model, [[0.0, 0.0], [0.0, 0.0]])
    state, left = _face(landmark_model, [[0.3, 0.0], [0.3, 0.0]])
    _, up = _face(landmark_model, [[0.0, 0.25], [0.0, 0.25]])
    assert float(left[0, IRIS_LEFT, 0].mean() - rest[0, IRIS_LEFT, 0].mean()) > 2.0
    assert float(up[0, IRIS_RIGHT, 1].mean() - rest[0, IRIS_RIGHT, 1].mean()) < -2.0
    assert float(rest[0, IRIS_LEFT, 0].mean()) > float(rest[0, IRIS_RIGHT, 0].mean())
    ident = torch.zeros(100)
    g_left = fitter.fit_gaze(left, state, ident, CAM)
    g_up = fitter.fit_gaze(up, state, ident, CAM)
    assert (g_left[0, :, 0] > 0.2).all() and g_left[0, :, 1].abs().max() < 0.05
    assert (g_up[0, :, 1] > 0.15).all() and g_up[0, :, 0].abs().max() < 0.05


@pytest.mark.parametrize("gaze", [[0.2, -0.1], [-0.35, 0.2], [0.0, 0.3]])
@pytest.mark.parametrize("rotation", [(0.0, 0.0, 0.0), (0.2, -0.5, 0.1)])
def test_exact_on_clean_landmarks(fitter, landmark_model, gaze, rotation) -> None:  # type: ignore[no-untyped-def]
    truth = [gaze, gaze]
    state, obs = _face(landmark_model, truth, rotation)
    got = fitter.fit_gaze(obs, state, torch.zeros(100), CAM)
    # the weak priors toward looking ahead take up to ~0.3 degree at 20 degrees
    np.testing.assert_allclose(got[0].numpy(), truth, atol=np.radians(0.4))


def test_closed_eyes_hold_the_previous_gaze(fitter, landmark_model) -> None:  # type: ignore[no-untyped-def]
    state, obs = _face(landmark_model, [[0.3, 0.1], [0.3, 0.1]], blink=1.0)
    previous = torch.tensor([[[-0.1, 0.05], [-0.1, 0.05]]])
    got = fitter.fit_gaze(obs, state, torch.zeros(100), CAM, previous=previous)
    torch.testing.assert_close(got, previous, atol=1e-3, rtol=0)
