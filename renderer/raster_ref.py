"""The reference rasterizer (plain torch, any device): triangle ids, barycentrics, depth.

This module defines the rasterization conventions; `renderer.raster_cupy` follows them to
the bit (same float32 operations in the same order, no fused multiply-adds).

Input: screen-space vertices `[B, V, 3]` float32: (u, v) in pixels and the camera depth z
(cm, > 0 in front of the camera), as DESIGN.md's pinhole camera gives them
(`u = f x / z + cx`, `v = f y / z + cy`), and triangles `[F, 3]` (vertex ids, shared by the
batch).

Conventions:

- **Pixel centres**: pixel (row i, column j) is sampled at `(x, y) = (j + 0.5, i + 0.5)`.
- **Winding**: with the face model's winding (outward normal `cross(b - a, c - a)`), a
  triangle whose outward side faces the camera has a *negative* signed area
  `area2 = (u1 - u0)(v2 - v0) - (u2 - u0)(v1 - v0)` in pixel coordinates (v down): it runs
  counter-clockwise as the image is displayed. Those are front faces.
- **Back faces**: culled by default (`cull_back=True`: triangles with `area2 > 0` are not
  drawn); with `cull_back=False` both sides are drawn. Degenerate triangles (`area2 == 0`)
  are never drawn.
- **Coverage**: a pixel centre is covered when it is inside or exactly on the triangle's
  boundary. Edge functions are evaluated from the lower to the higher vertex id and negated
  for the other direction, so two triangles sharing an edge see exactly opposite values:
  the mesh is watertight (no cracks at pixel centres on shared edges).
- **Near plane / bad vertices**: a triangle with any vertex at `z <= near` (no clipping)
  or any non-finite coordinate is not drawn. A face behind the camera gives empty frames.
- **Visibility**: the smallest depth wins; on an exact depth tie the lower triangle id wins.
  The decision uses the key `(float32 bits of depth) << 32 | triangle id` (atomicMin on
  the GPU, scatter_reduce amin here), so it is deterministic.
- **Outputs**: `triangle [B, H, W]` int32, the triangle id or **-1 for an empty pixel**;
  `bary [B, H, W, 3]` float32 perspective-correct barycentrics of the triangle's three
  vertices (in the order of `triangles`), sum 1; `depth [B, H, W]` float32 camera z of the
  surface point (cm). Empty pixels hold bary 0 and depth 0.
- **Barycentrics**: screen-space weights `l_k = e_k / (e_0 + e_1 + e_2)` from the edge
  functions, perspective-corrected by `q_k = l_k / z_k`, `b_k = q_k / (q_0 + q_1 + q_2)`,
  `depth = 1 / (q_0 + q_1 + q_2)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tracker.errors import DvpError

#: Key of an empty pixel: larger than any (depth bits << 32 | id).
EMPTY_KEY = torch.iinfo(torch.int64).max
#: Default near plane (cm): vertices closer than this to the camera drop their triangle.
NEAR = 1e-2
#: Largest float32: |x| <= this is "finite" (NaN and inf fail), as in the CUDA kernel.
_FLT_MAX = 3.4028234663852886e38


class RasterError(DvpError):
    """Bad input to a rasterizer (shape, dtype, device or image size)."""


@dataclass(frozen=True)
class Raster:
    """Rasterizer output for B frames of H x W pixels (tensors on the input's device).

    triangle: `[B, H, W]` int32, triangle id, -1 where empty.
    bary: `[B, H, W, 3]` float32, perspective-correct barycentrics (0 where empty).
    depth: `[B, H, W]` float32, camera depth z in cm (0 where empty).
    """

    triangle: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        """`[B, H, W]` bool: covered pixels."""
        return self.triangle >= 0


def check_inputs(screen: torch.Tensor, triangles: torch.Tensor, height: int,
                 width: int) -> None:
    """Raise RasterError saying exactly what is wrong with the rasterizer's inputs."""
    if not isinstance(screen, torch.Tensor) or not isinstance(triangles, torch.Tensor):
        raise RasterError("screen vertices and triangles must be torch tensors")
    if screen.ndim != 3 or screen.shape[-1] != 3:
        raise RasterError(f"screen vertices must be [B, V, 3] (u, v, z), got "
                          f"{list(screen.shape)}")
    if screen.dtype != torch.float32:
        raise RasterError(f"screen vertices must be float32, got {screen.dtype}")
    if triangles.ndim != 2 or triangles.shape[-1] != 3:
        raise RasterError(f"triangles must be [F, 3], got {list(triangles.shape)}")
    if triangles.dtype not in (torch.int32, torch.int64):
        raise RasterError(f"triangles must be int32 or int64, got {triangles.dtype}")
    if triangles.device != screen.device:
        raise RasterError(f"triangles on {triangles.device} but vertices on {screen.device}")
    if int(height) <= 0 or int(width) <= 0:
        raise RasterError(f"image size must be positive, got {height} x {width}")
    if int(height) * int(width) >= 2**31 or int(height) >= 2**23 or int(width) >= 2**23:
        raise RasterError(f"image size {height} x {width} is too large")
    if triangles.shape[0] >= 2**31 - 1:
        raise RasterError(f"too many triangles ({triangles.shape[0]})")
    if triangles.numel() and screen.shape[1] == 0:
        raise RasterError("triangles given but no vertices")


def check_triangle_ids(triangles: torch.Tensor, n_vertices: int) -> None:
    """Raise RasterError unless every vertex id lies in 0..n_vertices-1."""
    if triangles.numel() and (int(triangles.min()) < 0 or int(triangles.max()) >= n_vertices):
        raise RasterError(f"triangle vertex ids must lie in 0..{n_vertices - 1}, got "
                          f"{int(triangles.min())}..{int(triangles.max())}")


def empty_raster(batch: int, height: int, width: int, device: torch.device) -> Raster:
    """All-background output."""
    return Raster(
        triangle=torch.full((batch, height, width), -1, dtype=torch.int32, device=device),
        bary=torch.zeros((batch, height, width, 3), dtype=torch.float32, device=device),
        depth=torch.zeros((batch, height, width), dtype=torch.float32, device=device),
    )


def _finite(x: torch.Tensor) -> torch.Tensor:
    return x.abs() <= _FLT_MAX


def edge_table(corners: torch.Tensor, ids: torch.Tensor, area_positive: torch.Tensor
               ) -> torch.Tensor:
    """Per-triangle constants `[15, M]` (one row per quantity) of the edge functions, from
    corners `[M, 3, 3]` (u, v, z), vertex ids `[M, 3]` and orientation `[M]` (area2 > 0).

    Edge k is the one opposite vertex k (k = 0: 1 -> 2, 1: 2 -> 0, 2: 0 -> 1), stored in rows
    4k..4k+3 as (pu, pv, dx, dy) with p its lower-id end and (dx, dy) = q - p, both negated
    when the edge runs from the higher id or the triangle is negatively oriented, so that
    `e_k = dx * (y - pv) - dy * (x - pu)` is >= 0 inside; rows 12..14 hold z0, z1, z2.
    The negations are exact, so e_k equals the directed edge function cross(q - p, xy - p)
    up to its sign, bit for bit; two triangles sharing an edge get exactly opposite values.
    """
    rows = []
    sigma = torch.where(area_positive, 1.0, -1.0).to(corners.dtype)
    for p_k, q_k in ((1, 2), (2, 0), (0, 1)):
        forward = ids[:, p_k] < ids[:, q_k]
        lo = torch.where(forward[:, None], corners[:, p_k], corners[:, q_k])
        hi = torch.where(forward[:, None], corners[:, q_k], corners[:, p_k])
        sign = torch.where(forward, sigma, -sigma)
        rows += [lo[:, 0], lo[:, 1], sign * (hi[:, 0] - lo[:, 0]),
                 sign * (hi[:, 1] - lo[:, 1])]
    rows += [corners[:, 0, 2], corners[:, 1, 2], corners[:, 2, 2]]
    return torch.stack(rows, 0)


def _edges(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(rows[4 * k + 2] * (y - rows[4 * k + 1])  # type: ignore[return-value]
                 - rows[4 * k + 3] * (x - rows[4 * k]) for k in range(3))


def pixel_weights(rows: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Coverage, perspective-correct barycentrics `[N, 3]` and depth `[N]` of N
    (triangle, pixel centre) pairs: `rows` `[15, N]` of `edge_table`, x, y `[N]`."""
    e0, e1, e2 = _edges(rows, x, y)
    total = (e0 + e1) + e2
    inside = (e0 >= 0) & (e1 >= 0) & (e2 >= 0) & (total > 0)
    safe = torch.where(inside, total, torch.ones_like(total))
    q0 = (e0 / safe) / rows[12]
    q1 = (e1 / safe) / rows[13]
    q2 = (e2 / safe) / rows[14]
    qs = (q0 + q1) + q2
    qs = torch.where(inside, qs, torch.ones_like(qs))
    bary = torch.stack([q0 / qs, q1 / qs, q2 / qs], -1)
    return inside, bary, 1.0 / qs


def _depth(rows: torch.Tensor, e0: torch.Tensor, e1: torch.Tensor, e2: torch.Tensor
           ) -> torch.Tensor:
    total = (e0 + e1) + e2
    qs = ((e0 / total) / rows[12] + (e1 / total) / rows[13]) + (e2 / total) / rows[14]
    return 1.0 / qs


@dataclass(frozen=True)
class _Setup:
    table: torch.Tensor  # M,15 edge table of the drawable triangles
    flat: torch.Tensor  # M: b*F + f of each drawable triangle
    jlo: torch.Tensor  # M int64 (bounding box of pixel centres, inclusive)
    jhi: torch.Tensor
    ilo: torch.Tensor
    ihi: torch.Tensor


def _setup(screen: torch.Tensor, tris: torch.Tensor, height: int, width: int,
           cull_back: bool, near: float) -> _Setup:
    batch, n_tri = screen.shape[0], tris.shape[0]
    corners = screen.index_select(1, tris.reshape(-1)).reshape(batch, n_tri, 3, 3)
    u, v, z = corners.unbind(-1)  # B,F,3 each
    u0, u1, u2 = u.unbind(-1)
    v0, v1, v2 = v.unbind(-1)
    valid = (_finite(u) & _finite(v) & _finite(z)).all(-1) & (z > near).all(-1)
    area2 = (u1 - u0) * (v2 - v0) - (u2 - u0) * (v1 - v0)
    valid &= area2 != 0
    if cull_back:
        valid &= area2 < 0
    flat = torch.nonzero(valid.reshape(-1)).squeeze(1)
    corners = corners.reshape(-1, 3, 3).index_select(0, flat)
    u, v = corners[..., 0], corners[..., 1]
    # bounding box of the pixel centres inside [0, W-1] x [0, H-1]
    jlo = torch.ceil(u.amin(-1) - 0.5).clamp(0, width).to(torch.int64)
    jhi = torch.floor(u.amax(-1) - 0.5).clamp(-1, width - 1).to(torch.int64)
    ilo = torch.ceil(v.amin(-1) - 0.5).clamp(0, height).to(torch.int64)
    ihi = torch.floor(v.amax(-1) - 0.5).clamp(-1, height - 1).to(torch.int64)
    keep = torch.nonzero((jlo <= jhi) & (ilo <= ihi)).squeeze(1)
    flat, corners = flat.index_select(0, keep), corners.index_select(0, keep)
    table = edge_table(corners, tris.index_select(0, flat % n_tri),
                       area2.reshape(-1).index_select(0, flat) > 0)
    return _Setup(table, flat, *(t.index_select(0, keep) for t in (jlo, jhi, ilo, ihi)))


def _next_pow2(x: torch.Tensor) -> torch.Tensor:
    """Smallest power of two >= x (x >= 1), int64."""
    return torch.pow(2, torch.ceil(torch.log2(x.to(torch.float64))).to(torch.int64))


def rasterize_reference(screen: torch.Tensor, triangles: torch.Tensor, height: int, width: int,
                        cull_back: bool = True, near: float = NEAR,
                        max_candidates: int = 1 << 22, trusted_triangles: bool = False
                        ) -> Raster:
    """Rasterize B frames (see the module docstring for every convention).

    Vectorised in two passes: (1) every (triangle, pixel of its bounding box) pair, grouped
    by bounding-box size, is tested and its key `depth bits << 32 | id` reduced per pixel
    with amin; (2) each covered pixel's barycentrics and depth are computed from its winner.
    Works on any torch device (on CUDA it is the plain-torch baseline of the benchmark).
    `max_candidates` bounds the (triangle, pixel) pairs held at once (memory);
    `trusted_triangles` skips the check of the vertex ids (the caller checked them once).
    """
    check_inputs(screen, triangles, height, width)
    height, width = int(height), int(width)
    batch = screen.shape[0]
    device = screen.device
    n_tri = triangles.shape[0]
    if batch == 0 or n_tri == 0:
        return empty_raster(batch, height, width, device)
    if not trusted_triangles:
        check_triangle_ids(triangles, screen.shape[1])
    tris = triangles.to(torch.int64)
    s = _setup(screen.contiguous(), tris, height, width, cull_back, near)
    keys = torch.full((batch * height * width,), EMPTY_KEY, dtype=torch.int64, device=device)
    if s.flat.numel():
        cls_w = _next_pow2(s.jhi - s.jlo + 1)
        cls_h = _next_pow2(s.ihi - s.ilo + 1)
        cls = cls_w * (1 << 24) + cls_h
        for key in torch.unique(cls).tolist():
            cw, ch = key >> 24, key & ((1 << 24) - 1)
            members = torch.nonzero(cls == key).squeeze(1)
            step = max(1, max_candidates // (cw * ch))
            for start in range(0, members.numel(), step):
                _pass1(s, members[start:start + step], cw, ch, n_tri, height, width, keys)
    return _pass2(s, keys, batch, n_tri, height, width)


def _pass1(s: _Setup, members: torch.Tensor, cw: int, ch: int, n_tri: int, height: int,
           width: int, keys: torch.Tensor) -> None:
    """Test every pixel of the members' bounding boxes; amin their keys into the pixels."""
    jlo = s.jlo.index_select(0, members)
    ilo = s.ilo.index_select(0, members)
    if cw * ch > 1:
        dj = torch.arange(cw, device=members.device)
        di = torch.arange(ch, device=members.device)
        w = s.jhi.index_select(0, members) - jlo  # N (box width - 1)
        h = s.ihi.index_select(0, members) - ilo
        keep = (dj[None, None, :] <= w[:, None, None]) & (di[None, :, None] <= h[:, None, None])
        sel = torch.nonzero(keep.reshape(-1)).squeeze(1)
        local = sel // (ch * cw)
        rem = sel - local * (ch * cw)
        oi = rem // cw
        j = jlo.index_select(0, local) + (rem - oi * cw)
        i = ilo.index_select(0, local) + oi
        owner = members.index_select(0, local)
    else:
        owner, j, i = members, jlo, ilo
    rows = s.table.index_select(1, owner)
    x = j.to(torch.float32) + 0.5
    y = i.to(torch.float32) + 0.5
    e0, e1, e2 = _edges(rows, x, y)
    inside = (e0 >= 0) & (e1 >= 0) & (e2 >= 0) & ((e0 + e1) + e2 > 0)
    hit = torch.nonzero(inside).squeeze(1)
    if hit.numel() == 0:
        return
    depth = _depth(rows.index_select(1, hit), e0.index_select(0, hit), e1.index_select(0, hit),
                   e2.index_select(0, hit))
    flat = s.flat.index_select(0, owner.index_select(0, hit))
    b = flat // n_tri
    bits = depth.view(torch.int32).to(torch.int64)
    key = (bits << 32) | (flat - b * n_tri)
    pix = (b * height + i.index_select(0, hit)) * width + j.index_select(0, hit)
    keys.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _pass2(s: _Setup, keys: torch.Tensor, batch: int, n_tri: int, height: int,
           width: int) -> Raster:
    device = keys.device
    out = empty_raster(batch, height, width, device)
    pix = torch.nonzero(keys != EMPTY_KEY).squeeze(1)
    if pix.numel() == 0:
        return out
    f = keys[pix] & 0xFFFFFFFF
    b = pix // (height * width)
    rem = pix - b * (height * width)
    i = rem // width
    j = rem - i * width
    row_of = torch.full((batch * n_tri,), -1, dtype=torch.int64, device=device)
    row_of[s.flat] = torch.arange(s.flat.numel(), device=device)
    rows = s.table.index_select(1, row_of[b * n_tri + f])
    _, bary, depth = pixel_weights(rows, j.to(torch.float32) + 0.5, i.to(torch.float32) + 0.5)
    out.triangle.view(-1)[pix] = f.to(torch.int32)
    out.bary.view(-1, 3)[pix] = bary
    out.depth.view(-1)[pix] = depth
    return out
