"""Analysis-by-synthesis refinement of tracked faces: a dense colour term on top of landmarks.

The landmark fit (`tracker.tracker.track_landmarks`) sees 468 points. This module renders
the face model with the current parameters and compares the rendering with the frame over
the face, pixel by pixel, as Face2Face and Deep Video Portraits' tracker do, and moves pose,
expression, identity, focal length, albedo and lighting so that they agree, the landmark
term kept.

Rendering (differentiable): the face is cut out of every frame into an R x R crop
(`settings.size`, a fixed box around the landmark fit's face, `crop_boxes` /
`face_crops`) whose camera is the source camera scaled and shifted. The ICT `face` region is
rasterized with the current parameters (no gradient: triangle ids only); then, with the
triangle of each pixel held fixed, its barycentrics at the pixel centre are recomputed in
torch from the projected vertices (edge functions, perspective-correct), so that the colour

    albedo(uv(bary)) * SH irradiance(normal(bary))

is a differentiable function of the vertices and hence of pose, expression and identity, and
of the albedo texture and the lighting. Pixels used: the narrow face (cheeks, brows, nose,
lips, chin; `tracker.face_model.NARROW_FACE`) away (`erode_px`) from the rendered face's
edges, i.e. from the silhouette and from the eye and mouth openings, inside the frame.
Robust: each pixel's colour residual r enters as (sigma^2/2) log(1 + |r|^2 / sigma^2)
(Cauchy; `colour_sigma`), so occluders (hair, hands, glasses) weigh little; as weights
w = 1 / (1 + |r|^2 / sigma^2) in Gauss-Newton (IRLS).

Cost per frame, in the landmark fit's units (tracker.fitting: normalised pixels):

    landmark term and expression priors of tracker.fitting (Huber on 468 points)
    + photometric_weight * 468 * mean over the face pixels of log(1 + |r|^2/sigma^2) / 2

so that with weight 1 the dense term counts as much as the 468 landmarks at their noise.

Two stages:

1. **Keyframes** (`keyframes`, spread over head poses and time as the calibration's): Adam
   (`keyframe_steps`) on everything at once: identity (N(0,1) prior), focal length (when
   not given), the albedo texture (face UV tile, `albedo_size`; initialised by splatting the
   frames under ambient light; total variation), per keyframe lighting (SH, 9x3; gauge: the
   mean constant term white) and pose and expression. The crops are rasterized again every
   `raster_every` steps.
2. **Every frame**, batched (`batch` frames at a time, independent): identity, focal and
   albedo fixed; a few Levenberg-Marquardt iterations (`iterations`) from the landmark fit
   (re-fitted to landmarks once for the new identity and focal). Per iteration: rasterize,
   solve the frame's lighting in closed form (robust weighted least squares, ridge toward
   the keyframes' mean), take the Jacobian of every pixel's colour in pose and the 45 free
   expressions by forward-mode differentiation (one `torch.func.jvp` per unknown, batched
   with `vmap`), add the landmark term's normal equations
   (`tracker.fitting.LandmarkFitter.normal_equations`) and take `solve_step` (damped, the
   expression box [0, 1] kept); the step is kept where the cost (same triangle ids) went
   down. Gaze is fitted again from the irises for the refined pose, and the result is
   smoothed by the tracker's One-Euro filter when `tracker.smoothing` is on.

Offline (`dvp track`, `dvp prepare`): `refine_video` after the landmark fit, when
`renderer.refine` is on. All torch; CUDA and CPU alike (the CuPy rasterizer on CUDA).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from renderer.config import RendererConfig
from renderer.photometric import gauge_sh
from renderer.raster import rasterize
from renderer.sh import AMBIENT_L00, irradiance_basis
from tracker.config import TrackerConfig
from tracker.face_model import NARROW_FACE, FaceModel, gaze_to_eyelook
from tracker.fitting import (
    Camera,
    FitState,
    LandmarkFitter,
    params_landmarks,
)
from tracker.geometry import vertex_normals
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix, matrix_to_axis_angle
from tracker.smoothing import ParamSmoother, SmoothingSettings
from tracker.tracker import select_keyframes

log = logging.getLogger(__name__)

N_MESH = 468
_DEBUG = False


@dataclass(frozen=True)
class RefineSettings:
    """How the refinement runs (RendererConfig's `refine_*` fields; see the module doc)."""

    size: int = 128
    margin: float = 1.3
    keyframes: int = 16
    keyframe_steps: int = 100
    iterations: int = 3
    photometric_weight: float = 1.0
    landmark_weight: float = 1.0
    colour_sigma: float = 0.06
    albedo_size: int = 128
    batch: int = 32
    raster_every: int = 10
    erode_px: int = 1
    fit_identity: bool = True
    fit_focal: bool = True
    rasterizer: str = "auto"

    @classmethod
    def from_config(cls, config: RendererConfig, fit_focal: bool = True) -> RefineSettings:
        return cls(size=config.refine_size, keyframes=config.refine_keyframes,
                   keyframe_steps=config.refine_keyframe_steps,
                   iterations=config.refine_iterations,
                   photometric_weight=config.refine_photometric_weight,
                   landmark_weight=config.refine_landmark_weight,
                   colour_sigma=config.refine_colour_sigma, batch=config.refine_batch,
                   fit_focal=fit_focal, rasterizer=config.rasterizer)


@dataclass(frozen=True)
class FaceCrops:
    """The face cut out of T frames: images (T, R, R, 3) uint8 RGB; boxes (T, 3) int64
    (x0, y0, side) in source pixels (a crop pixel (i, j) covers source pixels
    x0 + (j + [0, 1]) side / R, likewise y); inside (T, R, R) bool: crop pixels that lie in
    the source frame (the rest is padding)."""

    images: np.ndarray
    boxes: np.ndarray
    inside: np.ndarray

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def camera(self, focal: torch.Tensor, principal: np.ndarray, index: np.ndarray,
               device: torch.device) -> Camera:
        """Crop cameras of frames `index`: focal [] or [B] (source px, tensor: gradients
        pass), principal (2,) source px."""
        box = torch.as_tensor(self.boxes[index], dtype=torch.float64, device=device)
        scale = (self.size / box[:, 2])
        f = focal.to(torch.float64) * scale
        c = (torch.as_tensor(np.asarray(principal, np.float64), device=device)[None]
             - box[:, :2]) * scale[:, None]
        return Camera(f.float(), c.float())

    def to_crop(self, points: np.ndarray, index: np.ndarray) -> np.ndarray:
        """Source pixels [B, N, 2] of frames `index` in crop pixels."""
        box = self.boxes[index].astype(np.float64)
        return ((points - box[:, None, :2]) * (self.size / box[:, None, 2:3])).astype(
            np.float32)


def crop_boxes(model: FaceModel, params: FaceParams, margin: float = 1.3) -> np.ndarray:
    """Square boxes (T, 3) int64 (x0, y0, side) around each frame's fitted face (the
    projected landmarks' box, `margin` times its larger side); frames without a face take
    the nearest valid frame's box (the whole image when none is valid)."""
    from tracker.fitting import LandmarkModel

    t_all = params.frames
    h, w = (int(v) for v in params.image_size)
    boxes = np.zeros((t_all, 3), np.int64)
    valid = np.nonzero(params.valid)[0]
    if len(valid) == 0:
        side = max(h, w)
        boxes[:] = [(w - side) // 2, (h - side) // 2, side]
        return boxes
    pts = params_landmarks(LandmarkModel(model), params.select(valid))[:, :N_MESH]
    lo, hi = pts.min(1), pts.max(1)
    centre = (lo + hi) / 2
    side = np.maximum(np.ceil(margin * (hi - lo).max(1)), 8.0)
    own = np.stack([np.floor(centre[:, 0] - side / 2), np.floor(centre[:, 1] - side / 2),
                    side], 1).astype(np.int64)
    nearest = valid[np.abs(np.arange(t_all)[:, None] - valid[None]).argmin(1)]
    where = np.searchsorted(valid, nearest)
    boxes[:] = own[where]
    return boxes


def crop_frame(frame: np.ndarray, box: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(crop (R, R, 3) uint8, inside (R, R) bool) of one frame (H, W, 3) and box."""
    x0, y0, side = (int(v) for v in box)
    h, w = frame.shape[:2]
    patch = np.zeros((side, side, 3), np.uint8)
    inside = np.zeros((side, side), np.uint8)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
    if xa < xb and ya < yb:
        patch[ya - y0:yb - y0, xa - x0:xb - x0] = frame[ya:yb, xa:xb]
        inside[ya - y0:yb - y0, xa - x0:xb - x0] = 1
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    crop = cv2.resize(patch, (size, size), interpolation=interp)
    ins = cv2.resize(inside * 255, (size, size), interpolation=cv2.INTER_AREA) == 255
    return crop, ins


def face_crops(frames: Iterable[np.ndarray], boxes: np.ndarray, size: int,
               progress: Callable[[int], None] | None = None) -> FaceCrops:
    """Cut the boxes (T, 3) out of T frames (H, W, 3) uint8 RGB, in one pass over them."""
    t_all = len(boxes)
    images = np.zeros((t_all, size, size, 3), np.uint8)
    inside = np.zeros((t_all, size, size), bool)
    n = 0
    for frame in frames:
        if n >= t_all:
            break
        images[n], inside[n] = crop_frame(np.asarray(frame), boxes[n], size)
        n += 1
        if progress is not None:
            progress(1)
    if n != t_all:
        raise ValueError(f"{n} frames for {t_all} crop boxes")
    return FaceCrops(images, boxes, inside)


# ---- the differentiable face rendering ---------------------------------------------------
@dataclass(frozen=True)
class _Pixels:
    """The face pixels of B crops, padded to N per frame: index (B, N) long pixel i * R + j
    (0 where padding); mask (B, N) float 1 / 0; tri (B, N) long local triangle; xy (B, N, 2)
    pixel centres; target (B, N, 3) colours in [0, 1]."""

    index: torch.Tensor
    mask: torch.Tensor
    tri: torch.Tensor
    xy: torch.Tensor
    target: torch.Tensor

    @property
    def count(self) -> torch.Tensor:
        return self.mask.sum(1).clamp_min(1.0)


class FaceRenderer:
    """The ICT `face` region as torch constants on a device, and its differentiable colour
    at fixed triangle ids (module doc). Vertices V = the face region's, F its triangles."""

    def __init__(self, model: FaceModel, device: torch.device | str = "cpu",
                 rasterizer: str = "auto") -> None:
        dev = torch.device(device)
        self.device = dev
        self.rasterizer = rasterizer
        face = model.region_triangles("face")
        tris = model.triangles[face].astype(np.int64)
        vids = np.unique(tris)
        local = np.full(model.n_vertices, -1, np.int64)
        local[vids] = np.arange(len(vids))
        self.n_vertices = len(vids)
        self.tris = torch.as_tensor(local[tris], device=dev)
        self.tris32 = self.tris.to(torch.int32)
        self.narrow = torch.as_tensor((tris < NARROW_FACE).all(1), device=dev)
        uv = model.uvs[model.triangle_uvs[face]].astype(np.float32)  # F,3,2 (tile 0)
        self.uv = torch.as_tensor(uv, device=dev)
        tt = {"device": dev, "dtype": torch.float32}
        self.mean = torch.as_tensor(model.neutral[vids], **tt)
        n_id = model.identity_basis.shape[0]
        self.identity = torch.as_tensor(model.identity_basis[:, vids].reshape(n_id, -1), **tt)
        n_ex = model.expression_basis.shape[0]
        self.expression = torch.as_tensor(model.expression_basis[:, vids].reshape(n_ex, -1), **tt)
        self.eyelook = torch.as_tensor(model.eyelook_indices, device=dev)
        self.free = torch.as_tensor([i for i in range(n_ex)
                                     if i not in set(model.eyelook_indices.tolist())], device=dev)

    def vertices(self, identity: torch.Tensor, expression: torch.Tensor) -> torch.Tensor:
        """Model-frame vertices [B, V, 3] of identity [100] or [B, 100], expression [B, 53]."""
        b = expression.shape[0]
        base = self.mean.reshape(1, -1) + (identity.reshape(-1, self.identity.shape[0])
                                           @ self.identity)
        return (base + expression @ self.expression).view(b, -1, 3)

    def screen(self, camera_points: torch.Tensor, camera: Camera) -> torch.Tensor:
        """[B, V, 3] (u, v px, z cm) of camera-space points [B, V, 3]."""
        z = camera_points[..., 2:].clamp_min(1.0)
        uv = camera.focal.view(-1, 1, 1) * camera_points[..., :2] / z \
            + camera.principal[:, None]
        return torch.cat([uv, camera_points[..., 2:]], -1)

    def pixels(self, screen: torch.Tensor, crops: torch.Tensor, inside: torch.Tensor,
               erode_px: int) -> _Pixels:
        """Rasterize [B, V, 3] screen vertices at the crops' size and pick the face pixels
        (module doc); crops [B, R, R, 3] uint8 (or float in [0, 1]), inside [B, R, R]
        bool."""
        b, r = crops.shape[0], crops.shape[1]
        raster = rasterize(screen.detach().float().contiguous(), self.tris32, r, r,
                           backend=self.rasterizer, trusted_triangles=True)
        tri = raster.triangle.long()  # B,R,R
        covered = tri >= 0
        good = covered & self.narrow[tri.clamp_min(0)] & inside
        if erode_px > 0:
            k = 2 * erode_px + 1
            empty = F.max_pool2d((~covered).float()[:, None], k, 1, erode_px)[:, 0] > 0
            good &= ~empty
        flat = good.view(b, -1)
        counts = flat.sum(1)
        n = max(int(counts.max()), 1)
        # the first n good pixels of each frame (padding: pixel 0 with mask 0)
        order = torch.argsort((~flat).to(torch.int8), dim=1, stable=True)[:, :n]
        mask = torch.gather(flat, 1, order).float()
        index = order * mask.long()
        tri_p = torch.gather(tri.view(b, -1).clamp_min(0), 1, index)
        x = (index % r).float() + 0.5
        y = torch.div(index, r, rounding_mode="floor").float() + 0.5
        colours = crops.float() / 255.0 if crops.dtype == torch.uint8 else crops.float()
        target = torch.gather(colours.reshape(b, -1, 3), 1, index[..., None].expand(-1, -1, 3))
        return _Pixels(index, mask, tri_p, torch.stack([x, y], -1), target)

    def colour(self, screen: torch.Tensor, normals: torch.Tensor, texture: torch.Tensor,
               sh: torch.Tensor | None, px: _Pixels
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(colour [B, N, 3], albedo [B, N, 3], irradiance basis [B, N, 9]) at the pixels,
        barycentrics recomputed from `screen` [B, V, 3] (differentiable); normals [B, V, 3]
        camera space; texture [3, A, A] (face UV tile); sh [B, 9, 3] (None: colour is the
        albedo)."""
        b, n = px.tri.shape
        v = screen.shape[1]
        corner = self.tris[px.tri]  # B,N,3
        flat = (corner + (torch.arange(b, device=screen.device) * v).view(b, 1, 1)).view(-1)
        p = screen.reshape(-1, 3).index_select(0, flat).view(b, n, 3, 3)
        nrm = normals.reshape(-1, 3).index_select(0, flat).view(b, n, 3, 3)
        return self.corner_colour(p, nrm, texture, sh, px, parts=True)  # type: ignore[return-value]

    def corner_colour(self, p: torch.Tensor, normals: torch.Tensor, texture: torch.Tensor,
                      sh: torch.Tensor | None, px: _Pixels, parts: bool = False
                      ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The pixels' colour [B, N, 3] from their triangles' corners: screen [B, N, 3, 3]
        (corner, (u, v, z)) and normals [B, N, 3, 3]; with `parts` also albedo and the
        irradiance basis (see `colour`)."""
        x, y = px.xy[..., 0], px.xy[..., 1]
        e = []
        for i, j in ((1, 2), (2, 0), (0, 1)):
            e.append((p[..., j, 0] - p[..., i, 0]) * (y - p[..., i, 1])
                     - (p[..., j, 1] - p[..., i, 1]) * (x - p[..., i, 0]))
        # perspective-correct barycentrics: (e_k / z_k) / sum_j (e_j / z_j)
        q = torch.stack(e, -1) / p[..., 2].clamp_min(1.0)
        total = q.sum(-1, keepdim=True)
        total = torch.where(total.abs() > 1e-12, total, torch.full_like(total, 1e-12))
        bary = q / total
        uv = (self.uv[px.tri] * bary[..., None]).sum(-2)  # B,N,2
        albedo = _bilinear(texture, uv)
        nrm = (normals * bary[..., None]).sum(-2)
        nrm = nrm / nrm.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        basis = irradiance_basis(nrm)
        if sh is None:
            colour = albedo
        else:
            colour = albedo * torch.bmm(basis, sh).clamp_min(0.0)
        return (colour, albedo, basis) if parts else colour

    def normals(self, camera_points: torch.Tensor) -> torch.Tensor:
        """Unit vertex normals [B, V, 3] (area-weighted; differentiable)."""
        return vertex_normals(camera_points, self.tris)


def _bilinear(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples [..., 3] of a texture [3, A, A] at uv [..., 2] (u right, v up; texel
    centres at (k + 0.5) / A; clamped at the border). Plain gathers: differentiable in both,
    forward mode included."""
    a = texture.shape[-1]
    x = (uv[..., 0].clamp(0.0, 1.0) * a - 0.5).clamp(0.0, a - 1.0)
    y = ((1.0 - uv[..., 1].clamp(0.0, 1.0)) * a - 0.5).clamp(0.0, a - 1.0)
    x0 = x.detach().floor().clamp(0, a - 2)
    y0 = y.detach().floor().clamp(0, a - 2)
    fx, fy = (x - x0)[..., None], (y - y0)[..., None]
    flat = texture.reshape(3, -1).t()  # A*A,3
    i = (y0 * a + x0).long()

    def at(k: torch.Tensor) -> torch.Tensor:
        return flat.index_select(0, k.reshape(-1)).view(k.shape + (3,))

    return ((at(i) * (1 - fx) + at(i + 1) * fx) * (1 - fy)
            + (at(i + a) * (1 - fx) + at(i + a + 1) * fx) * fy)


def _cauchy(residual: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cost log(1 + |r|^2/sigma^2) / 2 [B, N], IRLS weight [B, N]) of residuals [B, N, 3]."""
    s = (residual * residual).sum(-1) / (sigma * sigma)
    return 0.5 * torch.log1p(s), 1.0 / (1.0 + s)


def _solve_sh(basis: torch.Tensor, albedo: torch.Tensor, target: torch.Tensor,
              weight: torch.Tensor, prior: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Per-frame lighting [B, 9, 3]: weighted least squares of albedo * (basis . L) on the
    target colours, with a ridge toward `prior` [9, 3] (constant term 100 x weaker)."""
    b = basis.shape[0]
    w = weight / weight.sum(1, keepdim=True).clamp_min(1e-9)  # B,N
    r = torch.full((9,), ridge, device=basis.device, dtype=basis.dtype)
    r[0] = ridge * 0.01
    out = []
    for c in range(3):
        d = basis * albedo[..., c:c + 1]  # B,N,9
        dw = d * w[..., None]
        lhs = dw.transpose(1, 2) @ d + torch.diag(r)
        rhs = (dw * target[..., c:c + 1]).sum(1) + r * prior[:, c]
        out.append(torch.linalg.solve(lhs.double(), rhs.double()).float())
    return torch.stack(out, -1).view(b, 9, 3)


# ---- the refinement ----------------------------------------------------------------------
@dataclass(frozen=True)
class Refined:
    """Result of `refine`: params (the refined FaceParams, source camera, `sh` the per-frame
    lighting); texture (A, A, 3) float32 face-tile albedo; rmse_before / rmse_after (T,)
    robust-weighted RMS colour error over each frame's face pixels (NaN when not refined);
    seconds per stage."""

    params: FaceParams
    texture: np.ndarray
    rmse_before: np.ndarray
    rmse_after: np.ndarray
    seconds: dict[str, float]


class Refiner:
    """Refines tracked parameters against the frames (module doc)."""

    def __init__(self, model: FaceModel, tracker_config: TrackerConfig | None = None,
                 settings: RefineSettings | None = None,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.tc = tracker_config or TrackerConfig()
        self.settings = settings or RefineSettings()
        self.device = torch.device(device)
        self.face = FaceRenderer(model, self.device, self.settings.rasterizer)
        self.fitter = LandmarkFitter(model, self.tc, self.device)
        self.lm = self.fitter.lm

    # ---- helpers -------------------------------------------------------------------------
    def _state(self, params: FaceParams, index: np.ndarray) -> FitState:
        dev = self.device
        return FitState(axis_angle_to_matrix(torch.as_tensor(params.rotation[index], device=dev)),
                        torch.as_tensor(params.translation[index], device=dev),
                        torch.as_tensor(params.expression[index], device=dev),
                        torch.as_tensor(params.gaze[index], device=dev))

    def _photo_scale(self, px: _Pixels) -> torch.Tensor:
        """[B]: the dense term's weight per pixel of each frame (module doc)."""
        s = self.settings
        return s.photometric_weight * N_MESH / px.count

    # ---- stage 1: keyframes --------------------------------------------------------------
    def keyframe_fit(self, params: FaceParams, crops: FaceCrops, observed: np.ndarray,
                     keys: np.ndarray, progress: Callable[[int], None] | None = None
                     ) -> tuple[torch.Tensor, float, torch.Tensor, torch.Tensor]:
        """(identity [100], focal px, texture [3, A, A], mean lighting [9, 3]) fitted by Adam
        over keyframes `keys` (module doc, stage 1). observed: landmarks (T, 478, 2) source
        pixels."""
        s, dev, face = self.settings, self.device, self.face
        k = len(keys)
        images = torch.as_tensor(crops.images[keys], device=dev)
        inside = torch.as_tensor(crops.inside[keys], device=dev)
        obs = torch.as_tensor(crops.to_crop(observed[keys], keys), device=dev)
        state = self._state(params, keys)
        rot0, trans0 = state.rotation, state.translation
        expr0 = state.expression
        ident = torch.as_tensor(params.identity, device=dev).clone().requires_grad_(
            s.fit_identity)
        log_f0 = math.log(float(params.focal[0]))
        log_f = torch.tensor(log_f0, device=dev, dtype=torch.float64,
                             requires_grad=s.fit_focal)
        d_rot = torch.zeros(k, 3, device=dev, requires_grad=True)
        trans = trans0.clone().requires_grad_(True)
        free = expr0[:, self.lm.free].clone().requires_grad_(True)
        cam0 = crops.camera(torch.exp(log_f.detach()), params.principal_point, keys, dev)
        # albedo: splat colour / ambient irradiance of the landmark fit
        with torch.no_grad():
            verts = face.vertices(ident, expr0)
            xc = verts @ rot0.transpose(1, 2) + trans0[:, None]
            scr = face.screen(xc, cam0)
            px = face.pixels(scr, images, inside, s.erode_px)
            texture0 = self._splat(scr, px, s.albedo_size)
        texture = texture0.clone().requires_grad_(True)
        sh_raw = torch.zeros(k, 9, 3, device=dev)
        sh_raw[:, 0] = AMBIENT_L00
        sh_raw.requires_grad_(True)
        groups = [{"params": [texture], "lr": 0.02}, {"params": [sh_raw], "lr": 0.02},
                  {"params": [d_rot], "lr": 2e-3}, {"params": [trans], "lr": 0.05},
                  {"params": [free], "lr": 0.01}]
        if s.fit_identity:
            groups.append({"params": [ident], "lr": 0.03})
        if s.fit_focal:
            groups.append({"params": [log_f], "lr": 3e-3})
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, s.keyframe_steps))
        gaze = state.gaze
        px = None
        for step in range(s.keyframe_steps):
            expr = expr0.clone()
            expr[:, self.lm.free] = free.clamp(0.0, 1.0)
            rot = axis_angle_to_matrix(d_rot) @ rot0
            cam = crops.camera(torch.exp(log_f), params.principal_point, keys, dev)
            verts = face.vertices(ident, expr)
            xc = verts @ rot.transpose(1, 2) + trans[:, None]
            scr = face.screen(xc, cam)
            if px is None or step % max(1, s.raster_every) == 0:
                px = face.pixels(scr, images, inside, s.erode_px)
            sh = gauge_sh(sh_raw)
            colour, _, _ = face.colour(scr, face.normals(xc).detach(), texture, sh, px)
            cost_p, _ = _cauchy(colour - px.target, s.colour_sigma)
            photo = (self._photo_scale(px) * (cost_p * px.mask).sum(1)).sum()
            # landmark term and expression priors, as the landmark fit has them
            lmk, _, _ = self.fitter.normal_equations(obs, FitState(rot, trans, expr, gaze),
                                                     ident, cam, jacobian=False)
            prior_i = 0.5 * self.tc.identity_weight * (ident * ident).sum()
            prior_f = 0.5 * self.tc.focal_weight * (log_f - log_f0) ** 2
            tv = ((texture[:, 1:] - texture[:, :-1]).abs().mean()
                  + (texture[:, :, 1:] - texture[:, :, :-1]).abs().mean())
            bands = sh[:, 1:]
            light = ((bands - bands.mean(0, keepdim=True)) ** 2).sum() + 0.1 * (bands ** 2).sum()
            loss = photo + s.landmark_weight * lmk.sum() + prior_i + prior_f.float() + 20.0 * k * tv \
                + 10.0 * light
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                free.clamp_(0.0, 1.0)
                texture.clamp_(0.0, 1.0)
            if progress is not None:
                progress(1)
        with torch.no_grad():
            sh_mean = gauge_sh(sh_raw).mean(0)
        return (ident.detach(), float(torch.exp(log_f.detach())), texture.detach(),
                sh_mean.detach())

    def _splat(self, screen: torch.Tensor, px: _Pixels, size: int) -> torch.Tensor:
        """Texture [3, A, A]: the mean colour of the pixels that land on each texel (nearest
        texel), the median face colour where none does; a little blurred."""
        dev = self.device
        b, n = px.tri.shape
        corner = self.face.tris[px.tri]
        v = screen.shape[1]
        flat = (corner + (torch.arange(b, device=dev) * v).view(b, 1, 1)).view(-1)
        p = screen.reshape(-1, 3).index_select(0, flat).view(b, n, 3, 3)
        x, y = px.xy[..., 0], px.xy[..., 1]
        e = [(p[..., j, 0] - p[..., i, 0]) * (y - p[..., i, 1])
             - (p[..., j, 1] - p[..., i, 1]) * (x - p[..., i, 0])
             for i, j in ((1, 2), (2, 0), (0, 1))]
        lam = torch.stack(e, -1)
        q = lam / lam.sum(-1, keepdim=True) / p[..., 2].clamp_min(1.0)
        bary = q / q.sum(-1, keepdim=True)
        uv = (self.face.uv[px.tri] * bary[..., None]).sum(-2)
        tx = (uv[..., 0].clamp(0, 1) * size).long().clamp(0, size - 1)
        ty = ((1.0 - uv[..., 1].clamp(0, 1)) * size).long().clamp(0, size - 1)
        keep = px.mask.view(-1) > 0
        cell = (ty * size + tx).view(-1)[keep]
        colour = px.target.reshape(-1, 3)[keep]
        acc = torch.zeros(size * size, 3, device=dev).index_add(0, cell, colour)
        cnt = torch.zeros(size * size, device=dev).index_add(0, cell, torch.ones_like(cell,
                                                                                   dtype=torch.float32))
        fill = colour.median(0).values if colour.numel() else torch.full((3,), 0.5, device=dev)
        tex = torch.where(cnt[:, None] > 0, acc / cnt.clamp_min(1)[:, None], fill)
        tex = tex.t().reshape(3, size, size)[None]
        tex = F.avg_pool2d(F.pad(tex, (1, 1, 1, 1), mode="replicate"), 3, 1)
        return tex[0].contiguous()

    # ---- stage 2: every frame -------------------------------------------------------------
    def refine_frames(self, params: FaceParams, crops: FaceCrops, observed: np.ndarray,
                      index: np.ndarray, identity: torch.Tensor, focal: float,
                      texture: torch.Tensor, sh_prior: torch.Tensor
                      ) -> tuple[FitState, torch.Tensor, np.ndarray, np.ndarray]:
        """(states, lighting [B, 9, 3], rmse before (B,), rmse after (B,)) of frames `index`
        (module doc, stage 2)."""
        s, dev, face, fitter = self.settings, self.device, self.face, self.fitter
        b = len(index)
        images = torch.as_tensor(crops.images[index], device=dev)
        inside = torch.as_tensor(crops.inside[index], device=dev)
        obs = torch.as_tensor(crops.to_crop(observed[index], index), device=dev)
        cam = crops.camera(torch.tensor(focal, device=dev), params.principal_point, index, dev)
        state = self._state(params, index)
        # the landmark fit again, for the keyframe stage's identity and focal length
        if s.landmark_weight > 0:
            state, _ = fitter.fit(obs, state, identity, cam, self.tc.iterations_warm)
        lam = torch.full((b,), 1e-3, device=dev)
        rmse0 = rmse1 = np.full(b, np.nan)
        sh = sh_prior[None].expand(b, 9, 3).contiguous()
        tex = texture
        for it in range(max(0, s.iterations)):
            with torch.no_grad():
                verts = face.vertices(identity, state.expression)
                xc = verts @ state.rotation.transpose(1, 2) + state.translation[:, None]
                scr = face.screen(xc, cam)
                normals = face.normals(xc)
                px = face.pixels(scr, images, inside, s.erode_px)
                _, albedo, basis = face.colour(scr, normals, tex, None, px)
                irr_w = px.mask
                for _ in range(2):  # lighting by robust least squares
                    sh = _solve_sh(basis, albedo, px.target, irr_w, sh_prior)
                    colour = albedo * torch.bmm(basis, sh).clamp_min(0.0)
                    cost_p, w = _cauchy(colour - px.target, s.colour_sigma)
                    irr_w = w * px.mask
                if it == 0:
                    rmse0 = ((((colour - px.target) ** 2).sum(-1) * irr_w).sum(1)
                             / irr_w.sum(1).clamp_min(1e-9) / 3.0).sqrt().cpu().numpy()
            jac, resid = self._jacobian(state, identity, cam, tex, sh, normals, px)
            scale = self._photo_scale(px) / (s.colour_sigma ** 2)  # B
            ww = (w * px.mask)[..., None] * scale.view(b, 1, 1)  # B,N,1
            jw = (jac * ww[..., None]).reshape(b, -1, jac.shape[-1])  # B,3N,P
            jf = jac.reshape(b, -1, jac.shape[-1])
            h_p = jw.transpose(1, 2) @ jf
            g_p = (jw * resid.reshape(b, -1, 1)).sum(1)
            c_l, g_l, h_l = self._landmarks(obs, state, identity, cam, True)
            assert g_l is not None and h_l is not None
            photo_cost = self._photo_scale(px) * (cost_p * px.mask).sum(1)
            cost = c_l + photo_cost
            free = state.expression[:, self.lm.free]
            step = fitter.solve_step(h_l + h_p, g_l + g_p, lam, free)
            cand = fitter.apply_step(state, step)
            with torch.no_grad():
                c_new, _, _ = self._landmarks(obs, cand, identity, cam, False)
                verts = face.vertices(identity, cand.expression)
                xn = verts @ cand.rotation.transpose(1, 2) + cand.translation[:, None]
                colour_n, _, _ = face.colour(face.screen(xn, cam), normals, tex, sh, px)
                cp_n, _ = _cauchy(colour_n - px.target, s.colour_sigma)
                c_new = c_new + self._photo_scale(px) * (cp_n * px.mask).sum(1)
            ok = c_new <= cost
            state = cand.where(ok, state)
            lam = torch.where(ok, (lam * 0.3).clamp_min(1e-7), (lam * 10.0).clamp_max(1e7))
            if _DEBUG:
                print("it", it, "cost", cost.tolist(), "new", c_new.tolist(), "lam", lam.tolist())
        if s.iterations > 0:
            with torch.no_grad():
                rmse1 = self._rmse(state, identity, cam, texture, sh, images, inside)
        state.gaze = fitter.fit_gaze(obs, state, identity, cam,
                                     previous=torch.as_tensor(params.gaze[index], device=dev))
        state = fitter.with_gaze(state)
        return state, sh, rmse0, rmse1

    def _landmarks(self, obs: torch.Tensor, state: FitState, identity: torch.Tensor,
                   cam: Camera, jacobian: bool
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The landmark fit's cost, gradient and Hessian, the landmark term scaled by
        `landmark_weight` (the expression priors are not)."""
        cost, grad, hess = self.fitter.normal_equations(obs, state, identity, cam, jacobian)
        w = self.settings.landmark_weight
        if w == 1.0:
            return cost, grad, hess
        prior, p_grad, p_hess = self._expression_prior(state)
        cost = prior + w * (cost - prior)
        if grad is None or hess is None:
            return cost, None, None
        grad = p_grad + w * (grad - p_grad)
        hess = p_hess + w * (hess - p_hess)
        return cost, grad, hess

    def _expression_prior(self, state: FitState
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The expression priors' part of `normal_equations` (cost, gradient, Hessian)."""
        fitter = self.fitter
        free = state.expression[:, self.lm.free]
        cost, grad = fitter._priors(free, None, True)
        assert grad is not None
        b, p = state.batch, 6 + self.lm.n_free
        g = torch.zeros(b, p, device=self.device)
        g[:, 6:] = grad
        h = torch.diag_embed(fitter._prior_hessian(b, False))
        return cost, g, h

    def _rmse(self, state: FitState, identity: torch.Tensor, cam: Camera,
              texture: torch.Tensor, sh: torch.Tensor, images: torch.Tensor,
              inside: torch.Tensor) -> np.ndarray:
        """Robust-weighted RMS colour error (B,) of states over their face pixels."""
        face, s = self.face, self.settings
        verts = face.vertices(identity, state.expression)
        xc = verts @ state.rotation.transpose(1, 2) + state.translation[:, None]
        scr = face.screen(xc, cam)
        px = face.pixels(scr, images, inside, s.erode_px)
        colour, _, _ = face.colour(scr, face.normals(xc), texture, sh, px)
        _, w = _cauchy(colour - px.target, s.colour_sigma)
        w = w * px.mask
        err = ((colour - px.target) ** 2).sum(-1)
        return ((err * w).sum(1) / w.sum(1).clamp_min(1e-9) / 3.0).sqrt().cpu().numpy()

    def _jacobian(self, state: FitState, identity: torch.Tensor, cam: Camera,
                  texture: torch.Tensor, sh: torch.Tensor, normals: torch.Tensor,
                  px: _Pixels) -> tuple[torch.Tensor, torch.Tensor]:
        """(Jacobian [B, N, 3, P], residual [B, N, 3]) of the pixels' colours in the fit's
        unknowns (rotation increment, translation, free expressions) at `state` (normals
        held fixed). Chain rule: each pixel's colour in its triangle's nine screen
        coordinates by forward-mode differentiation (nine `jvp`s of per-pixel arithmetic),
        times the screen coordinates' derivatives in the unknowns, in closed form per vertex
        (as the landmark fit's)."""
        face = self.face
        b = state.batch
        verts = face.vertices(identity, state.expression)  # B,V,3 model frame
        rot, trans = state.rotation, state.translation
        y = verts @ rot.transpose(1, 2)  # rotated, B,V,3
        xc = y + trans[:, None]
        scr = face.screen(xc, cam)
        v = scr.shape[1]
        # d(u, v, z)/d(camera point), B,V,3,3
        z = xc[..., 2].clamp_min(1.0)
        f = cam.focal.view(b, 1)
        zero = torch.zeros_like(z)
        d_u = torch.stack([f / z, zero, -f * xc[..., 0] / (z * z)], -1)
        d_v = torch.stack([zero, f / z, -f * xc[..., 1] / (z * z)], -1)
        d_z = torch.stack([zero, zero, torch.ones_like(z)], -1)
        d_s = torch.stack([d_u, d_v, d_z], -2)
        # d(camera point)/d(unknowns): rotation increment -[y]x, translation I, expressions
        # R E, B,V,3,P
        skew = torch.stack([zero, y[..., 2], -y[..., 1], -y[..., 2], zero, y[..., 0],
                            y[..., 1], -y[..., 0], zero], -1).view(b, v, 3, 3)
        eye = torch.eye(3, device=self.device).expand(b, v, 3, 3)
        basis = face.expression[face.free].view(len(face.free), v, 3)  # P',V,3
        r_e = torch.einsum("bij,kvj->bvik", rot, basis)  # B,V,3,P'
        d_x = torch.cat([skew, eye, r_e], -1)
        d_scr = d_s @ d_x  # B,V,3,P
        # per pixel: colour in the corners' screen coordinates
        n = px.tri.shape[1]
        corner = face.tris[px.tri]  # B,N,3
        flat = (corner + (torch.arange(b, device=self.device) * v).view(b, 1, 1)).view(-1)
        pc = scr.reshape(-1, 3).index_select(0, flat).view(b, n, 3, 3)
        nrm = normals.reshape(-1, 3).index_select(0, flat).view(b, n, 3, 3)

        def local(p: torch.Tensor) -> torch.Tensor:
            return face.corner_colour(p, nrm, texture, sh, px) - px.target

        tangents = torch.eye(9, device=self.device).view(9, 1, 1, 3, 3).expand(9, b, n, 3, 3)
        resid, cols = torch.func.vmap(
            lambda t: torch.func.jvp(local, (pc,), (t,)))(tangents)  # 9,B,N,3 each
        d_col = cols.permute(1, 2, 3, 0)  # B,N,3,9
        d_corner = d_scr.reshape(b * v, 3, -1).index_select(0, flat).view(b, n, 9, -1)
        return d_col @ d_corner, resid[0]


def smooth_params(params: FaceParams, config: TrackerConfig) -> FaceParams:
    """params filtered frame by frame by the tracker's One-Euro smoother (reset at frames
    without a face), eyeLook recomputed from the filtered gaze."""
    if not config.smoothing or params.frames == 0:
        return params
    sm = ParamSmoother(SmoothingSettings(config.smoothing_min_cutoff, config.smoothing_beta,
                                         config.smoothing_d_cutoff))
    rot, trans = params.rotation.copy(), params.translation.copy()
    expr, gaze = params.expression.copy(), params.gaze.copy()
    names = [str(n) for n in params.expression_names]
    from tracker.face_model import EYELOOK_NAMES

    eyelook = [names.index(n) for n in EYELOOK_NAMES]
    for t in range(params.frames):
        if not params.valid[t]:
            sm.reset()
            continue
        r, tr, e, g = sm.smooth(rot[t], trans[t], expr[t], gaze[t], float(params.timestamps[t]))
        rot[t], trans[t], gaze[t] = r, tr, g
        expr[t] = e
        expr[t, eyelook] = gaze_to_eyelook(np.asarray(g, np.float32))
    return replace(params, rotation=rot.astype(np.float32), translation=trans.astype(np.float32),
                   expression=expr.astype(np.float32), gaze=gaze.astype(np.float32))


def refine(model: FaceModel, params: FaceParams, crops: FaceCrops, observed: np.ndarray,
           tracker_config: TrackerConfig | None = None, settings: RefineSettings | None = None,
           device: torch.device | str = "cpu",
           progress: Callable[[str, int], None] | None = None) -> Refined:
    """Refine tracked `params` (T frames, source camera) against the face crops of the same
    frames (`face_crops`); observed: MediaPipe's landmarks (T, 478, 2) source pixels.
    Start from the unsmoothed landmark fit (smoothing comes after). Returns the refined
    parameters (smoothed when tracker.smoothing is on) and figures (see `Refined`)."""
    tc = tracker_config or TrackerConfig()
    s = settings or RefineSettings()
    start = params
    if crops.images.shape[0] != params.frames or observed.shape[0] != params.frames:
        raise ValueError(f"{crops.images.shape[0]} crops and {observed.shape[0]} landmark "
                         f"frames for {params.frames} parameter frames")
    note = progress or (lambda stage, n: None)
    valid = np.nonzero(params.valid)[0]
    seconds: dict[str, float] = {}
    t_all = params.frames
    if len(valid) == 0:
        nan = np.full(t_all, np.nan)
        return Refined(params, np.zeros((s.albedo_size, s.albedo_size, 3), np.float32), nan,
                       nan, seconds)
    ref = Refiner(model, tc, s, device)
    t0 = time.perf_counter()
    keys = valid[select_keyframes(start.rotation[valid], np.linspace(0.0, 1.0, len(valid)),
                                  s.keyframes)]
    identity, focal, texture, sh_mean = ref.keyframe_fit(start, crops, observed, keys,
                                                         lambda n: note("keyframes", n))
    seconds["keyframes"] = time.perf_counter() - t0
    log.info("refinement: %d keyframes, focal %.1f -> %.1f px, |identity| %.2f -> %.2f",
             len(keys), float(params.focal[0]), focal, float(np.linalg.norm(params.identity)),
             float(identity.norm()))
    t0 = time.perf_counter()
    out_rot, out_trans = start.rotation.copy(), start.translation.copy()
    out_expr, out_gaze = start.expression.copy(), start.gaze.copy()
    out_sh = np.broadcast_to(sh_mean.cpu().numpy(), (t_all, 9, 3)).astype(np.float32).copy()
    before = np.full(t_all, np.nan)
    after = np.full(t_all, np.nan)
    for lo in range(0, len(valid), max(1, s.batch)):
        idx = valid[lo:lo + s.batch]
        state, sh, r0, r1 = ref.refine_frames(start, crops, observed, idx, identity, focal,
                                              texture, sh_mean)
        out_rot[idx] = matrix_to_axis_angle(state.rotation.detach().cpu().numpy())
        out_trans[idx] = state.translation.detach().cpu().numpy()
        out_expr[idx] = state.expression.detach().cpu().numpy()
        out_gaze[idx] = state.gaze.detach().cpu().numpy()
        out_sh[idx] = sh.detach().cpu().numpy()
        before[idx], after[idx] = r0, r1
        note("refine", len(idx))
    seconds["frames"] = time.perf_counter() - t0
    refined = replace(params, identity=identity.cpu().numpy().astype(np.float32),
                      focal=np.asarray([focal], np.float32), rotation=out_rot,
                      translation=out_trans, expression=out_expr, gaze=out_gaze, sh=out_sh)
    refined = smooth_params(refined, tc)
    tex = texture.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    return Refined(refined, tex, before, after, seconds)


def refine_wanted(setting: bool | None, device: torch.device | str) -> bool:
    """Whether `renderer.refine` (None: auto, True, False) turns the refinement on for
    `device` (auto: on CUDA)."""
    if setting is None:
        return torch.device(device).type == "cuda"
    return bool(setting)


def refine_video(model: FaceModel, params: FaceParams, frames: Iterable[np.ndarray],
                 observed: np.ndarray, tracker_config: TrackerConfig,
                 renderer_config: RendererConfig, device: torch.device | str = "cpu",
                 fit_focal: bool = True,
                 progress: Callable[[str, int], None] | None = None) -> Refined:
    """`dvp track` / `dvp prepare`'s refinement of a whole video: the face crops of its
    frames (one pass over `frames`, the video's RGB frames in order) and `refine`.

    params: the unsmoothed landmark fit of the video (T frames); observed: its landmarks
    (T, 478, 2) source pixels; fit_focal False keeps params' focal length (given by the
    user). Memory: the crops, T x refine_size^2 x 3 bytes (49 kB a frame at 128)."""
    settings = RefineSettings.from_config(renderer_config, fit_focal=fit_focal)
    note = progress or (lambda stage, n: None)
    boxes = crop_boxes(model, params, settings.margin)
    crops = face_crops(frames, boxes, settings.size, lambda n: note("crops", n))
    return refine(model, params, crops, observed, tracker_config, settings, device, note)
