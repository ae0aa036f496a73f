"""Conditioning images and the space-time window (DESIGN.md, "Conditioning").

Per frame, at S x S, three RGB images in [0, 1] with background 0, and a mask beside them:

- **colour**: albedo x SH irradiance (`renderer.sh`) of the interpolated unit vertex normal
  in camera space, clamped to [0, 1]. The skin (ICT regions `face`, `head_neck`) samples
  the albedo UV texture; the mouth interior, teeth, eye sockets and eyeballs have fixed
  albedos (`CONSTANT_ALBEDO`, `EYE_ALBEDO`).
- **correspondence**: each visible surface point's position on the mean face (ICT's neutral
  with identity 0, expression 0, gaze 0), normalised per axis to [0, 1] by the bounding box
  of the drawn part of the mean face (`ConditioningRenderer.mean_box`).
- **gaze map**: on visible eyeball pixels (eyelids and skin occlude them), the sclera white
  (1, 1, 1), the iris (0, 0.5, 1) and the pupil (1, 0, 0); classified by the angle between
  the surface point's mean-face position about the eyeball centre and the eye's optical axis
  (`IRIS_DEG`, `PUPIL_DEG`), so the disks rotate with gaze; everything else 0.
- **mask**: 1 where any drawn part of the head covers the pixel.

Drawn parts (`DRAWN_REGIONS`): face, head_neck, mouth_socket, eye sockets, gums_tongue,
teeth, eyeballs; eyelashes, eye occlusion / blend meshes and lacrimal glands are left out.
Back faces are culled (ICT's interior surfaces, mouth and eye sockets, face inward).

**Albedo texture**: `(A, 2A, 3)`, uint8 or float in [0, 1]: ICT's UDIM tiles 0 (face, left
half) and 1 (head and neck, right half); texel column = u * A, row = (1 - v) * A (OBJ's v
points up), bilinear, sampled at texel centres (`grid_sample`, `align_corners=False`).
`None` is a plain grey albedo (`GREY`).

**Camera**: the params' pinhole camera (focal, principal point, image size h x w) is scaled
by S / max(h, w) and centred, so the whole image fits the S x S square (a target
directory's params are already S x S). Frames whose parameters are not finite are all
background; triangles nearer than `NEAR_CM` to the camera are not drawn (a face behind the
camera gives an all-background frame). Frames are rendered regardless of `valid`.

The window is the last N_w frames sampled at the target's fps by timestamp: for each instant
t - k/fps (k = N_w-1 .. 0) the nearest frame at or before it, so dropped frames do not
stretch it; before the first frame the earliest frame repeats. It is frame-major, oldest
first, each frame [colour, correspondence, gaze]: `[9*N_w, S, S]`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from renderer.raster import resolve_backend
from renderer.raster_ref import Raster, RasterError, check_triangle_ids, rasterize_reference
from renderer.sh import irradiance_basis
from tracker.errors import DvpError
from tracker.face_model import REGIONS, FaceModel, gaze_rotation
from tracker.geometry import vertex_normals
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix

#: ICT regions drawn in the conditioning images.
DRAWN_REGIONS = ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right",
                 "gums_tongue", "teeth", "eyeball_left", "eyeball_right")
#: Regions that sample the albedo texture, and their UDIM tile (u offset).
TEXTURED_REGIONS = {"face": 0, "head_neck": 1}
#: Number of UDIM tiles side by side in the albedo texture.
ALBEDO_TILES = 2
#: Fixed albedo of the untextured regions.
CONSTANT_ALBEDO = {
    "mouth_socket": (0.45, 0.18, 0.18),
    "eye_socket_left": (0.40, 0.20, 0.20),
    "eye_socket_right": (0.40, 0.20, 0.20),
    "gums_tongue": (0.65, 0.30, 0.32),
    "teeth": (0.90, 0.87, 0.80),
}
#: Eyeball albedo for the colour image: sclera, iris, pupil.
EYE_ALBEDO = ((0.85, 0.83, 0.80), (0.35, 0.25, 0.20), (0.03, 0.03, 0.03))
#: Gaze-map colours: sclera, iris, pupil.
GAZE_COLOURS = ((1.0, 1.0, 1.0), (0.0, 0.5, 1.0), (1.0, 0.0, 0.0))
#: Angular radii of the iris (ICT's cornea bulge ends near 28 degrees) and the pupil.
IRIS_DEG = 28.0
PUPIL_DEG = 11.0
#: Plain grey albedo used when none is given.
GREY = 0.6
#: Near plane (cm): a triangle with a vertex closer to the camera is not drawn (a face this
#: close is not a portrait; it also bounds the rasterizer's work).
NEAR_CM = 5.0
#: Channels per frame: colour RGB, correspondence XYZ, gaze RGB.
FRAME_CHANNELS = 9

#: Slack when comparing an instant with a timestamp, in frame periods: timestamps stored as
#: float32 (about 60 us resolution after ten minutes) still land on their own frame.
_SLACK_PERIODS = 0.01



def interpolate(values: torch.Tensor, ids: torch.Tensor, bary: torch.Tensor) -> torch.Tensor:
    """Barycentric mix [N, C] of per-vertex `values` [V, C] at N pixels, given each pixel's
    triangle vertex ids [N, 3] (rows of `values`) and barycentrics [N, 3]."""
    return (values.index_select(0, ids[:, 0]) * bary[:, 0:1]
            + values.index_select(0, ids[:, 1]) * bary[:, 1:2]
            + values.index_select(0, ids[:, 2]) * bary[:, 2:3])

def mean_face_box(model: FaceModel, triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper corners `(3,)` float32 (cm) of the mean face's vertices used by
    `triangles` `(F, 3)`: the box that the correspondence image normalises to [0, 1]^3."""
    used = np.unique(triangles)
    if not len(used):
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    mean = model.neutral[used].astype(np.float32)
    return mean.min(0), mean.max(0)


class RendererError(DvpError):
    """Bad input to the renderer (sizes, textures, parameters)."""


def window_indices(timestamps: np.ndarray, t_index: int, fps: float, n_w: int = 11) -> np.ndarray:
    """Frame indices `(n_w,)` int64 of the window ending at frame `t_index`, oldest first.

    timestamps: `(T,)` seconds, non-decreasing. Entry k (k = 0 .. n_w-1) is the last frame
    whose timestamp is at or before `timestamps[t_index] - (n_w-1-k)/fps` (never after
    `t_index`); an instant before the first frame gives frame 0.
    """
    ts = np.asarray(timestamps, dtype=np.float64)
    if not 0 <= t_index < len(ts):
        raise IndexError(f"frame index {t_index} outside 0..{len(ts) - 1}")
    period = 1.0 / fps
    instants = ts[t_index] - np.arange(n_w - 1, -1, -1) * period + _SLACK_PERIODS * period
    idx = np.searchsorted(ts[: t_index + 1], instants, side="right") - 1
    return np.clip(idx, 0, t_index).astype(np.int64)


def stack_window(per_frame: torch.Tensor, indices: np.ndarray) -> torch.Tensor:
    """Stack `per_frame[indices]` (`[T, 9, S, S]`) frame-major into `[9*n_w, S, S]`.

    The dtype and device of `per_frame` are kept (the contract's window is float32 in [0, 1]).
    """
    idx = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=per_frame.device)
    frames = per_frame.index_select(0, idx)  # n_w,9,S,S
    return frames.reshape(-1, *per_frame.shape[2:])


class LiveWindow:
    """The window of a live stream, the one used by every live path: push each frame's
    conditioning with its timestamp, get the `[9*n_w, S, S]` window of the newest frame by
    `window_indices`' rule (for each instant t - k/fps the last frame at or before it;
    before the first frame the earliest one).

    A timestamp before the newest one starts a new stream (the window restarts); equal
    timestamps are kept in arrival order. Only what the window can still use is kept: the
    frames of the last `(n_w - 1) / fps` seconds plus one older frame, and never more than
    `MAX_FRAMES`, whatever the timestamps do.
    """

    MAX_FRAMES = 64

    def __init__(self, fps: float, n_w: int = 11) -> None:
        if not fps > 0 or n_w < 1:
            raise RendererError(f"window needs fps > 0 and n_w >= 1, got {fps}, {n_w}")
        self.fps, self.n_w = float(fps), int(n_w)
        self._span = (self.n_w - 1 + 2 * _SLACK_PERIODS) / self.fps
        self._times: deque[float] = deque()
        self._frames: deque[torch.Tensor] = deque()

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, timestamp: float, frame: torch.Tensor) -> torch.Tensor:
        """Add frame `[9, S, S]` at `timestamp` (s); return the window."""
        if self._times and timestamp < self._times[-1]:
            self.reset()
        self._times.append(float(timestamp))
        self._frames.append(frame)
        oldest = timestamp - self._span
        while len(self._times) > 1 and (self._times[1] <= oldest
                                        or len(self._times) > self.MAX_FRAMES):
            self._times.popleft()
            self._frames.popleft()
        return self.window()

    def window(self) -> torch.Tensor:
        """The window `[9*n_w, S, S]` ending at the newest frame."""
        if not self._frames:
            raise RendererError("no frame pushed yet")
        idx = window_indices(np.asarray(self._times), len(self._times) - 1, self.fps, self.n_w)
        return torch.cat([self._frames[int(i)] for i in idx], 0)

    def reset(self) -> None:
        """Forget every frame (the next push starts a new stream)."""
        self._times.clear()
        self._frames.clear()


@dataclass(frozen=True)
class Camera:
    """Pinhole intrinsics of the params' image (focal, principal point px; h, w px)."""

    focal: float
    cx: float
    cy: float
    height: int
    width: int

    @classmethod
    def of(cls, params: FaceParams) -> Camera:
        h, w = (int(x) for x in params.image_size)
        return cls(float(params.focal[0]), float(params.principal_point[0]),
                   float(params.principal_point[1]), h, w)

    def scaled_to(self, size: int) -> tuple[float, float, float]:
        """(focal, cx, cy) of the S x S render: scaled by S / max(h, w) and centred."""
        if self.height <= 0 or self.width <= 0:
            raise RendererError(f"image_size must be positive, got {self.height} x "
                                f"{self.width}")
        k = size / max(self.height, self.width)
        ox = (size - k * self.width) / 2.0
        oy = (size - k * self.height) / 2.0
        return k * self.focal, k * self.cx + ox, k * self.cy + oy


@dataclass(frozen=True)
class Surface:
    """The visible surface of B rendered frames, one row per covered pixel (N rows).

    frame, pixel: `(N,)` int64 frame in the batch and pixel index i * S + j; triangle `(N,)`
    int64 index into the renderer's drawn triangles; bary `(N, 3)`; normal `(N, 3)` unit,
    camera space; uv `(N, 2)` texture coordinates (tile offset included); textured `(N,)`
    bool; albedo `(N, 3)` fixed albedo of untextured pixels (eyes included);
    mean `(N, 3)` position on the mean face (cm); gaze `(N, 3)` gaze-map colour.
    raster: the full raster of the batch; ok `(B,)` bool: finite parameters.
    """

    frame: torch.Tensor
    pixel: torch.Tensor
    triangle: torch.Tensor
    bary: torch.Tensor
    normal: torch.Tensor
    uv: torch.Tensor
    textured: torch.Tensor
    albedo: torch.Tensor
    mean: torch.Tensor
    gaze: torch.Tensor
    raster: Raster
    ok: torch.Tensor


@dataclass(frozen=True)
class Conditioning:
    """Rendered conditioning: frames `[T, 9, S, S]` float32 in [0, 1] (colour, correspondence,
    gaze), masks `[T, 1, S, S]` float32 in {0, 1}; on the renderer's device."""

    frames: torch.Tensor
    masks: torch.Tensor


def albedo_tensor(albedo: Any, device: torch.device) -> torch.Tensor:
    """The albedo texture as `[1, 3, A, 2A]` float32 on `device` (see the module doc)."""
    if albedo is None:
        return torch.full((1, 3, 4, 8), GREY, dtype=torch.float32, device=device)
    tex = torch.as_tensor(np.asarray(albedo) if not isinstance(albedo, torch.Tensor)
                          else albedo)
    if tex.ndim != 3 or tex.shape[-1] != 3:
        raise RendererError(f"albedo texture must be (A, 2A, 3), got {tuple(tex.shape)}")
    if tex.shape[1] != ALBEDO_TILES * tex.shape[0] or tex.shape[0] == 0:
        raise RendererError(f"albedo texture must be (A, 2A, 3) (UDIM tiles 0 and 1 side by "
                            f"side), got {tuple(tex.shape)}")
    tex = tex.to(device)
    tex = tex.float() / 255.0 if tex.dtype == torch.uint8 else tex.float()
    if not bool(torch.isfinite(tex).all()):
        raise RendererError("albedo texture holds NaN or infinite values")
    return tex.clamp(0.0, 1.0).permute(2, 0, 1)[None].contiguous()


def sample_texture(texture: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear texture `[1, 3, A, 2A]` at uv `(N, 2)` -> `(N, 3)` (differentiable)."""
    if uv.shape[0] == 0:
        return uv.new_zeros((0, 3))
    gx = uv[:, 0] * (2.0 / ALBEDO_TILES) - 1.0
    gy = 1.0 - 2.0 * uv[:, 1]
    grid = torch.stack([gx, gy], -1)[None, None]  # 1,1,N,2
    out = F.grid_sample(texture, grid, mode="bilinear", padding_mode="border",
                        align_corners=False)  # 1,3,1,N
    return out[0, :, 0].t()


def _memo_key(params: FaceParams, idx: np.ndarray) -> bytes:
    """The bytes of everything that a render of frames `idx` depends on."""
    parts = [params.identity, params.focal, params.principal_point, params.image_size, idx]
    parts += [getattr(params, k)[idx] for k in ("expression", "rotation", "translation", "sh",
                                                 "gaze")]
    return b"".join(np.ascontiguousarray(p).tobytes() for p in parts)


class ConditioningRenderer:
    """Renders the conditioning of FaceParams frames (DESIGN.md; module doc for details).

    Per-target constants (triangles, UVs, mean face, albedo texture, bases) are moved to
    `device` once, here. `frames(params, indices)` -> `[T, 9, S, S]`, `masks(...)` ->
    `[T, 1, S, S]` (one render serves both), `window(params, t_index, fps)` ->
    `[9*n_w, S, S]`; `render_arrays` renders raw (torch or numpy) parameters, for live use.
    """

    def __init__(self, model: FaceModel, albedo: Any = None, size: int = 256,
                 device: torch.device | str = "cpu", *, rasterizer: str = "auto",
                 batch: int = 16, regions: tuple[str, ...] = DRAWN_REGIONS) -> None:
        if int(size) <= 0:
            raise RendererError(f"render size must be positive, got {size}")
        if int(batch) <= 0:
            raise RendererError(f"batch must be positive, got {batch}")
        self.model = model
        self.size = int(size)
        self.device = torch.device(device)
        self.batch = int(batch)
        self.backend = resolve_backend(rasterizer, self.device)
        self.texture = albedo_tensor(albedo, self.device)
        dev = self.device
        unknown = [r for r in regions if r not in REGIONS]
        if unknown:
            raise RendererError(f"unknown mesh region '{unknown[0]}'")
        tri_ids = model.region_triangles(*regions) if regions else np.zeros(0, np.int64)
        tris = model.triangles[tri_ids].astype(np.int64)
        n_vert = int(tris.max()) + 1 if len(tris) else 0
        self.n_vertices = n_vert
        region_names = [model.region_names[r] for r in model.triangle_region[tri_ids]]
        # per triangle: texture tile (-1 none), fixed albedo, eye (-1 none, 0 left, 1 right)
        tile = np.asarray([TEXTURED_REGIONS.get(n, -1) for n in region_names], np.int64)
        const = np.asarray([CONSTANT_ALBEDO.get(n, (GREY,) * 3) for n in region_names],
                           np.float32).reshape(-1, 3)
        eye = np.asarray([0 if n == "eyeball_left" else 1 if n == "eyeball_right" else -1
                          for n in region_names], np.int64)
        uv = model.uvs[model.triangle_uvs[tri_ids]].astype(np.float32).reshape(-1, 3, 2)
        mean = model.neutral[:n_vert].astype(np.float32)
        lo, hi = mean_face_box(model, tris)
        self.mean_box = (lo, hi)
        self.triangle_ids = tri_ids
        t = torch.from_numpy
        self._tris = t(tris).to(dev)
        self._tris32 = self._tris.to(torch.int32)
        check_triangle_ids(self._tris, n_vert)
        # per triangle: uv of the 3 corners (6), texture tile, eye, fixed albedo (3)
        table = np.concatenate([uv.reshape(-1, 6), tile[:, None], eye[:, None], const], 1)
        self._tri_table = t(table.astype(np.float32)).to(dev)
        self._mean = t(mean).to(dev)
        self._mean_lo = t(lo.astype(np.float32)).to(dev)
        self._mean_scale = t((1.0 / np.maximum(hi - lo, 1e-6)).astype(np.float32)).to(dev)
        self._centres = t(model.eyeball_centres.astype(np.float32)).to(dev)
        self._eye_albedo = torch.tensor(EYE_ALBEDO, dtype=torch.float32, device=dev)
        self._gaze_colours = torch.tensor(GAZE_COLOURS, dtype=torch.float32, device=dev)
        self._cos_iris = math.cos(math.radians(IRIS_DEG))
        self._cos_pupil = math.cos(math.radians(PUPIL_DEG))
        self._id_basis = t(model.identity_basis[:, :n_vert].reshape(
            model.identity_basis.shape[0], -1)).to(dev)
        self._expr_basis = t(model.expression_basis[:, :n_vert].reshape(
            model.expression_basis.shape[0], -1)).to(dev)
        self._eyes = [REGIONS["eyeball_left"][:2], REGIONS["eyeball_right"][:2]]
        self._identity_key: bytes | None = None
        self._identity_cache: tuple[torch.Tensor, torch.Tensor] | None = None
        self._memo: tuple[Any, ...] | None = None

    # ---- public API ----------------------------------------------------------------------
    def frames(self, params: FaceParams, indices: np.ndarray | None = None) -> torch.Tensor:
        """`[T, 9, S, S]` float32 in [0, 1] of the frames at `indices` (all if None)."""
        return self.render(params, indices).frames

    def masks(self, params: FaceParams, indices: np.ndarray | None = None) -> torch.Tensor:
        """`[T, 1, S, S]` float32 in {0, 1}: pixels covered by the drawn head. Right after
        `frames` of the same parameters and indices it is served without rendering again."""
        idx = self._indices(params, indices)
        if self._memo is not None and self._memo[0] == _memo_key(params, idx):
            return self._memo[1]
        return self.render(params, idx).masks

    def window(self, params: FaceParams, t_index: int, fps: float, n_w: int = 11
               ) -> torch.Tensor:
        """The `[9*n_w, S, S]` window ending at frame `t_index` (DESIGN's timestamp rule)."""
        idx = window_indices(params.timestamps, t_index, fps, n_w)
        unique, inverse = np.unique(idx, return_inverse=True)
        return stack_window(self.frames(params, unique), inverse)

    @staticmethod
    def _indices(params: FaceParams, indices: np.ndarray | None) -> np.ndarray:
        idx = (np.arange(params.frames) if indices is None
               else np.asarray(indices, np.int64).reshape(-1))
        if len(idx) and (idx.min() < 0 or idx.max() >= params.frames):
            raise IndexError(f"frame indices outside 0..{params.frames - 1}")
        return idx

    def render(self, params: FaceParams, indices: np.ndarray | None = None) -> Conditioning:
        """Frames and masks of `params` at `indices` (all if None), in chunks of `batch`."""
        idx = self._indices(params, indices)
        cam = Camera.of(params)
        chunks = []
        for start in range(0, len(idx), self.batch):
            sel = idx[start:start + self.batch]
            chunks.append(self.render_arrays(
                params.identity, params.expression[sel], params.rotation[sel],
                params.translation[sel], params.sh[sel], params.gaze[sel], cam))
        if len(chunks) == 1:
            out = chunks[0]
        elif chunks:
            out = Conditioning(torch.cat([c.frames for c in chunks]),
                               torch.cat([c.masks for c in chunks]))
        else:
            s = self.size
            out = Conditioning(torch.zeros((0, FRAME_CHANNELS, s, s), device=self.device),
                               torch.zeros((0, 1, s, s), device=self.device))
        self._memo = (_memo_key(params, idx), out.masks)
        return out

    def render_arrays(self, identity: Any, expression: Any, rotation: Any, translation: Any,
                      sh: Any, gaze: Any, camera: Camera) -> Conditioning:
        """Render B frames from raw parameters (numpy or torch; shapes as FaceParams:
        identity (100,), expression (B, 53), rotation (B, 3), translation (B, 3),
        sh (B, 9, 3), gaze (B, 2, 2)). A frame with any non-finite value is background."""
        surface = self.surface(identity, expression, rotation, translation, gaze, camera)
        return self.shade(surface, self._as(sh).reshape(-1, 9, 3))

    # ---- geometry ------------------------------------------------------------------------
    def _as(self, x: Any) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x.to(device=self.device, dtype=torch.float32)
        return torch.as_tensor(np.asarray(x, np.float32), device=self.device)

    def _identity(self, identity: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(base vertices (V*3,), eyeball centres (2, 3)) of an identity, cached."""
        ident = (identity.detach().float().cpu().numpy() if isinstance(identity, torch.Tensor)
                 else np.asarray(identity, np.float32)).reshape(-1)
        key = ident.tobytes()
        if key != self._identity_key or self._identity_cache is None:
            it = torch.from_numpy(ident.copy()).to(self.device)
            base = self._mean.reshape(-1) + it @ self._id_basis
            centres = torch.as_tensor(np.asarray(self.model.eye_centres(ident), np.float32),
                                      device=self.device)
            self._identity_cache = (base, centres)
            self._identity_key = key
        return self._identity_cache

    def vertices(self, identity: Any, expression: Any, gaze: Any) -> torch.Tensor:
        """Model-frame vertices `[B, V', 3]` of the drawn part (the first V' of ICT's),
        as `FaceModel.vertices(identity, expression, gaze)` gives them."""
        base, centres = self._identity(identity)
        expr = self._as(expression).reshape(-1, self._expr_basis.shape[0])
        v = (base + expr @ self._expr_basis).reshape(expr.shape[0], -1, 3)
        rot = gaze_rotation(self._as(gaze).reshape(-1, 2, 2))  # B,2,3,3
        n = v.shape[1]
        for e, (lo, hi) in enumerate(self._eyes):
            if lo >= n:
                continue
            hi = min(hi, n)
            c = centres[e]
            v[:, lo:hi] = (v[:, lo:hi] - c) @ rot[:, e].transpose(-1, -2) + c
        return v

    def surface(self, identity: Any, expression: Any, rotation: Any, translation: Any,
                gaze: Any, camera: Camera, dense: bool | None = None) -> Surface:
        """Rasterize B frames and interpolate what shading needs at every covered pixel.

        `dense` (default: on CUDA for small batches) keeps every pixel as a row, covered or
        not (no host synchronisation); otherwise only covered pixels are rows.
        """
        s = self.size
        f, cx, cy = camera.scaled_to(s)
        rot = self._as(rotation).reshape(-1, 3)
        trans = self._as(translation).reshape(-1, 3)
        expr = self._as(expression).reshape(rot.shape[0], -1)
        gz = self._as(gaze).reshape(-1, 2, 2)
        b = rot.shape[0]
        ok = (torch.isfinite(rot).all(1) & torch.isfinite(trans).all(1)
              & torch.isfinite(expr).all(1) & torch.isfinite(gz).flatten(1).all(1))
        if not all(math.isfinite(x) for x in (f, cx, cy)):
            ok = torch.zeros_like(ok)
        v = self.vertices(identity, expr, gz)  # B,V,3 model frame
        x = v @ axis_angle_to_matrix(rot).transpose(-1, -2) + trans[:, None]  # B,V,3 camera
        z = x[..., 2]
        screen = torch.stack([f * x[..., 0] / z + cx, f * x[..., 1] / z + cy, z], -1)
        screen = torch.where(ok[:, None, None], screen, torch.full_like(screen, float("nan")))
        raster = self._rasterize(screen.contiguous())
        normals = self._normals(x)  # B,V,3
        if dense is None:
            dense = self.device.type == "cuda" and b * s * s <= (1 << 20)
        flat_tri = raster.triangle.reshape(-1)
        if dense:
            pix_all = torch.arange(flat_tri.numel(), device=self.device)
            tri = flat_tri.long().clamp_min(0)
            bary = raster.bary.reshape(-1, 3)
        else:
            pix_all = torch.nonzero(flat_tri >= 0).squeeze(1)
            tri = flat_tri.index_select(0, pix_all).long()
            bary = raster.bary.reshape(-1, 3).index_select(0, pix_all)
        frame = pix_all // (s * s)
        pixel = pix_all - frame * (s * s)
        vids = self._tris.index_select(0, tri)  # N,3
        b0, b1, b2 = bary[:, 0:1], bary[:, 1:2], bary[:, 2:3]
        gv = vids + (frame * v.shape[1])[:, None]
        n = interpolate(normals.reshape(-1, 3), gv, bary)
        n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mean = interpolate(self._mean, vids, bary)
        tt = self._tri_table.index_select(0, tri)  # N,11
        uv = tt[:, 0:2] * b0 + tt[:, 2:4] * b1 + tt[:, 4:6] * b2
        textured = tt[:, 6] >= 0
        eye = tt[:, 7]
        albedo = tt[:, 8:11]
        gaze_rgb = torch.zeros_like(albedo)
        rows = torch.arange(eye.numel(), device=self.device) if dense else \
            torch.nonzero(eye >= 0).squeeze(1)
        if rows.numel():
            e = eye.index_select(0, rows)
            centre = torch.where((e > 0.5)[:, None], self._centres[1], self._centres[0])
            d = mean.index_select(0, rows) - centre
            cos = -d[:, 2] / d.norm(dim=-1).clamp_min(1e-12)
            part = (cos > self._cos_iris).long() + (cos > self._cos_pupil).long()  # 0 sclera
            is_eye = (e >= 0)[:, None]
            albedo = albedo.index_copy(0, rows, torch.where(
                is_eye, self._eye_albedo.index_select(0, part), albedo.index_select(0, rows)))
            gaze_rgb = gaze_rgb.index_copy(0, rows, torch.where(
                is_eye, self._gaze_colours.index_select(0, part), torch.zeros_like(d)))
        return Surface(frame=frame, pixel=pixel, triangle=tri, bary=bary, normal=n, uv=uv,
                       textured=textured, albedo=albedo, mean=mean, gaze=gaze_rgb,
                       raster=raster, ok=ok)

    def _rasterize(self, screen: torch.Tensor) -> Raster:
        if self.backend == "cupy":
            from renderer.raster_cupy import rasterize_cupy

            return rasterize_cupy(screen, self._tris32, self.size, self.size,
                                  near=NEAR_CM, trusted_triangles=True)
        return rasterize_reference(screen, self._tris, self.size, self.size, near=NEAR_CM,
                                   trusted_triangles=True)

    def _normals(self, x: torch.Tensor) -> torch.Tensor:
        """Unit area-weighted vertex normals `[B, V, 3]` over the drawn triangles."""
        return vertex_normals(x, self._tris)

    # ---- shading -------------------------------------------------------------------------
    def shade(self, surface: Surface, sh: torch.Tensor,
              texture: torch.Tensor | None = None) -> Conditioning:
        """Colour, correspondence and gaze images of a surface under `sh` `[B, 9, 3]`."""
        s = self.size
        raster = surface.raster
        b = raster.triangle.shape[0]
        tex = self.texture if texture is None else texture
        sh_ok = torch.isfinite(sh).flatten(1).all(1)
        ok = surface.ok & sh_ok
        sh = torch.where(ok[:, None, None], sh, torch.zeros_like(sh))
        colour = self.colour(surface, sh, tex)
        corr = (surface.mean - self._mean_lo) * self._mean_scale
        values = torch.cat([colour, corr.clamp(0.0, 1.0), surface.gaze], -1)  # N,9
        flat_tri = raster.triangle.reshape(-1)
        if values.shape[0] == b * s * s:  # dense: every pixel in order
            covered = (flat_tri >= 0) & ok[surface.frame]
            out = torch.where(covered[:, None], values, torch.zeros_like(values))
        else:
            index = surface.frame * (s * s) + surface.pixel
            covered = (flat_tri.index_select(0, index) >= 0) & ok[surface.frame]
            values = torch.where(covered[:, None], values, torch.zeros_like(values))
            out = torch.zeros((b * s * s, FRAME_CHANNELS), dtype=torch.float32,
                              device=self.device)
            out.index_copy_(0, index, values)
        frames = out.reshape(b, s, s, FRAME_CHANNELS).permute(0, 3, 1, 2).contiguous()
        masks = ((raster.triangle >= 0) & ok[:, None, None]).float()[:, None]
        return Conditioning(frames, masks)

    def colour(self, surface: Surface, sh: torch.Tensor, texture: torch.Tensor) -> torch.Tensor:
        """`(N, 3)` colour albedo x irradiance, clamped to [0, 1] (differentiable in the
        texture and `sh` `[B, 9, 3]`)."""
        return (self.albedo(surface, texture) * self.irradiance(surface, sh)).clamp(0.0, 1.0)

    def albedo(self, surface: Surface, texture: torch.Tensor) -> torch.Tensor:
        """`(N, 3)` albedo: the texture on skin, fixed values elsewhere."""
        sampled = sample_texture(texture, surface.uv)
        return torch.where(surface.textured[:, None], sampled, surface.albedo)

    def irradiance(self, surface: Surface, sh: torch.Tensor) -> torch.Tensor:
        """`(N, 3)` SH irradiance (clamped at 0) of the surface normals, `sh` `[B, 9, 3]`."""
        basis = irradiance_basis(surface.normal)  # N,9
        b = sh.shape[0]
        if b == 1:
            return (basis @ sh[0]).clamp_min(0.0)
        if surface.frame.numel() == b * self.size * self.size:  # dense: equal runs per frame
            out = torch.bmm(basis.reshape(b, -1, 9), sh)
            return out.reshape(-1, 3).clamp_min(0.0)
        counts = torch.bincount(surface.frame, minlength=b).tolist()
        parts = [chunk @ sh[k] for k, chunk in enumerate(torch.split(basis, counts))]
        return torch.cat(parts).clamp_min(0.0)


class GraphedRenderer:
    """Live single-frame (or fixed-batch) rendering replayed from a CUDA graph.

    Captures `renderer.render_arrays` for a fixed identity, camera and batch once; each
    call copies the new parameters into the graph's static inputs and replays it, so a
    frame costs one graph launch instead of dozens of kernel launches. CUDA only (with
    the 'cupy' or 'reference' rasterizer in its dense, synchronisation-free path: batch x
    S x S <= 2^20). The returned tensors are overwritten by the next call: clone them to
    keep them.
    """

    def __init__(self, renderer: ConditioningRenderer, identity: Any, camera: Camera,
                 batch: int = 1) -> None:
        dev = renderer.device
        if dev.type != "cuda":
            raise RendererError(f"CUDA graphs need a CUDA device, got {dev}")
        if batch * renderer.size ** 2 > (1 << 20):
            raise RendererError(f"batch {batch} at {renderer.size} px is too large to graph")
        if renderer.backend != "cupy":
            raise RendererError("graph capture needs the 'cupy' rasterizer (the reference "
                                "one synchronises with the host)")
        self.renderer = renderer
        self.identity = np.asarray(identity, np.float32).copy()
        self.camera = camera
        n_expr = renderer._expr_basis.shape[0]
        self.inputs = {
            "expression": torch.zeros((batch, n_expr), device=dev),
            "rotation": torch.zeros((batch, 3), device=dev),
            "translation": torch.zeros((batch, 3), device=dev),
            "sh": torch.zeros((batch, 9, 3), device=dev),
            "gaze": torch.zeros((batch, 2, 2), device=dev),
        }
        self.inputs["translation"][:, 2] = 50.0
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm up: caches, CuPy module, allocator
                self._run()
        torch.cuda.current_stream(dev).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        # relaxed: CuPy's DLPack import may query pointer attributes while capturing
        with torch.cuda.graph(self.graph, capture_error_mode="relaxed"):
            self.output = self._run()

    def _run(self) -> Conditioning:
        i = self.inputs
        return self.renderer.render_arrays(self.identity, i["expression"], i["rotation"],
                                           i["translation"], i["sh"], i["gaze"], self.camera)

    def __call__(self, expression: Any, rotation: Any, translation: Any, sh: Any,
                 gaze: Any) -> Conditioning:
        """Render with new per-frame parameters (shapes as `render_arrays`, batch fixed)."""
        for name, value in (("expression", expression), ("rotation", rotation),
                            ("translation", translation), ("sh", sh), ("gaze", gaze)):
            dst = self.inputs[name]
            dst.copy_(torch.as_tensor(value, dtype=torch.float32).reshape(dst.shape),
                      non_blocking=True)
        self.graph.replay()
        return self.output


__all__ = ["Camera", "Conditioning", "ConditioningRenderer", "GraphedRenderer", "LiveWindow",
           "RasterError", "RendererError", "Surface", "stack_window", "window_indices"]
