"""tracker.rotation: one home for rotation math, checked against first principles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracker.rotation import (
    axis_angle_to_matrix,
    axis_angle_to_matrix_np,
    axis_rotation,
    matrix_to_axis_angle,
    matrix_to_axis_angle_t,
    nearest_equivalent,
    slerp,
)


def _random_rotvecs(n: int, max_angle: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    return axis * rng.uniform(0.0, max_angle, size=(n, 1))


def test_torch_and_numpy_agree_and_are_rotations() -> None:
    r = _random_rotvecs(50, 3.0)
    m_np = axis_angle_to_matrix_np(r)
    m_t = axis_angle_to_matrix(torch.from_numpy(r)).numpy()
    np.testing.assert_allclose(m_np, m_t, atol=1e-12)
    np.testing.assert_allclose(m_np @ np.swapaxes(m_np, 1, 2), np.broadcast_to(np.eye(3), m_np.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(m_np), 1.0, atol=1e-12)
    # the axis is left fixed
    np.testing.assert_allclose(np.einsum("nij,nj->ni", m_np, r), r, atol=1e-12)
    # shapes: leading axes kept, a single vector too
    assert axis_angle_to_matrix(torch.zeros(2, 4, 3)).shape == (2, 4, 3, 3)
    assert axis_angle_to_matrix_np(np.zeros(3)).shape == (3, 3)


def test_round_trips_including_zero_and_near_pi() -> None:
    r = np.concatenate([_random_rotvecs(50, 3.1), [[0.0, 0.0, 0.0], [1e-9, 0.0, 0.0],
                                                   [0.0, np.pi - 1e-7, 0.0]]])
    back = matrix_to_axis_angle(axis_angle_to_matrix_np(r))
    np.testing.assert_allclose(axis_angle_to_matrix_np(back), axis_angle_to_matrix_np(r),
                               atol=1e-5)
    small = r[np.linalg.norm(r, axis=1) < 3.0]
    back_t = matrix_to_axis_angle_t(axis_angle_to_matrix(torch.from_numpy(small))).numpy()
    np.testing.assert_allclose(back_t, small, atol=1e-7)


def test_gradient_is_finite_at_zero() -> None:
    r = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    axis_angle_to_matrix(r)[0, 0, 1].backward()
    assert torch.isfinite(r.grad).all()
    assert r.grad[0, 2].item() == pytest.approx(-1.0)  # d R01 / d rz = -1 at 0


def test_axis_rotation_is_right_handed() -> None:
    np.testing.assert_allclose(axis_rotation(2, np.pi / 2) @ [1.0, 0.0, 0.0], [0.0, 1.0, 0.0],
                               atol=1e-12)
    np.testing.assert_allclose(axis_rotation(0, np.pi / 2) @ [0.0, 1.0, 0.0], [0.0, 0.0, 1.0],
                               atol=1e-12)


def test_slerp_follows_the_shortest_arc() -> None:
    a = np.asarray([0.0, 0.2, 0.0])
    b = np.asarray([0.0, 0.8, 0.0])
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-6)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-6)
    np.testing.assert_allclose(slerp(a, b, 0.5), [0.0, 0.5, 0.0], atol=1e-6)


def test_nearest_equivalent_picks_the_continuous_vector() -> None:
    r = np.asarray([0.0, 0.0, np.pi - 0.01])
    twin = nearest_equivalent(r, np.asarray([0.0, 0.0, -np.pi + 0.02]))
    np.testing.assert_allclose(twin, [0.0, 0.0, -np.pi - 0.01], atol=1e-9)
    np.testing.assert_allclose(axis_angle_to_matrix_np(twin), axis_angle_to_matrix_np(r),
                               atol=1e-9)
    assert nearest_equivalent(r, r) is r


def test_angle_between_two_poses() -> None:
    from tracker.rotation import angle_between_deg

    yaw30 = np.array([0.0, np.radians(30.0), 0.0])
    pitch40 = np.array([np.radians(40.0), 0.0, 0.0])
    assert angle_between_deg(yaw30, yaw30) == pytest.approx(0.0, abs=1e-5)
    assert angle_between_deg(yaw30, -yaw30) == pytest.approx(60.0)
    # 30 deg yaw against 40 deg pitch (perpendicular axes): the quaternion product's scalar
    # part, cos(angle / 2) = cos(15 deg) cos(20 deg)
    want = 2 * np.degrees(np.arccos(np.cos(np.radians(15)) * np.cos(np.radians(20))))
    got = angle_between_deg(np.stack([yaw30, pitch40]), np.stack([pitch40, yaw30]))
    assert got.shape == (2,) and got == pytest.approx([want, want])
