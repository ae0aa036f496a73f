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
from tracker.face_model import IRIS_LEFT, IRIS_RIGHT, FaceModel, gaze_rotation, gaze_to_eyelook

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
    in image pixels over the 468 mesh points."""

    iterations: int
    cost: torch.Tensor
    residual_px: torch.Tensor


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
        self.mean = torch.as_tensor(bake(model.neutral), **tt)
        self.identity = torch.as_tensor(bake(model.identity_basis), **tt)
        self.expression = torch.as_tensor(bake(model.expression_basis), **tt)
        centres0 = model.eyeball_centres.astype(np.float64)
        shifts = model.eye_centres(np.eye(model.identity_basis.shape[0], dtype=np.float32))
        self.eye_centres0 = torch.as_tensor(centres0, **tt)
        self.eye_centres_basis = torch.as_tensor(shifts - centres0, **tt)
        # flattened mesh-only bases for the per-frame fit
        self.mean_mesh = self.mean[:N_MESH].reshape(-1)
        self.identity_mesh = self.identity[:, :N_MESH].reshape(self.identity.shape[0], -1)
        self.free_mesh = self.expression[self.free, :N_MESH]  # 45, 468, 3
        self.free_mesh_flat = self.free_mesh.reshape(len(self.free), -1)
        self.free_mesh_t = self.free_mesh.permute(1, 2, 0)[:, None].contiguous()  # 468,1,3,45
        self.eyelook_mesh_flat = self.expression[self.eyelook, :N_MESH].reshape(8, -1)
        self.identity_mesh_t = self.identity[:, :N_MESH].permute(1, 2, 0)[:, None].contiguous()
        self.iris_ids = torch.as_tensor(IRIS, device=device)  # 2, 5
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
               gaze: torch.Tensor | None = None) -> torch.Tensor:
        """Model-frame landmarks [B, 478, 3] (irises rotated by gaze when given)."""
        pts = (self.mean + torch.einsum("bk,klc->blc", identity, self.identity)
               + torch.einsum("bk,klc->blc", expression, self.expression))
        if gaze is None:
            return pts
        centres = self.eye_centres(identity)  # B,2,3
        rot = gaze_rotation(gaze)  # B,2,3,3
        iris = pts[:, self.iris_ids]  # B,2,5,3
        moved = (iris - centres[:, :, None]) @ rot.transpose(-1, -2) + centres[:, :, None]
        pts = pts.clone()
        pts[:, self.iris_ids] = moved
        return pts

    def eye_centres(self, identity: torch.Tensor) -> torch.Tensor:
        """Eyeball centres [B, 2, 3] for identity [B, 100]."""
        return self.eye_centres0 + torch.einsum("bk,kec->bec", identity, self.eye_centres_basis)


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


def _rodrigues(rotvec: torch.Tensor) -> torch.Tensor:
    """Rotation matrices [B, 3, 3] of axis-angle vectors [B, 3] (few ops, exact at 0)."""
    theta = rotvec.norm(dim=-1).view(-1, 1, 1)
    key = (rotvec.device, rotvec.dtype)
    if key not in _SKEW_CACHE:
        _SKEW_CACHE[key] = _SKEW.to(device=rotvec.device, dtype=rotvec.dtype)
    k = (rotvec @ _SKEW_CACHE[key]).view(-1, 3, 3)
    a = torch.sinc(theta / math.pi)  # sin(t) / t
    half = torch.sinc(theta / (2.0 * math.pi))
    eye = torch.eye(3, device=rotvec.device, dtype=rotvec.dtype)
    return eye + a * k + (0.5 * half * half) * torch.bmm(k, k)


#: Linear map from a vector (3,) to its cross-product matrix, flattened (3, 9).
_SKEW = torch.tensor([[0, 0, 0, 0, 0, -1, 0, 1, 0],
                      [0, 0, 1, 0, 0, 0, -1, 0, 0],
                      [0, -1, 0, 1, 0, 0, 0, 0, 0]], dtype=torch.float32)
_DEBUG = False
_SKEW_CACHE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


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
        dist = r.norm(dim=-1)
        delta = self.config.huber_px
        clipped = dist.clamp_max(delta)
        cost = (clipped * (dist - 0.5 * clipped)).sum(-1)  # Huber
        if not jacobian:
            return cost, dist, None, None
        w = delta / dist.clamp_min(delta)  # IRLS weights: 1 inside, delta / d outside
        a = (fs3 / z).unsqueeze(-1)  # B,L,1,1
        # d(normalised pixels)/d(camera point): [[a, 0, -a x], [0, a, -a y]]
        p = torch.cat([a * self._eye2, -(a * xy.unsqueeze(-1))], -1)  # B,L,2,3
        j_rot = torch.linalg.cross(xr.unsqueeze(2), p)  # B,L,2,3
        pr = torch.bmm(p.view(b, 2 * N_MESH, 3), rotation).view(b, N_MESH, 2, 3, 1)
        cols = [j_rot, p, (pr * self.lm.free_mesh_t).sum(-2)]
        if shared:
            cols += [(pr * self.lm.identity_mesh_t).sum(-2), (xy * fs3).unsqueeze(-1)]
        jac = torch.cat(cols, -1)  # B,L,2,P
        jw = (jac * w.view(b, N_MESH, 1, 1)).view(b, 2 * N_MESH, -1).transpose(1, 2)
        jac = jac.view(b, 2 * N_MESH, -1)
        hess = torch.bmm(jw, jac)
        grad = torch.bmm(jw, r.view(b, 2 * N_MESH, 1)).view(b, -1)
        return cost, dist, grad, hess

    @property
    def _eye2(self) -> torch.Tensor:
        return self.lm.eye2

    def _priors(self, free: torch.Tensor, previous_free: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Expression prior cost [B] and gradient [B, n_free] (ridge, sparsity, temporal);
        its Hessian is the constant diagonal `_prior_hessian`."""
        cfg = self.config
        we, ws = cfg.expression_weight, cfg.expression_sparsity
        cost = (free * (0.5 * we * free + ws)).sum(-1)
        grad = free * we + ws
        if previous_free is not None:
            wt = cfg.temporal_weight
            d = free - previous_free
            cost = cost + (0.5 * wt) * (d * d).sum(-1)
            grad = grad + wt * d
        return cost, grad

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

    # ---- per-frame fit -------------------------------------------------------------------
    def fit(self, observed: torch.Tensor, init: FitState, identity: torch.Tensor,
            camera: Camera, iterations: int, previous: FitState | None = None,
            damping: float = 1e-3, tolerance: float = 0.0) -> tuple[FitState, FitInfo]:
        """Refine `init` (B frames) on observed landmarks [B, 478 or 468, 2] (pixels).

        identity [100] or [B, 100] and camera stay fixed; the eyeLook coefficients are
        gaze_to_eyelook(init.gaze). previous: the last frame's states for the temporal
        priors (None: none). Each iteration takes a damped Gauss-Newton step and keeps it
        where the cost went down (Levenberg-Marquardt); the loop stops early when every
        frame's relative decrease is below `tolerance` (0: never).
        """
        obs = observed[:, :N_MESH].to(self.dtype)
        b = init.batch
        ident = _batch(identity.to(self.dtype), b)
        eyelook = gaze_to_eyelook(init.gaze).to(self.dtype)
        base = torch.addmm(self.lm.mean_mesh, ident, self.lm.identity_mesh) \
            + eyelook @ self.lm.eyelook_mesh_flat
        inv_s = REF_RADIUS_PX / face_scale(obs)
        offset = (camera.principal[:, None] - obs) * inv_s.view(b, 1, 1)
        fs = camera.focal * inv_s
        rot, trans = init.rotation.to(self.dtype), init.translation.to(self.dtype)
        free = init.expression[:, self.lm.free].to(self.dtype).clamp(0.0, 1.0)
        prev_free = None if previous is None else previous.expression[:, self.lm.free]
        pose_prior = previous is not None and self.config.pose_temporal_weight > 0
        h_prior = self._prior_hessian(b, previous is not None)
        lam = torch.full((b,), damping, device=self.device, dtype=self.dtype)
        on_cpu = self.device.type == "cpu"

        def total(rot: torch.Tensor, trans: torch.Tensor, free: torch.Tensor, jac: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                             torch.Tensor | None]:
            c, dist, g, h = self._evaluate(base, rot, trans, free, offset, fs, jac)
            pc, pg = self._priors(free, prev_free)
            c = c + pc
            if pose_prior:
                assert previous is not None
                qc, qg = self._pose_prior(rot, trans, previous)
                c = c + qc
            if g is None or h is None:
                return c, dist, None, None
            g[:, 6:] += pg
            if pose_prior:
                g[:, :6] += qg
            h.diagonal(dim1=1, dim2=2).add_(h_prior)
            return c, dist, g, h

        cost, dist, grad, hess = total(rot, trans, free, True)
        done = 0
        for it in range(iterations):
            assert grad is not None and hess is not None
            step = self._solve(hess, grad, lam, free)
            rot_n = _rodrigues(step[:, :3]) @ rot
            trans_n = trans + step[:, 3:6]
            free_n = (free + step[:, 6:]).clamp(0.0, 1.0)
            last = it == iterations - 1
            cost_n, dist_n, grad_n, hess_n = total(rot_n, trans_n, free_n, not last)
            ok = cost_n <= cost  # False for NaN
            done += 1
            converged = tolerance > 0 and not last and bool(
                (ok & ((cost - cost_n) < tolerance * cost)).all())
            every = bool(ok.all()) if on_cpu else False
            if every:
                rot, trans, free, dist, cost = rot_n, trans_n, free_n, dist_n, cost_n
                grad, hess = grad_n, hess_n
                lam = (lam * 0.3).clamp_min(1e-7)
            elif on_cpu and not bool(ok.any()):
                lam = (lam * 10.0).clamp_max(1e7)
            else:
                rot = _where(ok, rot_n, rot)
                trans = _where(ok, trans_n, trans)
                free = _where(ok, free_n, free)
                dist = _where(ok, dist_n, dist)
                cost = torch.where(ok, cost_n, cost)
                if not last:
                    assert grad_n is not None and hess_n is not None
                    grad = _where(ok, grad_n, grad)
                    hess = _where(ok, hess_n, hess)
                lam = torch.where(ok, (lam * 0.3).clamp_min(1e-7), (lam * 10.0).clamp_max(1e7))
            if converged:
                break
        expr = init.expression.to(self.dtype).clone()
        expr[:, self.lm.free] = free
        expr[:, self.lm.eyelook] = eyelook
        out = FitState(rot, trans, expr, init.gaze.to(self.dtype))
        resid = dist.median(-1).values / inv_s
        return out, FitInfo(done, cost, resid)

    def _solve(self, hess: torch.Tensor, grad: torch.Tensor, lam: torch.Tensor,
               free: torch.Tensor) -> torch.Tensor:
        """The damped, bound-respecting Gauss-Newton step [B, P]: an expression coefficient
        at 0 whose gradient pushes it below (or at 1 pushing above) is held this step."""
        g_free = grad[:, 6:]
        held = torch.where(g_free > 0.0, free <= 0.0, free >= 1.0) & (g_free != 0.0)
        held = torch.nn.functional.pad(held.to(hess.dtype), (6, 0))
        h = hess.clone()
        diag = h.diagonal(dim1=1, dim2=2)
        diag.add_(torch.addcmul(held * 1e10 + 1e-6, diag, lam[:, None]))
        step = torch.linalg.solve(h, (grad * (held - 1.0)).unsqueeze(-1)).squeeze(-1)
        return torch.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)

    # ---- joint calibration ---------------------------------------------------------------
    def calibrate(self, observed: torch.Tensor, init: FitState, identity: torch.Tensor,
                  camera: Camera, iterations: int = 30, fit_focal: bool = True,
                  focal_prior: float | None = None) -> tuple[torch.Tensor, Camera, FitState]:
        """Fit identity [100] and focal length jointly with K keyframes' per-frame unknowns.

        observed [K, 478, 2]; init: the keyframes' starting states (K); identity [100]
        start; camera: the starting camera (K copies; the focal prior is centred on its
        focal unless `focal_prior` is given). Levenberg-Marquardt on all unknowns at once,
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
            shared = torch.cat([ident, log_f - log_f0])
            cost = c.sum() + pc.sum() + 0.5 * (prior_c * shared * shared).sum()
            a = h[:, :p, :p].clone()
            a.diagonal(dim1=1, dim2=2).add_(h_prior)
            ga = g[:, :p].clone()
            ga[:, 6:] += pg
            bm = h[:, :p, p:]  # K,p,101
            cc = h[:, p:, p:].sum(0) + torch.diag(prior_c)
            gc = g[:, p:].sum(0) + prior_c * shared
            if not fit_focal:
                bm = bm.clone()
                bm[..., -1] = 0.0
                cc[-1, :] = 0.0
                cc[:, -1] = 0.0
                cc[-1, -1] = 1.0
                gc[-1] = 0.0
            return cost, a, ga, bm, cc, gc

        lam = 1e-2
        cost, a, ga, bm, cc, gc = total(rot, trans, free, ident, log_f)
        for _ in range(iterations):
            g_free = ga[:, 6:]
            held = ((free <= 0.0) & (g_free > 0.0)) | ((free >= 1.0) & (g_free < 0.0))
            keep = torch.cat([torch.ones_like(held[:, :6]), ~held], -1).to(dt)
            ad = a.clone()
            d = ad.diagonal(dim1=1, dim2=2)
            d.add_(lam * d + 1e-9 + (1.0 - keep) * 1e12)
            bmk = bm * keep[..., None]
            sc = cc.clone()
            sc.diagonal().add_(lam * sc.diagonal() + 1e-9)
            # Schur complement on the shared block
            sol = torch.linalg.solve(ad, torch.cat([bmk, (ga * keep)[..., None]], -1))
            s_mat = sc - (bmk.transpose(1, 2) @ sol[..., :-1]).sum(0)
            rhs = gc - (bmk.transpose(1, 2) @ sol[..., -1:]).sum(0)[:, 0]
            d_shared = -torch.linalg.solve(s_mat, rhs)
            d_frame = -(sol[..., -1] + sol[..., :-1] @ d_shared) * keep
            cand = (_rodrigues(d_frame[:, :3]) @ rot, trans + d_frame[:, 3:6],
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
                 camera: Camera, previous: torch.Tensor | None = None, iterations: int = 3
                 ) -> torch.Tensor:
        """Per-eye yaw and pitch [B, 2, 2] from the iris points of observed [B, 478, 2].

        The model's five iris landmarks of each eye rotate about the fitted eyeball centre
        (DESIGN.md's gaze); Gauss-Newton on their reprojection, starting at `state.gaze`,
        with a weak prior toward looking ahead, a coupling of the two eyes, and, for an eye
        that closes (eyeBlink above 0.4), a hold on `previous` (default: `state.gaze`).
        """
        cfg = self.config
        b = state.batch
        dt = self.dtype
        ident = _batch(identity.to(dt), b)
        obs = observed[:, self.lm.iris_ids].to(dt)  # B,2,5,2
        inv_s = (REF_RADIUS_PX / face_scale(observed.to(dt))).view(b, 1, 1)
        expr0 = state.expression.to(dt).clone()
        expr0[:, self.lm.eyelook] = 0.0
        pts = self.lm.points(ident, expr0)[:, self.lm.iris_ids]  # B,2,5,3 at gaze 0
        centres = self.lm.eye_centres(ident)[:, :, None]  # B,2,1,3
        rel = pts - centres
        names = self.lm.expression_names
        blink = state.expression[:, [names.index("eyeBlink_L"), names.index("eyeBlink_R")]]
        w_eye = ((0.75 - blink.to(dt)) / 0.35).clamp(0.0, 1.0)  # B,2: 1 open, 0 closed
        prev = (state.gaze if previous is None else previous).to(dt).reshape(b, 4)
        gaze = state.gaze.to(dt).clone()
        rot = state.rotation.to(dt)
        rot_t = rot[:, None].transpose(-1, -2)  # B,1,3,3
        trans = state.translation.to(dt)[:, None, None]
        fs = (camera.focal.view(b, 1, 1) * inv_s)[..., None]  # B,1,1,1
        cs = (camera.principal.view(b, 1, 1, 2) - obs) * inv_s[..., None]  # B,2,5,2
        hold = ((1.0 - w_eye).repeat_interleave(2, 1) * cfg.gaze_hold_weight)  # B,4
        wc = torch.as_tensor([cfg.gaze_coupling_yaw, cfg.gaze_coupling_pitch],
                             device=self.device, dtype=dt)
        coupling = torch.zeros(4, 4, device=self.device, dtype=dt)
        for k in range(2):
            coupling[k, k] = coupling[k + 2, k + 2] = wc[k]
            coupling[k, k + 2] = coupling[k + 2, k] = -wc[k]
        h_prior = torch.diag_embed(cfg.gaze_prior_weight + 1e-6 + hold) + coupling
        for _ in range(iterations):
            rg, d_yaw, d_pitch = _gaze_rotation_and_derivatives(gaze)  # B,2,3,3 each
            y = (centres + rel @ rg.transpose(-1, -2)) @ rot_t + trans  # B,2,5,3
            iz = 1.0 / y[..., 2:].clamp_min(_MIN_DEPTH)
            xy = y[..., :2] * iz
            r = fs * xy + cs  # B,2,5,2 normalised pixels
            cols = []
            for d_rot in (d_yaw, d_pitch):
                dv = (rel @ d_rot.transpose(-1, -2)) @ rot_t  # B,2,5,3
                cols.append(fs * iz * (dv[..., :2] - xy * dv[..., 2:]))
            jac = torch.stack(cols, -1).flatten(2, 3)  # B,2,10,2
            jw = (jac * w_eye[:, :, None, None]).transpose(-1, -2)  # B,2,2,10
            h_eye = jw @ jac  # B,2,2,2
            g_eye = (jw @ r.flatten(2, 3)[..., None])[..., 0]  # B,2,2
            zero = torch.zeros_like(h_eye[:, 0])
            hess = torch.cat([torch.cat([h_eye[:, 0], zero], -1),
                              torch.cat([zero, h_eye[:, 1]], -1)], -2)  # B,4,4
            g_flat = gaze.reshape(b, 4)
            grad = g_eye.reshape(b, 4) + cfg.gaze_prior_weight * g_flat \
                + hold * (g_flat - prev) + g_flat @ coupling
            step = torch.linalg.solve(hess + h_prior, -grad[..., None])[..., 0]
            gaze = (gaze + torch.nan_to_num(step).view(b, 2, 2)).clamp(-1.0, 1.0)
        return gaze


def _gaze_rotation_and_derivatives(gaze: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gaze_rotation of gaze [..., 2] (yaw, pitch) and its derivatives by yaw and pitch."""
    ca, sa = torch.cos(-gaze[..., 0]), torch.sin(-gaze[..., 0])
    cb, sb = torch.cos(-gaze[..., 1]), torch.sin(-gaze[..., 1])
    one, zero = torch.ones_like(ca), torch.zeros_like(ca)
    shape = gaze.shape[:-1] + (3, 3)
    ry = torch.stack([ca, zero, sa, zero, one, zero, -sa, zero, ca], -1).view(shape)
    rx = torch.stack([one, zero, zero, zero, cb, -sb, zero, sb, cb], -1).view(shape)
    dry = torch.stack([-sa, zero, ca, zero, zero, zero, -ca, zero, -sa], -1).view(shape)
    drx = torch.stack([zero, zero, zero, zero, -sb, -cb, zero, cb, -sb], -1).view(shape)
    return ry @ rx, -(dry @ rx), -(ry @ drx)


def _batch(identity: torch.Tensor, b: int) -> torch.Tensor:
    return identity.expand(b, -1) if identity.dim() == 2 else identity[None].expand(b, -1)


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view((-1,) + (1,) * (a.dim() - 1)), a, b)
