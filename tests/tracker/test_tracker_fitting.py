"""Levenberg-Marquardt fits on synthetic projected landmarks with known parameters."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from tracker.config import TrackerConfig
from tracker.face_model import gaze_to_eyelook
from tracker.fitting import (
    Camera,
    FitState,
    LandmarkFitter,
    face_scale,
    initial_translation,
    mismapped_lip_points,
    project,
)
from tracker.rotation import axis_angle_to_matrix, matrix_to_axis_angle


def _truth(seq, idx):  # type: ignore[no-untyped-def]
    return FitState(axis_angle_to_matrix(torch.as_tensor(seq.rotation[idx])),
                    torch.as_tensor(seq.translation[idx]),
                    torch.as_tensor(seq.expression[idx]), torch.as_tensor(seq.gaze[idx]))


def _camera(seq, batch: int) -> Camera:  # type: ignore[no-untyped-def]
    h, w = seq.image_size
    return Camera.make(seq.focal, np.asarray([w / 2, h / 2], np.float32), batch, "cpu")


def _rot_err_deg(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    d = (a @ b.transpose(1, 2)).numpy()
    return np.degrees(np.linalg.norm(matrix_to_axis_angle(d), axis=-1))


@pytest.fixture(scope="module")
def fitter(landmark_model, tracker_config):  # type: ignore[no-untyped-def]
    return LandmarkFitter(landmark_model, tracker_config)


def test_round_trip_from_the_regressor(fitter, regressor, sequence) -> None:  # type: ignore[no-untyped-def]
    """Cold start (regressor, closed-form translation, 12 iterations) on clean landmarks
    with known identity and camera recovers the pose."""
    idx = np.arange(0, 45, 9)
    obs = torch.as_tensor(sequence.clean[idx])
    cam = _camera(sequence, len(idx))
    ident = torch.as_tensor(sequence.identity)
    guess = regressor.predict(obs, cam.focal, cam.principal)
    pts = fitter.lm.points(ident[None].expand(len(idx), -1), guess.expression)[:, :468]
    init = FitState(guess.rotation, initial_translation(pts, guess.rotation, obs[:, :468], cam),
                    guess.expression, torch.as_tensor(sequence.gaze[idx]))
    state, info = fitter.fit(obs, init, ident, cam, 12, damping=1e-2)
    truth = _truth(sequence, idx)
    assert _rot_err_deg(state.rotation, truth.rotation).max() < 0.3
    assert float((state.translation - truth.translation).norm(dim=-1).max()) < 0.3
    assert float(info.residual_px.max()) < 0.3
    jaw = fitter.lm.expression_names.index("jawOpen")
    np.testing.assert_allclose(state.expression[:, jaw], truth.expression[:, jaw], atol=0.05)


def test_noisy_landmarks_rotation_within_a_degree(fitter, sequence) -> None:  # type: ignore[no-untyped-def]
    idx = np.arange(45)
    obs = torch.as_tensor(sequence.noisy[idx])
    truth = _truth(sequence, idx)
    start = replace(truth, rotation=axis_angle_to_matrix(
        torch.as_tensor(sequence.rotation[idx]) + 0.03), translation=truth.translation + 0.5)
    state, _ = fitter.fit(obs, start, torch.as_tensor(sequence.identity),
                          _camera(sequence, 45), 10)
    assert _rot_err_deg(state.rotation, truth.rotation).mean() < 1.0


def test_warm_start_converges_in_three_iterations(fitter, sequence) -> None:  # type: ignore[no-untyped-def]
    """Warm-started from the previous frame's fit, 3 iterations reach the cost of 20."""
    ident = torch.as_tensor(sequence.identity)
    cam = _camera(sequence, 1)
    prev, _ = fitter.fit(torch.as_tensor(sequence.noisy[9:10]), _truth(sequence, [9]), ident,
                         cam, 20)
    obs = torch.as_tensor(sequence.noisy[10:11])
    warm, info3 = fitter.fit(obs, prev, ident, cam, 3, previous=prev)
    _, info20 = fitter.fit(obs, prev, ident, cam, 20, previous=prev)
    assert info3.iterations == 3
    assert float(info3.cost) <= float(info20.cost) * 1.01
    # from the mean face (no warm start) 3 iterations are far from it
    cold = FitState.neutral(1, 50.0)
    pts = fitter.lm.points(ident[None], cold.expression)[:, :468]
    cold.translation = initial_translation(pts, cold.rotation, obs[:, :468], cam)
    _, slow = fitter.fit(obs, cold, ident, cam, 3, damping=1e-2)
    _, done = fitter.fit(obs, cold, ident, cam, 30, damping=1e-2)
    assert float(slow.cost) > 1.02 * float(done.cost)
    # at the optimum, a tolerance stops the loop after one iteration
    _, again = fitter.fit(obs, warm, ident, cam, 20, previous=prev, tolerance=1e-2)
    assert again.iterations == 1


def test_batched_fit_equals_single_fits(fitter, sequence) -> None:  # type: ignore[no-untyped-def]
    """A batch fits each frame as it would alone (one frame on the CPU takes the float64
    LAPACK path, a batch float32 torch: the same optimum, to rounding)."""
    idx = [0, 7, 21]
    ident = torch.as_tensor(sequence.identity)
    init = _truth(sequence, idx)
    init = replace(init, translation=init.translation + torch.tensor([0.5, -0.3, 1.0]))
    batch, binfo = fitter.fit(torch.as_tensor(sequence.noisy[idx]), init, ident,
                              _camera(sequence, 3), 12)
    for k, i in enumerate(idx):
        one, info = fitter.fit(torch.as_tensor(sequence.noisy[[i]]), init.select([k]), ident,
                               _camera(sequence, 1), 12)
        assert float(info.cost[0]) == pytest.approx(float(binfo.cost[k]), rel=5e-3)
        torch.testing.assert_close(one.translation[0], batch.translation[k], atol=5e-2,
                                   rtol=0)
        assert _rot_err_deg(one.rotation, batch.rotation[k:k + 1]).max() < 0.1


def test_expressions_boxed_and_eyelook_follows_gaze(fitter, sequence) -> None:  # type: ignore[no-untyped-def]
    idx = np.arange(0, 45, 5)
    init = _truth(sequence, idx)
    gaze = torch.full_like(init.gaze, 0.2)
    init = replace(init, expression=torch.rand_like(init.expression) * 3 - 1, gaze=gaze)
    state, _ = fitter.fit(torch.as_tensor(sequence.noisy[idx]), init,
                          torch.as_tensor(sequence.identity), _camera(sequence, len(idx)), 5)
    assert float(state.expression.min()) >= 0.0 and float(state.expression.max()) <= 1.0
    torch.testing.assert_close(state.expression[:, fitter.lm.eyelook], gaze_to_eyelook(gaze))


def test_gradient_matches_finite_differences(landmark_model, sequence) -> None:  # type: ignore[no-untyped-def]
    cfg = TrackerConfig(huber_px=1e6)
    fit = LandmarkFitter(landmark_model, cfg, "cpu", torch.float64)
    lm = fit.lm
    obs = torch.as_tensor(sequence.noisy[:2], dtype=torch.float64)[:, :468]
    rot = axis_angle_to_matrix(torch.as_tensor(sequence.rotation[:2], dtype=torch.float64))
    trans = torch.as_tensor(sequence.translation[:2], dtype=torch.float64)
    free = torch.as_tensor(sequence.expression[:2], dtype=torch.float64)[:, lm.free] + 0.05
    ident = torch.as_tensor(sequence.identity, dtype=torch.float64) * 0.9
    inv_s = 60.0 / face_scale(obs)
    offset = (torch.tensor([[320.0, 240.0]], dtype=torch.float64)[:, None] - obs) * \
        inv_s.view(2, 1, 1)
    log_f = torch.tensor(np.log(650.0), dtype=torch.float64)

    def cost(rot, trans, free, ident, log_f):  # type: ignore[no-untyped-def]
        base = (lm.mean_mesh + ident @ lm.identity_mesh)[None].expand(2, -1)
        c, _, g, _ = fit._evaluate(base, rot, trans, free, offset, torch.exp(log_f) * inv_s,
                                   shared=True)
        return c[0], g[0]

    _, grad = cost(rot, trans, free, ident, log_f)
    eps = 1e-6
    for j in (0, 1, 2, 3, 5, 6, 30):
        def f(e: float, j: int = j) -> torch.Tensor:
            if j < 3:
                d = torch.zeros(2, 3, dtype=torch.float64)
                d[0, j] = e
                return cost(axis_angle_to_matrix(d) @ rot, trans, free, ident, log_f)[0]
            if j < 6:
                t = trans.clone()
                t[0, j - 3] += e
                return cost(rot, t, free, ident, log_f)[0]
            x = free.clone()
            x[0, j - 6] += e
            return cost(rot, trans, x, ident, log_f)[0]
        numeric = float((f(eps) - f(-eps)) / (2 * eps))
        assert numeric == pytest.approx(float(grad[j]), rel=1e-4, abs=1e-3)
    p = 6 + lm.n_free
    for j in (0, 50, 100):
        def g(e: float, j: int = j) -> torch.Tensor:
            if j < 100:
                x = ident.clone()
                x[j] += e
                return cost(rot, trans, free, x, log_f)[0]
            return cost(rot, trans, free, ident, log_f + e)[0]
        numeric = float((g(eps) - g(-eps)) / (2 * eps))
        assert numeric == pytest.approx(float(grad[p + j]), rel=1e-4, abs=1e-3)


def test_calibration_recovers_focal_and_identity(fitter, sequence) -> None:  # type: ignore[no-untyped-def]
    idx = np.arange(0, 45, 3)
    truth = _truth(sequence, idx)
    guess = 1.25 * sequence.focal
    cam = Camera.make(guess, np.asarray([320.0, 240.0], np.float32), len(idx), "cpu")
    init = replace(truth, translation=truth.translation * 1.25,
                   expression=torch.zeros_like(truth.expression))
    ident, cam_fit, _ = fitter.calibrate(torch.as_tensor(sequence.noisy[idx]), init,
                                         torch.zeros(100), cam, 40)
    assert float(cam_fit.focal[0]) == pytest.approx(sequence.focal, rel=0.08)
    err0 = np.abs(sequence.identity).mean()
    err = np.abs(ident.numpy() - sequence.identity).mean()
    assert err < 0.6 * err0
    # either shared unknown can be held
    start = torch.as_tensor(sequence.identity)
    held, cam_held, _ = fitter.calibrate(torch.as_tensor(sequence.noisy[idx]), init, start,
                                         cam, 10, fit_identity=False)
    torch.testing.assert_close(held, start)
    assert float(cam_held.focal[0]) != pytest.approx(guess, rel=1e-3)
    _, cam_fixed, _ = fitter.calibrate(torch.as_tensor(sequence.noisy[idx]), init, start,
                                       cam, 5, fit_focal=False)
    assert float(cam_fixed.focal[0]) == pytest.approx(guess, rel=1e-6)


def test_profile_and_tiny_faces_stay_finite(fitter, landmark_model) -> None:  # type: ignore[no-untyped-def]
    """A face turned 85 degrees, or 12 pixels wide, or with landmarks all on one point:
    a worse fit, never NaN."""
    ident = torch.zeros(100)
    rot = axis_angle_to_matrix(torch.tensor([[0.0, 1.48, 0.0], [0.1, 0.2, 0.0],
                                             [0.0, 0.0, 0.0]]))
    trans = torch.tensor([[0.0, 0.0, 50.0], [0.0, 0.0, 900.0], [0.0, 0.0, 50.0]])
    cam = Camera.make(600.0, np.asarray([320.0, 240.0], np.float32), 3, "cpu")
    pts = landmark_model.points(ident[None].expand(3, -1), torch.zeros(3, 53))
    obs = project(pts, rot, trans, cam)
    obs[2] = 100.0  # degenerate: every point in one place
    init = FitState.neutral(3, 50.0)
    state, info = fitter.fit(obs, init, ident, cam, 12, damping=1e-2)
    for x in (state.rotation, state.translation, state.expression, info.cost):
        assert torch.isfinite(x).all()
    gaze = fitter.fit_gaze(obs, state, ident, cam)
    assert torch.isfinite(gaze).all()


def test_every_inner_lip_point_is_on_its_own_lip(landmark_model) -> None:  # type: ignore[no-untyped-def]
    """The landmark map keeps the inner-lip points on their own lip (the model's lips touch
    at rest): the lower ones follow the jaw, the upper ones do not, and the fit uses all."""
    from tracker.fitting import landmark_weights
    from tracker.landmarks import INNER_LIP_LOWER, INNER_LIP_UPPER

    assert mismapped_lip_points(landmark_model) == []
    jaw = landmark_model.expression[landmark_model.expression_names.index("jawOpen")]
    down = jaw[:, 1]  # cm per unit jawOpen along y (down)
    for i in INNER_LIP_LOWER[1:-1]:
        assert float(down[i]) > 0.5 * float(down[14]), i
    for i in INNER_LIP_UPPER[1:-1]:
        assert float(down[i]) < 0.5 * float(down[14]), i
    weights = landmark_weights(landmark_model, 1.0)
    assert bool((weights[list(INNER_LIP_LOWER + INNER_LIP_UPPER)] == 1.0).all())


def test_normal_equations_are_the_fit_s_cost_and_its_derivatives(landmark_model, sequence,
                                                                  tracker_config) -> None:  # type: ignore[no-untyped-def]
    """normal_equations: the gradient of its cost (finite differences along each unknown
    through apply_step) and a solve_step that lowers the cost, for solvers that add terms."""
    fitter = LandmarkFitter(landmark_model, tracker_config, "cpu", torch.float64)
    idx = [5, 6]
    truth = _truth(sequence, idx).to("cpu", torch.float64)
    expr = truth.expression.clone()
    expr[:, fitter.lm.free[3]] = 0.3  # inside the box: differences both ways
    start = replace(truth, translation=truth.translation + 0.4, expression=expr)
    obs = torch.as_tensor(sequence.noisy[idx], dtype=torch.float64)
    ident = torch.as_tensor(sequence.identity, dtype=torch.float64)
    cam = Camera.make(sequence.focal, np.asarray([sequence.image_size[1] / 2,
                                                  sequence.image_size[0] / 2]), 2, "cpu",
                      torch.float64)
    cost, grad, hess = fitter.normal_equations(obs, start, ident, cam)
    assert grad is not None and hess is not None
    assert hess.shape == (2, 6 + fitter.lm.n_free, 6 + fitter.lm.n_free)
    again, g2, h2 = fitter.normal_equations(obs, start, ident, cam, jacobian=False)
    assert g2 is None and h2 is None and torch.allclose(again, cost)
    for k in (0, 2, 4, 6 + 3):
        step = torch.zeros_like(grad)
        step[:, k] = 1e-5
        up = fitter.normal_equations(obs, fitter.apply_step(start, step), ident, cam, False)[0]
        down = fitter.normal_equations(obs, fitter.apply_step(start, -step), ident, cam,
                                       False)[0]
        numeric = (up - down) / 2e-5
        torch.testing.assert_close(numeric, grad[:, k], rtol=1e-3, atol=1e-3)
    free = start.expression[:, fitter.lm.free]
    moved = fitter.apply_step(start, fitter.solve_step(hess, grad, torch.full((2,), 1e-3,
                                                                               dtype=torch.float64),
                                                       free))
    after = fitter.normal_equations(obs, moved, ident, cam, False)[0]
    assert bool((after < 0.5 * cost).all())
    assert float(moved.expression.min()) >= 0.0 and float(moved.expression.max()) <= 1.0