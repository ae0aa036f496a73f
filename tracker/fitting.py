"""Fit the face model to landmarks: damped Gauss-Newton (Levenberg-Marquardt) in torch.

Everything here is batched over frames (B) and runs on the CPU or CUDA alike. Only the
landmark triangles' vertices of the model are used (`LandmarkModel`: the model restricted to
MediaPipe's 478 points by their barycentrics), so an iteration is a few small matrix products.

Per frame the unknowns are the head rotation (a left-multiplied increment on a rotation
matrix), the translation (cm) and the 45 free expression coefficients (the eight eyeLook*
coefficients are never free: they are `gaze_to_eyelook(gaze)`). Identity (100) and focal
length are shared by all frames: `calibrate` fits them jointly with the per-frame unknowns of
a few keyframes (Schur complement on the shared block), after which they stay frozen.

Cost (per frame), in "normalised pixels" (pixels scaled so that the landmarks' RMS radius is
REF_RADIUS_PX, i.e. pixels of a face about 200 pixels wide):

    sum_l huber(|proj_l - obs_l| / s)                      468 mesh points, irises excluded
    + expression_weight/2 |e|^2 + expression_sparsity * sum(e),  e in [0, 1] (box, active set)
    + temporal_weight/2 |e - e_prev|^2
    + pose_temporal_weight/2 (|angle(R R_prev^T)|_deg^2 + |t - t_prev|_cm^2)
    + identity_weight/2 |identity|^2 + focal_weight/2 log(f / f0)^2     (calibration only)

Gaze is fitted afterwards, per eye, from the five iris points of each eye relative to the
fitted eyeball centres (`fit_gaze`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from tracker.config import TrackerConfig
from tracker.face_model import (
    IRIS_LEFT,
    IRIS_RIGHT,
    N_LANDMARKS,
    FaceModel,
    gaze_rotation,
    gaze_to_eyelook,
)
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix, axis_angle_to_matrix_np

#: Residuals are measured in pixels of a face whose landmarks have this RMS radius.
REF_RADIUS_PX = 60.0
N_MESH = 468
#: Iris landmark ids per eye, eye 0 = the subject's left.
IRIS = (IRIS_LEFT, IRIS_RIGHT)
_MIN_DEPTH = 1.0  # cm: points are kept in front of the camera


@dataclass
class FitState:
    """Per-frame unknowns of B frames (torch, one device and dtype).

    rotation (B, 3, 3) camera-from-model rotation; translation (B, 3) cm; expression (B, 53)
    in [0, 1] (its eyeLook columns follow gaze); gaze (B, 2, 2) yaw, pitch radians per eye
    (0 = subject's left).
    """

    rotation: torch.Tensor
    translation: torch.Tensor
    expression: torch.Tensor
    gaze: torch.Tensor

    @property
    def batch(self) -> int:
        return int(self.rotation.shape[0])

    def clone(self) -> FitState:
        return FitState(*(x.clone() for x in self._items()))

    def select(self, index: torch.Tensor | slice | list[int]) -> FitState:
        return FitState(*(x[index] for x in self._items()))

    def where(self, mask: torch.Tensor, other: FitState) -> FitState:
        """Frames of self where mask (B,) is True, else other's."""
        def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)
        return FitState(*(pick(a, b) for a, b in zip(self._items(), other._items())))

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> FitState:
        return FitState(*(x.to(device=device, dtype=dtype) for x in self._items()))

    def _items(self) -> tuple[torch.Tensor, ...]:
        return (self.rotation, self.translation, self.expression, self.gaze)

    @staticmethod
    def cat(states: list[FitState]) -> FitState:
        return FitState(*(torch.cat(parts) for parts in zip(*(s._items() for s in states))))

    @classmethod
    def neutral(cls, batch: int, depth: float, device: torch.device | str = "cpu",
                dtype: torch.dtype = torch.float32) -> FitState:
        """Frontal mean face at (0, 0, depth) cm."""
        t = torch.zeros(batch, 3, device=device, dtype=dtype)
        t[:, 2] = depth
        return cls(torch.eye(3, device=device, dtype=dtype).repeat(batch, 1, 1), t,
                   torch.zeros(batch, 53, device=device, dtype=dtype),
                   torch.zeros(batch, 2, 2, device=device, dtype=dtype))


@dataclass
class FitInfo:
    """What a fit reports: iterations run, final cost (B,), median landmark residual (B,)
    over the 468 mesh points in image pixels and in normalised pixels."""

    iterations: int
    cost: torch.Tensor
    residual_px: torch.Tensor
    residual: torch.Tensor


@dataclass
class Camera:
    """Pinhole intrinsics of B frames: focal (B,) px, principal (B, 2) px (cx, cy)."""

    focal: torch.Tensor
    principal: torch.Tensor

    @classmethod
    def make(cls, focal: float | torch.Tensor, principal: np.ndarray | torch.Tensor,
             batch: int, device: torch.device | str, dtype: torch.dtype = torch.float32
             ) -> Camera:
        f = torch.as_tensor(focal, device=device, dtype=dtype).reshape(-1).expand(batch)
        c = torch.as_tensor(np.asarray(principal, np.float32) if isinstance(principal, np.ndarray)
                            else principal, device=device, dtype=dtype).reshape(-1, 2)
        return cls(f.contiguous(), c.expand(batch, 2).contiguous())


class LandmarkModel:
    """The face model restricted to MediaPipe's 478 landmarks, as torch tensors.

    mean (478, 3), identity (100, 478, 3), expression (53, 478, 3) cm; eye centres
    (2, 3) and their identity basis (100, 2, 3); free / eyelook expression indices.
    """

    def __init__(self, model: FaceModel, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        ids = model.landmark_vertex_ids.astype(np.int64)
        bary = model.landmark_barycentrics.astype(np.float64)

        def bake(arr: np.ndarray) -> np.ndarray:  # [..., V, 3] -> [..., 478, 3]
            return (arr[..., ids, :].astype(np.float64) * bary[..., None]).sum(-2)

        self.device = torch.device(device)
        self.dtype = dtype
        self.expression_names = list(model.expression_names)
        self.eyelook = torch.as_tensor(model.eyelook_indices, device=device)
        self.free = torch.as_tensor(
            [i for i in range(model.n_expressions) if i not in set(model.eyelook_indices)],
            device=device)
        tt = {"device": device, "dtype": dtype}
        self.mean = torch.as_tensor(bake(model.neutral), **tt).contiguous()
        self.identity = torch.as_tensor(bake(model.identity_basis), **tt).contiguous()
        self.expression = torch.as_tensor(bake(model.expression_basis), **tt).contiguous()
        centres0 = model.eyeball_centres.astype(np.float64)
        shifts = model.eye_centres(np.eye(model.identity_basis.shape[0], dtype=np.float32))
        self.eye_centres0 = torch.as_tensor(centres0, **tt)
        self.eye_centres_basis = torch.as_tensor(shifts - centres0, **tt)
        # flattened mesh-only bases for the per-frame fit
        self.mean_mesh = self.mean[:N_MESH].reshape(-1)
        self.identity_mesh = self.identity[:, :N_MESH].reshape(self.identity.shape[0], -1)
        self.free_mesh = self.expression[self.free, :N_MESH]  # 45, 468, 3
        self.free_mesh_flat = self.free_mesh.reshape(len(self.free), -1)
        self.free_mesh_j = self.free_mesh.permute(2, 1, 0)[:, :, None].contiguous()  # 3,468,1,45
        self.eyelook_mesh_flat = self.expression[self.eyelook, :N_MESH].reshape(8, -1)
        self.identity_mesh_j = self.identity[:, :N_MESH].permute(2, 1, 0)[:, :, None].contiguous()
        self.iris_ids = torch.as_tensor(IRIS, device=device)  # 2, 5
        self.blinks = torch.as_tensor([self.expression_names.index("eyeBlink_L"),
                                       self.expression_names.index("eyeBlink_R")],
                                      device=device)
        iris_mean = torch.stack([self.mean[list(ids)].mean(0) for ids in IRIS])  # 2,3
        iris_basis = torch.stack([self.identity[:, list(ids)].mean(1) for ids in IRIS], 1)
        self.iris_rel0 = iris_mean - self.eye_centres0  # 2,3
        self.iris_rel_basis = iris_basis - self.eye_centres_basis  # 100,2,3
        self.eye2 = torch.eye(2, **tt)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LandmarkModel:
        """A copy on another device / dtype."""
        out = object.__new__(LandmarkModel)
        for key, value in vars(self).items():
            if isinstance(value, torch.Tensor):
                value = value.to(device) if value.dtype in (torch.int64, torch.int32) else \
                    value.to(device=device, dtype=dtype)
            setattr(out, key, value)
        out.device, out.dtype = torch.device(device), dtype
        return out

    @property
    def n_free(self) -> int:
        return int(self.free.shape[0])

    def points(self, identity: torch.Tensor, expression: torch.Tensor,
               gaze: torch.Tensor | None = None, shape: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Model-frame landmarks [B, 478, 3] (irises rotated by gaze when given); `shape`
        [478, 3] or [B, 478, 3]: the identity's points (mean + identity part) when known."""
        b = expression.shape[0]
        if shape is None:
            shape = self.mean + (identity @ self.identity.view(self.identity.shape[0], -1)
                                 ).view(-1, N_LANDMARKS, 3)
        pts = shape + (expression @ self.expression.view(self.expression.shape[0], -1)
                       ).view(b, N_LANDMARKS, 3)
        if gaze is None:
            return pts
        centres = self.eye_centres(identity)  # B,2,3
        rot = gaze_rotation(gaze)  # B,2,3,3
        iris = pts[:, self.iris_ids]  # B,2,5,3
        moved = (iris - centres[:, :, None]) @ rot.transpose(-1, -2) + centres[:, :, None]
        pts = pts.clone()
        pts[:, self.iris_ids] = moved
        return pts

    def shape(self, identity: torch.Tensor) -> torch.Tensor:
        """The identity's landmarks [478, 3] at rest (identity [100])."""
        return self.mean + (identity @ self.identity.view(self.identity.shape[0], -1)
                            ).view(N_LANDMARKS, 3)

    def eye_centres(self, identity: torch.Tensor) -> torch.Tensor:
        """Eyeball centres [B, 2, 3] for identity [B, 100]."""
        return self.eye_centres0 + torch.einsum("bk,kec->bec", identity, self.eye_centres_basis)


def params_landmarks(lm: LandmarkModel, params: FaceParams,
                     device: torch.device | str = "cpu") -> np.ndarray:
    """MediaPipe's 478 points [T, 478, 2] in pixels of face parameters (their identity,
    expression, gaze, pose and camera), as the fit sees them."""
    from tracker.rotation import axis_angle_to_matrix

    t = params.frames
    if t == 0:
        return np.zeros((0, N_LANDMARKS, 2), np.float32)
    lmd = lm.to(device, torch.float32)
    with torch.no_grad():
        ident = torch.as_tensor(params.identity, device=device)[None].expand(t, -1)
        pts = lmd.points(ident, torch.as_tensor(params.expression, device=device),
                         torch.as_tensor(params.gaze, device=device))
        rot = axis_angle_to_matrix(torch.as_tensor(params.rotation, device=device))
        cam = Camera.make(float(params.focal[0]), params.principal_point, t, device)
        proj = project(pts, rot, torch.as_tensor(params.translation, device=device), cam)
    return proj.cpu().numpy().astype(np.float32)


def project(points: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
            camera: Camera) -> torch.Tensor:
    """Pixels [B, N, 2] of model-frame points [B, N, 3] (DESIGN.md's pinhole)."""
    y = points @ rotation.transpose(-1, -2) + translation[:, None]
    z = y[..., 2:].clamp_min(_MIN_DEPTH)
    return camera.focal[:, None, None] * y[..., :2] / z + camera.principal[:, None]


def face_scale(observed: torch.Tensor) -> torch.Tensor:
    """RMS radius [B] (px) of the observed mesh landmarks [B, >=468, 2]."""
    p = observed[:, :N_MESH]
    return ((p - p.mean(1, keepdim=True)) ** 2).sum(-1).mean(-1).sqrt().clamp_min(1.0)


def initial_translation(points: torch.Tensor, rotation: torch.Tensor, observed: torch.Tensor,
                        camera: Camera) -> torch.Tensor:
    """Translation [B, 3] (cm) placing rotated model points [B, N, 3] onto pixels [B, N, 2]:
    the linear least-squares solution of f (Xr + t)_xy = (obs - c) (Xr + t)_z."""
    xr = points @ rotation.transpose(-1, -2)
    d = observed - camera.principal[:, None]  # B,N,2
    f = camera.focal[:, None, None]
    zero = torch.zeros_like(d[..., 0])
    fb = f[..., 0].expand_as(zero)
    ax = torch.stack([fb, zero, -d[..., 0]], -1)
    ay = torch.stack([zero, fb, -d[..., 1]], -1)
    a = torch.cat([ax, ay], 1)  # B,2N,3
    b = torch.cat([d[..., 0] * xr[..., 2] - fb * xr[..., 0],
                   d[..., 1] * xr[..., 2] - fb * xr[..., 1]], 1)
    ata = a.transpose(1, 2) @ a + 1e-6 * torch.eye(3, dtype=a.dtype, device=a.device)
    t = torch.linalg.solve(ata, (a.transpose(1, 2) @ b[..., None]))[..., 0]
    t[:, 2] = t[:, 2].clamp_min(_MIN_DEPTH + points[..., 2].abs().amax(1))
    return t


_DEBUG = False
#: Diagonal weight that pins an unknown to a given step.
_PIN = 1e10


def _skew_vee(m: torch.Tensor) -> torch.Tensor:
    """vee((M - M^T) / 2): the rotation vector of a small rotation M [B, 3, 3]."""
    return 0.5 * torch.stack([m[:, 2, 1] - m[:, 1, 2], m[:, 0, 2] - m[:, 2, 0],
                              m[:, 1, 0] - m[:, 0, 1]], -1)


class LandmarkFitter:
    """Levenberg-Marquardt fits of FitState to observed landmarks (see the module doc)."""

    def __init__(self, model: FaceModel | LandmarkModel, config: TrackerConfig | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.config = config or TrackerConfig()
        self.lm = (model.to(device, dtype) if isinstance(model, LandmarkModel)
                   else LandmarkModel(model, device, dtype))
        self.device = torch.device(device)
        self.dtype = dtype
        weights = torch.ones(self.lm.n_free, device=self.device, dtype=dtype)
        free_names = [self.lm.expression_names[i] for i in self.lm.free.tolist()]
        for name, factor in parse_factors(self.config.expression_sparsity_factors).items():
            if name in free_names:
                weights[free_names.index(name)] = factor
        self._sparsity = self.config.expression_sparsity * weights  # n_free
        self._landmark_weights = landmark_weights(self.lm, self.config.contour_weight)
        self._tiny = torch.full((1, 6 + self.lm.n_free), 1e-6, device=self.device, dtype=dtype)
        coupling = torch.zeros(4, 4, device=self.device, dtype=dtype)
        for k, w in enumerate((self.config.gaze_coupling_yaw, self.config.gaze_coupling_pitch)):
            coupling[k, k] = coupling[k + 2, k + 2] = w
            coupling[k, k + 2] = coupling[k + 2, k] = -w
        self._gaze_coupling = coupling  # (yaw_L, pitch_L, yaw_R, pitch_R)

    # ---- helpers --------------------------------------------------------------------------
    def tensor(self, x: np.ndarray | torch.Tensor | float) -> torch.Tensor:
        return torch.as_tensor(x, device=self.device, dtype=self.dtype)

    def _shape_base(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Flattened mesh points [B, 468*3] of identity [B, 100] with the eyeLook part."""
        return (self.lm.mean_mesh + identity @ self.lm.identity_mesh
                + expression[:, self.lm.eyelook] @ self.lm.eyelook_mesh_flat)

    def with_gaze(self, state: FitState) -> FitState:
        """state with its eyeLook coefficients recomputed from its gaze."""
        expr = state.expression.clone()
        expr[:, self.lm.eyelook] = gaze_to_eyelook(state.gaze).to(expr.dtype)
        return replace(state, expression=expr)

    def residuals(self, observed: torch.Tensor, state: FitState, identity: torch.Tensor,
                  camera: Camera) -> torch.Tensor:
        """Per-landmark reprojection distances [B, 468] in image pixels (mesh points)."""
        pts = self.lm.points(_batch(identity, state.batch), state.expression)[:, :N_MESH]
        return (project(pts, state.rotation, state.translation, camera)
                - observed[:, :N_MESH]).norm(dim=-1)

    # ---- the per-frame evaluation --------------------------------------------------------
    def _evaluate(self, base: torch.Tensor, rotation: torch.Tensor, translation: torch.Tensor,
                  free: torch.Tensor, offset: torch.Tensor, fs: torch.Tensor,
                  jacobian: bool = True, shared: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                             torch.Tensor | None]:
        """Data term at one point: (cost [B], distances [B, 468] in normalised pixels,
        gradient [B, P], Gauss-Newton Hessian [B, P, P]); no derivatives without `jacobian`.

        base [B, 468*3]: identity (and eyeLook) part of the mesh points; offset [B, 468, 2]:
        (principal point - observed pixels) times inv_s; fs [B]: focal times inv_s, where
        inv_s turns pixels into normalised pixels. P = 6 + n_free, plus 101 with `shared`
        (identity, log focal). The rotation unknown is a left-multiplied increment.
        """
        b = base.shape[0]
        x = torch.addmm(base, free, self.lm.free_mesh_flat).view(b, N_MESH, 3)
        xr = torch.bmm(x, rotation.transpose(1, 2))
        y = xr + translation[:, None]
        z = y[..., 2:].clamp_min(_MIN_DEPTH)  # B,L,1
        xy = y[..., :2] / z  # B,L,2 normalised image coordinates
        fs3 = fs.view(b, 1, 1)
        r = torch.addcmul(offset, xy, fs3)  # B,L,2
        dist = torch.linalg.vector_norm(r, dim=-1)
        delta = self.config.huber_px
        clipped = dist.clamp_max(delta)
        lw = self._landmark_weights
        cost = (clipped * (dist - 0.5 * clipped) * lw).sum(-1)  # Huber
        if not jacobian:
            return cost, dist, None, None
        w = lw * delta / dist.clamp_min(delta)  # IRLS weights: 1 inside, delta / d outside
        a = (fs3 / z).unsqueeze(-1)  # B,L,1,1
        # d(normalised pixels)/d(camera point): [[a, 0, -a x], [0, a, -a y]]
        p = torch.cat([a * self._eye2, -(a * xy.unsqueeze(-1))], -1)  # B,L,2,3
        j_rot = torch.linalg.cross(xr.unsqueeze(2), p)  # B,L,2,3
        pr = torch.bmm(p.view(b, 2 * N_MESH, 3), rotation).view(b, N_MESH, 2, 3)
        cols = [j_rot, p, _contract(pr, self.lm.free_mesh_j)]
        if shared:
            cols += [_contract(pr, self.lm.identity_mesh_j), (xy * fs3).unsqueeze(-1)]
        jac = torch.cat(cols, -1)  # B,L,2,P
        jw = (jac * w.view(b, N_MESH, 1, 1)).view(b, 2 * N_MESH, -1).transpose(1, 2)
        jac = jac.view(b, 2 * N_MESH, -1)
        hess = torch.bmm(jw, jac)
        grad = torch.bmm(jw, r.view(b, 2 * N_MESH, 1)).view(b, -1)
        return cost, dist, grad, hess

    @property
    def _eye2(self) -> torch.Tensor:
        return self.lm.eye2

    def _priors(self, free: torch.Tensor, previous_free: torch.Tensor | None,
                gradient: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Expression prior cost [B] and gradient [B, n_free] (ridge, sparsity, temporal);
        its Hessian is the constant diagonal `_prior_hessian`."""
        cfg = self.config
        we, ws = cfg.expression_weight, self._sparsity
        wt = cfg.temporal_weight
        if previous_free is None:
            cost = (free * (free * (0.5 * we) + ws)).sum(-1)
            return cost, (free * we + ws) if gradient else None
        d = free - previous_free
        # cost: free . (we/2 free + ws) + wt/2 |d|^2 ; gradient: we free + ws + wt d
        cost = (free * (free * (0.5 * we) + ws)).sum(-1) + (0.5 * wt) * (d * d).sum(-1)
        if not gradient:
            return cost, None
        return cost, (free * we + ws).add_(d, alpha=wt)

    def _prior_hessian(self, b: int, temporal: bool) -> torch.Tensor:
        cfg = self.config
        h = torch.zeros(b, 6 + self.lm.n_free, device=self.device, dtype=self.dtype)
        h[:, 6:] = cfg.expression_weight + (cfg.temporal_weight if temporal else 0.0)
        if temporal and cfg.pose_temporal_weight > 0:
            h[:, :3] = cfg.pose_temporal_weight * (180.0 / math.pi) ** 2
            h[:, 3:6] = cfg.pose_temporal_weight
        return h

    def _pose_prior(self, rotation: torch.Tensor, translation: torch.Tensor,
                    previous: FitState) -> tuple[torch.Tensor, torch.Tensor]:
        """Pose temporal prior cost [B] and gradient [B, 6]."""
        wp = self.config.pose_temporal_weight
        wr = wp * (180.0 / math.pi) ** 2
        rho = _skew_vee(rotation @ previous.rotation.transpose(1, 2))
        dt = translation - previous.translation
        cost = 0.5 * wr * (rho * rho).sum(-1) + 0.5 * wp * (dt * dt).sum(-1)
        return cost, torch.cat([wr * rho, wp * dt], -1)

    def _frame_terms(self, observed: torch.Tensor, gaze: torch.Tensor, identity: torch.Tensor,
                     camera: Camera) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                              torch.Tensor, torch.Tensor]:
        """What stays fixed while B frames are fitted, in the fitter's dtype: eyeLook
        coefficients [B, E] of `gaze`, the landmark mesh before expressions [B, 3 * N_MESH]
        (cm), the scale to normalised pixels inv_s [B] (1/px), the principal point less the
        observed landmarks [B, N_MESH, 2] and the focal length [B], both normalised."""
        dt = self.dtype
        obs = observed[:, :N_MESH].to(dt)
        b = obs.shape[0]
        ident = _batch(identity.to(dt), b)
        eyelook = gaze_to_eyelook(gaze).to(dt)
        base = torch.addmm(torch.addmm(self.lm.mean_mesh, ident, self.lm.identity_mesh),
                           eyelook, self.lm.eyelook_mesh_flat)
        inv_s = REF_RADIUS_PX / face_scale(obs)
        offset = (camera.principal.to(dt)[:, None] - obs) * inv_s.view(b, 1, 1)
        return eyelook, base, inv_s, offset, camera.focal.to(dt) * inv_s

    # ---- the landmark term for other solvers ---------------------------------------------
    def normal_equations(self, observed: torch.Tensor, state: FitState, identity: torch.Tensor,
                         camera: Camera, jacobian: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The per-frame cost of `fit` at `state` (landmark term and expression priors, no
        temporal term), in normalised pixels: (cost [B], gradient [B, P], Gauss-Newton
        Hessian [B, P, P] with the priors' constant diagonal), P = 6 + n_free in `fit`'s
        unknowns (left-multiplied rotation increment, translation, free expressions);
        no derivatives without `jacobian`. For solvers that add terms of their own
        (renderer.refine) and then take `solve_step`."""
        dt = self.dtype
        b = state.batch
        _, base, _, offset, fs = self._frame_terms(observed, state.gaze, identity, camera)
        free = state.expression[:, self.lm.free].to(dt)
        cost, _, grad, hess = self._evaluate(base, state.rotation.to(dt),
                                             state.translation.to(dt), free, offset, fs,
                                             jacobian)
        pc, pg = self._priors(free, None, jacobian)
        if grad is None or hess is None or pg is None:
            return cost + pc, None, None
        grad[:, 6:] += pg
        hess.diagonal(dim1=1, dim2=2).add_(self._prior_hessian(b, False))
        return cost + pc, grad, hess

    def solve_step(self, hess: torch.Tensor, grad: torch.Tensor, damping: torch.Tensor,
                   free: torch.Tensor) -> torch.Tensor:
        """`fit`'s damped step [B, P] (Levenberg-Marquardt damping [B], the expression box
        [0, 1] kept by an active set) for a Hessian [B, P, P] and gradient [B, P] in its
        unknowns; free: the current free expressions [B, n_free]."""
        return self._solve(hess, grad, damping, free)

    def apply_step(self, state: FitState, step: torch.Tensor) -> FitState:
        """state moved by a step [B, P] of `solve_step` (expressions clamped to [0, 1])."""
        dt = self.dtype
        expr = state.expression.to(dt).clone()
        expr[:, self.lm.free] = (expr[:, self.lm.free] + step[:, 6:]).clamp(0.0, 1.0)
        return FitState(axis_angle_to_matrix(step[:, :3]) @ state.rotation.to(dt),
                        state.translation.to(dt) + step[:, 3:6], expr, state.gaze.to(dt))

    # ---- per-frame fit -------------------------------------------------------------------
    def fit(self, observed: torch.Tensor, init: FitState, identity: torch.Tensor,
            camera: Camera, iterations: int, previous: FitState | None = None,
            damping: float = 1e-3, tolerance: float = 0.0) -> tuple[FitState, FitInfo]:
        """Refine `init` (B frames) on observed landmarks [B, 478 or 468, 2] (pixels).

        identity [100] or [B, 100] and camera stay fixed; the eyeLook coefficients are
        gaze_to_eyelook(init.gaze). previous: the last frame's states for the temporal
        priors (None: none). Each iteration takes a damped Gauss-Newton step and keeps it
        where the cost went down (Levenberg-Marquardt); the loop stops early when every
        frame's relative change of cost in an iteration is below `tolerance` (0: never).
        """
        dt = self.dtype
        b = init.batch
        eyelook, base, inv_s, offset, fs = self._frame_terms(observed, init.gaze, identity,
                                                             camera)
        rot, trans = init.rotation.to(dt), init.translation.to(dt)
        free = init.expression[:, self.lm.free].to(dt).clamp(0.0, 1.0)
        prev_free = None if previous is None else previous.expression[:, self.lm.free].to(dt)
        pose_prior = previous is not None and self.config.pose_temporal_weight > 0
        h_prior = self._prior_hessian(b, previous is not None)
        # one frame on the CPU: decide on the host (no per-frame masks); else batched masks
        scalar = self.device.type == "cpu" and b == 1
        lam: torch.Tensor | float = damping if scalar else torch.full(
            (b,), damping, device=self.device, dtype=dt)

        def total(rot: torch.Tensor, trans: torch.Tensor, free: torch.Tensor, jac: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                             torch.Tensor | None]:
            c, dist, g, h = self._evaluate(base, rot, trans, free, offset, fs, jac)
            pc, pg = self._priors(free, prev_free, g is not None)
            c = c + pc
            if pose_prior:
                assert previous is not None
                qc, qg = self._pose_prior(rot, trans, previous)
                c = c + qc
            if g is None or h is None:
                return c, dist, None, None
            assert pg is not None
            g[:, 6:] += pg
            if pose_prior:
                g[:, :6] += qg
            h.diagonal(dim1=1, dim2=2).add_(h_prior)
            return c, dist, g, h

        cost, dist, grad, hess = total(rot, trans, free, True)
        done = 0
        for it in range(iterations):
            assert grad is not None and hess is not None
            if scalar:  # one frame on the CPU: the small solve in LAPACK directly
                assert isinstance(lam, float)
                step_np = _solve_one(hess[0].numpy(), grad[0].numpy(), lam, free[0].numpy())
                rot_n = torch.from_numpy(axis_angle_to_matrix_np(step_np[:3]).astype(np.float32) @ rot[0].numpy())[None]
                step = torch.from_numpy(step_np)[None]
            else:
                step = self._solve(hess, grad, lam, free)
                rot_n = axis_angle_to_matrix(step[:, :3]) @ rot
            trans_n = trans + step[:, 3:6]
            free_n = (free + step[:, 6:]).clamp_(0.0, 1.0)
            last = it == iterations - 1
            cost_n, dist_n, grad_n, hess_n = total(rot_n, trans_n, free_n, not last)
            done += 1
            if scalar:
                c_old, c_new = float(cost), float(cost_n)
                accept = c_new <= c_old  # False for NaN
                if accept:
                    rot, trans, free, dist, cost = rot_n, trans_n, free_n, dist_n, cost_n
                    grad, hess = grad_n, hess_n
                assert isinstance(lam, float)
                lam = max(lam * 0.3, 1e-7) if accept else min(lam * 10.0, 1e7)
                if tolerance > 0 and abs(c_old - c_new) < tolerance * c_old:
                    break
                continue
            ok = cost_n <= cost  # False for NaN
            converged = tolerance > 0 and not last and bool(
                ((cost - cost_n).abs() < tolerance * cost).all())
            rot = _where(ok, rot_n, rot)
            trans = _where(ok, trans_n, trans)
            free = _where(ok, free_n, free)
            dist = _where(ok, dist_n, dist)
            cost = torch.where(ok, cost_n, cost)
            if not last:
                assert grad_n is not None and hess_n is not None
                assert grad is not None and hess is not None
                grad = _where(ok, grad_n, grad)
                hess = _where(ok, hess_n, hess)
            assert isinstance(lam, torch.Tensor)
            lam = torch.where(ok, (lam * 0.3).clamp_min(1e-7), (lam * 10.0).clamp_max(1e7))
            if converged:
                break
        expr = init.expression.to(dt).clone()
        expr[:, self.lm.free] = free
        expr[:, self.lm.eyelook] = eyelook
        out = FitState(rot, trans, expr, init.gaze.to(dt))
        resid = dist.median(-1).values
        return out, FitInfo(done, cost, resid / inv_s, resid)

    def _solve(self, hess: torch.Tensor, grad: torch.Tensor, lam: torch.Tensor | float,
               free: torch.Tensor) -> torch.Tensor:
        """The damped Gauss-Newton step [B, P] that respects the box [0, 1] of the
        expression coefficients (an active-set step): a coefficient at a bound whose
        gradient pushes outward is held there, and one that the step would carry across a
        bound is pinned on it while the others are solved again."""
        h = hess.clone()
        diag = h.diagonal(dim1=1, dim2=2)
        if isinstance(lam, float):
            diag.add_(torch.add(self._tiny, diag, alpha=lam))
        else:
            diag.add_(torch.addcmul(self._tiny, diag, lam.unsqueeze(-1)))
        g_free = grad[:, 6:]
        held = torch.where(g_free > 0.0, free <= 0.0, free >= 1.0)
        step = _pinned_solve(h, grad, held, None)
        moved = free + step[:, 6:]
        cross = (moved - moved.clamp(0.0, 1.0)).ne(0.0)
        if free.device.type != "cpu" or bool(cross.any()):
            target = moved.clamp(0.0, 1.0).sub_(free)
            step = _pinned_solve(h, grad, held | cross, target)
        return step

    # ---- joint calibration ---------------------------------------------------------------
    def calibrate(self, observed: torch.Tensor, init: FitState, identity: torch.Tensor,
                  camera: Camera, iterations: int = 30, fit_focal: bool = True,
                  focal_prior: float | None = None, fit_identity: bool = True
                  ) -> tuple[torch.Tensor, Camera, FitState]:
        """Fit identity [100] and focal length jointly with K keyframes' per-frame unknowns.

        observed [K, 478, 2]; init: the keyframes' starting states (K); identity [100]
        start; camera: the starting camera (K copies; the focal prior is centred on its
        focal unless `focal_prior` is given); `fit_focal` / `fit_identity` False hold that
        shared unknown at its start. Levenberg-Marquardt on all unknowns at once,
        the shared block solved through its Schur complement, in float64 on this fitter's
        device. Returns (identity [100], camera, states).
        """
        cfg = self.config
        dt = torch.float64
        lm64 = self.lm.to(self.device, dt)
        sub = LandmarkFitter(lm64, cfg, self.device, dt)
        obs = observed[:, :N_MESH].to(dt)
        k = obs.shape[0]
        inv_s = REF_RADIUS_PX / face_scale(obs)
        principal = camera.principal.to(dt).expand(k, 2)
        offset = (principal[:, None] - obs) * inv_s.view(k, 1, 1)
        h_prior = sub._prior_hessian(k, False)
        rot, trans = init.rotation.to(dt), init.translation.to(dt)
        free = init.expression[:, lm64.free].to(dt).clamp(0.0, 1.0)
        eyelook = gaze_to_eyelook(init.gaze.to(dt)) @ lm64.eyelook_mesh_flat  # K,468*3
        ident = identity.to(dt).reshape(-1).clone()
        n_id = ident.shape[0]
        log_f = torch.log(camera.focal[:1].to(dt)).clone()
        log_f0 = math.log(focal_prior) if focal_prior else float(log_f)
        w_f = cfg.focal_weight if fit_focal else 0.0
        p = 6 + lm64.n_free
        fixed = None
        if not (fit_focal and fit_identity):
            fixed = torch.zeros(n_id + 1, dtype=torch.bool, device=self.device)
            fixed[:n_id] = not fit_identity
            fixed[n_id] = not fit_focal
        prior_c = torch.cat([torch.full((n_id,), cfg.identity_weight, dtype=dt,
                                        device=self.device),
                             torch.full((1,), w_f, dtype=dt, device=self.device)])

        def total(rot: torch.Tensor, trans: torch.Tensor, free: torch.Tensor,
                  ident: torch.Tensor, log_f: torch.Tensor) -> tuple[torch.Tensor, ...]:
            base = (lm64.mean_mesh + ident @ lm64.identity_mesh)[None] + eyelook
            fs = torch.exp(log_f) * inv_s
            c, _, g, h = sub._evaluate(base, rot, trans, free, offset, fs, shared=True)
            assert g is not None and h is not None
            pc, pg = sub._priors(free, None)
            assert pg is not None
            shared = torch.cat([ident, log_f - log_f0])
            cost = c.sum() + pc.sum() + 0.5 * (prior_c * shared * shared).sum()
            a = h[:, :p, :p].clone()
            a.diagonal(dim1=1, dim2=2).add_(h_prior)
            ga = g[:, :p].clone()
            ga[:, 6:] += pg
            bm = h[:, :p, p:]  # K,p,101
            cc = h[:, p:, p:].sum(0) + torch.diag(prior_c)
            gc = g[:, p:].sum(0) + prior_c * shared
            if fixed is not None:  # shared unknowns held at their start
                bm = bm * (~fixed).to(dt)
                keep = (~fixed).to(dt)
                cc = cc * keep[:, None] * keep[None, :] + torch.diag(fixed.to(dt))
                gc = gc * keep
            return cost, a, ga, bm, cc, gc

        lam = 1e-2
        cost, a, ga, bm, cc, gc = total(rot, trans, free, ident, log_f)
        def solve(a: torch.Tensor, ga: torch.Tensor, bm: torch.Tensor, cc: torch.Tensor,
                  gc: torch.Tensor, pinned: torch.Tensor, target: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
            """Damped step (per-frame [K, p], shared [101]) with expression unknowns
            `pinned` [K, n_free] moved by `target` exactly (Schur complement on the shared
            block)."""
            pin = torch.nn.functional.pad(pinned.to(dt), (6, 0))
            tgt = torch.nn.functional.pad(target, (6, 0))
            ad = a.clone()
            d = ad.diagonal(dim1=1, dim2=2)
            d.add_(lam * d + 1e-9 + pin * _PIN)
            gk = ga - pin * _PIN * tgt
            sc = cc.clone()
            sc.diagonal().add_(lam * sc.diagonal() + 1e-9)
            sol = torch.linalg.solve(ad, torch.cat([bm, gk[..., None]], -1))
            s_mat = sc - (bm.transpose(1, 2) @ sol[..., :-1]).sum(0)
            rhs = gc - (bm.transpose(1, 2) @ sol[..., -1:]).sum(0)[:, 0]
            d_shared = -torch.linalg.solve(s_mat, rhs)
            d_frame = -(sol[..., -1] + sol[..., :-1] @ d_shared)
            return d_frame, d_shared

        for _ in range(iterations):
            g_free = ga[:, 6:]
            held = torch.where(g_free > 0.0, free <= 0.0, free >= 1.0) & (g_free != 0.0)
            zero = torch.zeros_like(free)
            d_frame, d_shared = solve(a, ga, bm, cc, gc, held, zero)
            moved = free + d_frame[:, 6:]
            cross = ((moved < 0.0) | (moved > 1.0)) & ~held
            if bool(cross.any()):
                target = torch.where(cross, moved.clamp(0.0, 1.0) - free, zero)
                d_frame, d_shared = solve(a, ga, bm, cc, gc, held | cross, target)
            cand = (axis_angle_to_matrix(d_frame[:, :3]) @ rot, trans + d_frame[:, 3:6],
                    (free + d_frame[:, 6:]).clamp(0.0, 1.0), ident + d_shared[:n_id],
                    log_f + d_shared[n_id:])
            new = total(*cand)
            if _DEBUG: print("calib", float(cost), float(new[0]), lam, float(d_shared[-1]), float(log_f))
            if bool(torch.isfinite(new[0])) and bool(new[0] <= cost):
                rel = float((cost - new[0]) / cost.clamp_min(1e-12))
                rot, trans, free, ident, log_f = cand
                cost, a, ga, bm, cc, gc = new
                lam = max(lam * 0.3, 1e-7)
                if rel < 1e-7:
                    break
            else:
                lam = min(lam * 10.0, 1e7)
        expr = init.expression.to(dt).clone()
        expr[:, lm64.free] = free
        out = FitState(rot, trans, expr, init.gaze.to(dt)).to(self.device, self.dtype)
        cam = Camera(torch.exp(log_f).to(self.dtype).expand(k).contiguous(),
                     camera.principal.to(self.dtype).expand(k, 2).contiguous())
        return ident.to(self.dtype), cam, out

    # ---- gaze ----------------------------------------------------------------------------
    def fit_gaze(self, observed: torch.Tensor, state: FitState, identity: torch.Tensor,
                 camera: Camera, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Per-eye yaw and pitch [B, 2, 2] from the iris points of observed [B, 478, 2].

        Each eye's observed iris centre (the mean of its five points) is cast as a ray onto
        the sphere its model iris centre sweeps about the fitted eyeball centre (the near
        intersection, or the nearest point when the ray misses); the rotation taking the
        model's resting iris direction there is solved in closed form (DESIGN.md's gaze:
        Ry(-yaw) Rx(-pitch)). The two eyes' estimates are then combined with weak priors
        (toward looking ahead, the eyes alike) and, for an eye that closes (eyeBlink above
        0.4), a hold on `previous` (default: state.gaze), in one small linear solve.
        """
        cfg = self.config
        b = state.batch
        dt = self.dtype
        ident = _batch(identity.to(dt), b)
        lm = self.lm
        centre = torch.addmm(lm.eye_centres0.view(1, 6), ident,
                             lm.eye_centres_basis.view(-1, 6)).view(b, 2, 3)
        rel = torch.addmm(lm.iris_rel0.view(1, 6), ident, lm.iris_rel_basis.view(-1, 6)
                          ).view(b, 2, 3)  # resting iris centre - eyeball centre, head frame
        rho = torch.linalg.vector_norm(rel, dim=-1)  # B,2
        rot = state.rotation.to(dt)
        c_cam = centre @ rot.transpose(1, 2) + state.translation.to(dt)[:, None]  # B,2,3
        iris = observed[:, lm.iris_ids].to(dt).mean(2)  # B,2,2 pixels
        ray = torch.cat([(iris - camera.principal[:, None]) / camera.focal.view(b, 1, 1),
                         torch.ones_like(iris[..., :1])], -1)
        ray = ray / torch.linalg.vector_norm(ray, dim=-1, keepdim=True)
        dc = (ray * c_cam).sum(-1)
        disc = dc * dc - (c_cam * c_cam).sum(-1) + rho * rho
        depth = dc - disc.clamp_min(0.0).sqrt()
        hit = ray * depth[..., None] - c_cam
        look = (hit / torch.linalg.vector_norm(hit, dim=-1, keepdim=True).clamp_min(1e-9)
                ) @ rot  # head frame
        rest = rel / rho[..., None].clamp_min(1e-9)
        yaw = _solve_angle(look[..., 0], look[..., 2], rest[..., 0])
        pitch = _solve_angle(rest[..., 1], rest[..., 2], look[..., 1])
        raw = torch.stack([yaw, pitch], -1)  # B,2,2
        blink = state.expression.index_select(1, lm.blinks)
        w_eye = ((0.75 - blink.to(dt)) / 0.35).clamp(0.0, 1.0)  # B,2: 1 open, 0 closed
        # data stiffness: 5 iris points moving rho * f / z pixels per radian (normalised)
        inv_s = REF_RADIUS_PX / face_scale(observed.to(dt))
        px_per_rad = rho * (camera.focal * inv_s)[:, None] / c_cam[..., 2].clamp_min(_MIN_DEPTH)
        kappa = 5.0 * px_per_rad * px_per_rad * w_eye  # B,2
        prev = (state.gaze if previous is None else previous).to(dt).reshape(b, 4)
        def per_angle(x: torch.Tensor) -> torch.Tensor:  # B,2 per eye -> B,4 per angle
            return x.unsqueeze(-1).expand(b, 2, 2).reshape(b, 4)

        hold = per_angle(1.0 - w_eye) * cfg.gaze_hold_weight
        kappa4 = per_angle(kappa)
        hess = torch.diag_embed(kappa4 + hold + (cfg.gaze_prior_weight + 1e-6)) \
            + self._gaze_coupling
        rhs = kappa4 * raw.reshape(b, 4) + hold * prev
        gaze = torch.linalg.solve_ex(hess, rhs.unsqueeze(-1))[0].view(b, 2, 2)
        return gaze.nan_to_num(0.0, 0.0, 0.0).clamp(-1.0, 1.0)


def _solve_angle(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The angle t nearest 0 with a cos t + b sin t = c (least-squares when |c| > r)."""
    r = (a * a + b * b).sqrt().clamp_min(1e-9)
    base = torch.atan2(b, a)
    off = torch.acos((c / r).clamp(-1.0, 1.0))
    t1 = torch.remainder(base + off + math.pi, 2 * math.pi) - math.pi
    t2 = torch.remainder(base - off + math.pi, 2 * math.pi) - math.pi
    return torch.where(t1.abs() <= t2.abs(), t1, t2)


def mismapped_lip_points(lm: LandmarkModel) -> list[int]:
    """Inner-lip landmarks that the face model's landmark map put on the wrong lip.

    The model's mouth is closed at rest, so a closest-point map can place an inner-lip
    point of the lower lip on the upper one (or the reverse): it then does not follow the
    jaw. A point is on the wrong lip when its motion under jawOpen is nearer that of the
    other lip's centre (13 upper, 14 lower) than that of its own lip's centre.
    """
    from tracker.landmarks import INNER_LIP_LOWER, INNER_LIP_UPPER

    jaw = lm.expression[lm.expression_names.index("jawOpen")].detach().cpu().double()
    bad = []
    for ids, own, other in ((INNER_LIP_UPPER, 13, 14), (INNER_LIP_LOWER, 14, 13)):
        for i in ids[1:-1]:  # the corners belong to both lips
            if (jaw[i] - jaw[other]).norm() < (jaw[i] - jaw[own]).norm():
                bad.append(i)
    return bad


def landmark_weights(lm: LandmarkModel, contour_weight: float) -> torch.Tensor:
    """Weights [468] of the mesh landmarks in the fit: face-oval (silhouette) points
    `contour_weight`, inner-lip points on the wrong lip of the model 0, the others 1."""
    from tracker.landmarks import FACE_OVAL

    w = torch.ones(N_MESH, device=lm.device, dtype=lm.dtype)
    w[list(FACE_OVAL)] = contour_weight
    bad = mismapped_lip_points(lm)
    if bad:
        w[bad] = 0.0
    return w


def parse_factors(items: list[str]) -> dict[str, float]:
    """{'name': factor} of 'name:factor' strings (TrackerConfig.expression_sparsity_factors)."""
    out = {}
    for item in items:
        name, _, value = str(item).partition(":")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"expression_sparsity_factors: '{item}' is not 'name:factor'"
                             ) from None
    return out


def _solve_one(hess: np.ndarray, grad: np.ndarray, lam: float, free: np.ndarray
               ) -> np.ndarray:
    """`LandmarkFitter._solve` for one frame in numpy (P,): the same active-set step,
    without the per-call overhead of tensor operations on such small matrices."""
    h = np.array(hess, dtype=np.float64)
    idx = np.diag_indices_from(h)
    h[idx] += lam * h[idx] + 1e-6
    g = grad.astype(np.float64)
    g_free = g[6:]
    held = np.where(g_free > 0.0, free <= 0.0, free >= 1.0)
    step = _pinned_solve_one(h, g, held, None)
    moved = free + step[6:]
    clipped = np.clip(moved, 0.0, 1.0)
    cross = clipped != moved
    if cross.any():
        step = _pinned_solve_one(h, g, held | cross, clipped - free)
    return step.astype(np.float32)


def _pinned_solve_one(h: np.ndarray, g: np.ndarray, pinned: np.ndarray,
                      target: np.ndarray | None) -> np.ndarray:
    """Solve h s = -g with the pinned expression unknowns moved by `target` (0 if None);
    h is symmetric positive definite (Gauss-Newton + damping): LAPACK's posv."""
    from scipy.linalg import lapack

    ids = np.flatnonzero(pinned) + 6
    rhs = -g
    hp = h
    if len(ids):
        hp = h.copy()
        hp[ids, ids] += _PIN
        rhs[ids] = 0.0 if target is None else _PIN * target[ids - 6]
    _, step, info = lapack.dposv(hp, rhs)
    if info != 0 or not np.isfinite(step).all():
        return np.zeros_like(g)
    return step


def _contract(pr: torch.Tensor, basis_j: torch.Tensor) -> torch.Tensor:
    """Per-landmark products [B, L, 2, K] of pr [B, L, 2, 3] and a basis laid out
    [3, L, 1, K] (three fused multiply-adds: faster than a batched matmul of tiny blocks)."""
    out = pr[..., 0:1] * basis_j[0]
    out.addcmul_(pr[..., 1:2], basis_j[1])
    return out.addcmul_(pr[..., 2:3], basis_j[2])


def _pinned_solve(h: torch.Tensor, grad: torch.Tensor, pinned: torch.Tensor,
                  target: torch.Tensor | None) -> torch.Tensor:
    """Solve h s = -grad [B, P] with the expression unknowns `pinned` [B, P - 6] moved by
    `target` (0 when None): a stiff spring dominates their rows."""
    hp = h.clone()
    pin = pinned.to(h.dtype).mul_(_PIN)
    hp.diagonal(dim1=1, dim2=2)[:, 6:].add_(pin)
    rhs = grad.neg()
    if target is not None:
        rhs[:, 6:].addcmul_(pin, target)
    else:
        rhs[:, 6:].masked_fill_(pinned, 0.0)
    chol, _ = torch.linalg.cholesky_ex(hp)
    # two triangular solves, not torch.cholesky_solve: on CUDA a batch of more than one
    # goes to MAGMA there, which allocates while a CUDA graph captures (batched fit graphs)
    half = torch.linalg.solve_triangular(chol, rhs.unsqueeze(-1), upper=False)
    step = torch.linalg.solve_triangular(chol.mT, half, upper=True)
    return step.squeeze(-1).nan_to_num_(0.0, 0.0, 0.0)


def _batch(identity: torch.Tensor, b: int) -> torch.Tensor:
    return identity.expand(b, -1) if identity.dim() == 2 else identity[None].expand(b, -1)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)
