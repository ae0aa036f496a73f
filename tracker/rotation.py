"""Rotations, in one place for the whole project.

Axis-angle vectors (radians, the axis times the angle; DESIGN.md's `rotation`) and rotation
matrices, in torch (differentiable, batched, CUDA-graph friendly) and numpy (float64).
Rodrigues' formula is written once, in the form R = I + sinc(t) K + (1/2) sinc(t/2)^2 K^2
(K the cross-product matrix of the vector, t its length), which is exact and smooth at 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch

#: Linear map from a vector (3,) to its cross-product matrix, flattened (3, 9).
_SKEW = np.asarray([[0, 0, 0, 0, 0, -1, 0, 1, 0],
                    [0, 0, 1, 0, 0, 0, -1, 0, 0],
                    [0, -1, 0, 1, 0, 0, 0, 0, 0]], np.float64)
_SKEW_T: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _skew_t(like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    if key not in _SKEW_T:
        _SKEW_T[key] = torch.as_tensor(_SKEW, dtype=like.dtype, device=like.device)
    return _SKEW_T[key]


def axis_angle_to_matrix(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrices `[..., 3, 3]` of axis-angle vectors `[..., 3]` (torch, radians).

    Differentiable everywhere, including at 0; few operations (the live fit replays it in a
    CUDA graph).
    """
    flat = rotvec.reshape(-1, 3)
    theta = torch.linalg.vector_norm(flat, dim=-1).view(-1, 1, 1)
    k = (flat @ _skew_t(flat)).view(-1, 3, 3)
    a = torch.sinc(theta / math.pi)  # sin(t) / t
    half = torch.sinc(theta / (2.0 * math.pi))  # sin(t/2) / (t/2)
    eye = torch.eye(3, device=rotvec.device, dtype=rotvec.dtype)
    out = eye + a * k + (0.5 * half * half) * torch.bmm(k, k)
    return out.view(rotvec.shape + (3,))


def axis_angle_to_matrix_np(rotvec: np.ndarray) -> np.ndarray:
    """Rotation matrices `[..., 3, 3]` float64 of axis-angle vectors `[..., 3]` (numpy)."""
    r = np.asarray(rotvec, np.float64)
    theta = np.linalg.norm(r, axis=-1)[..., None, None]
    k = (r @ _SKEW).reshape(r.shape + (3,))
    half = np.sinc(theta / (2.0 * np.pi))
    return np.eye(3) + np.sinc(theta / np.pi) * k + (0.5 * half * half) * (k @ k)


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees `[...]` float64 of the rotation from axis-angle `a` `[..., 3]` to
    axis-angle `b` `[..., 3]` (0 to 180): how far apart two head poses are."""
    rel = np.swapaxes(axis_angle_to_matrix_np(a), -1, -2) @ axis_angle_to_matrix_np(b)
    cos = np.clip((np.trace(rel, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    return np.degrees(np.arccos(cos))


def matrix_to_axis_angle(matrix: np.ndarray) -> np.ndarray:
    """Axis-angle `[..., 3]` float32 of rotation matrices `[..., 3, 3]` (numpy, any angle up
    to pi; near pi the axis comes from the matrix's diagonal)."""
    m = np.asarray(matrix, np.float64)
    cos = np.clip((np.trace(m, axis1=-2, axis2=-1) - 1.0) / 2.0, -1.0, 1.0)
    angle = np.arccos(cos)
    axis = np.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                     m[..., 1, 0] - m[..., 0, 1]], -1)
    sin = np.sin(angle)
    near_pi = sin < 1e-6
    scale = np.where(near_pi, 0.5, angle / np.where(near_pi, 1.0, 2.0 * sin))
    out = axis * scale[..., None]
    if np.any(near_pi & (angle > 1.0)):  # angle ~ pi: axis from the diagonal
        idx = np.nonzero(near_pi & (angle > 1.0))
        for i in zip(*idx) if idx else [()]:
            mi = m[i]
            diag = np.sqrt(np.clip((np.diag(mi) + 1.0) / 2.0, 0.0, None))
            j = int(np.argmax(diag))
            v = mi[:, j] + np.eye(3)[j]
            out[i] = v / np.linalg.norm(v) * np.pi
    return out.astype(np.float32)


def matrix_to_axis_angle_t(matrix: torch.Tensor) -> torch.Tensor:
    """Axis-angle `[..., 3]` of rotation matrices `[..., 3, 3]` (torch; angles below pi)."""
    m = matrix
    cos = ((m.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    angle = torch.acos(cos)
    v = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                     m[..., 1, 0] - m[..., 0, 1]], -1)
    sin = torch.sin(angle)
    scale = torch.where(sin > 1e-6, angle / (2.0 * sin).clamp_min(1e-12),
                        torch.full_like(angle, 0.5))
    return v * scale[..., None]


def axis_rotation(axis: int, angle: float) -> np.ndarray:
    """The rotation `(3, 3)` float64 by `angle` radians about coordinate axis 0 (x), 1 (y)
    or 2 (z), right-handed."""
    r = np.zeros(3)
    r[axis] = angle
    return axis_angle_to_matrix_np(r)


def slerp(a: np.ndarray, b: np.ndarray, weight: float) -> np.ndarray:
    """Axis-angle `(3,)` float32 of the rotation `weight` of the way from `a` to `b` along
    the shortest arc (0 gives `a`, 1 gives `b`)."""
    ra, rb = axis_angle_to_matrix_np(a), axis_angle_to_matrix_np(b)
    step = axis_angle_to_matrix_np(float(weight) * matrix_to_axis_angle(ra.T @ rb))
    return matrix_to_axis_angle(ra @ step)


def nearest_equivalent(r: np.ndarray, previous: np.ndarray) -> np.ndarray:
    """The axis-angle vector of rotation `r` nearest `previous` (r and its angle - 2 pi twin
    describe the same rotation; filtering over time needs the continuous one)."""
    angle = float(np.linalg.norm(r))
    if angle < 1e-9:
        return r
    twin = r / angle * (angle - 2.0 * math.pi)
    return twin if np.linalg.norm(twin - previous) < np.linalg.norm(r - previous) else r
