"""Small geometry shared by the stages: similarity alignment, closest points, normals
(rotations live in tracker.rotation)."""

from __future__ import annotations

import weakref

import numpy as np
import torch


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None,
            scale: bool = True) -> tuple[float, np.ndarray, np.ndarray]:
    """Similarity (s, R, t) minimising sum w * |s R src + t - dst|^2; src, dst (N, 3)."""
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_s = (w[:, None] * src).sum(0)
    mu_d = (w[:, None] * dst).sum(0)
    a = src - mu_s
    b = dst - mu_d
    cov = (w[:, None] * b).T @ a
    u, d, vt = np.linalg.svd(cov)
    sign = np.eye(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2, 2] = -1.0
    rot = u @ sign @ vt
    var = (w * (a * a).sum(1)).sum()
    s = float(np.trace(np.diag(d) @ sign) / var) if scale else 1.0
    t = mu_d - s * rot @ mu_s
    return s, rot, t


def closest_points_on_triangles(
    points: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Closest point of each point to each paired triangle (Ericson, Real-Time Collision
    Detection 5.1.5), vectorised. points, a, b, c: (N, 3). Returns (closest (N, 3),
    barycentric (N, 3) with respect to (a, b, c))."""
    ab, ac, ap = b - a, c - a, points - a
    d1 = (ab * ap).sum(1)
    d2 = (ac * ap).sum(1)
    bp = points - b
    d3 = (ab * bp).sum(1)
    d4 = (ac * bp).sum(1)
    cp = points - c
    d5 = (ab * cp).sum(1)
    d6 = (ac * cp).sum(1)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2
    denom = va + vb + vc
    denom = np.where(np.abs(denom) < 1e-20, 1e-20, denom)
    v = vb / denom
    w = vc / denom
    bary = np.stack([1.0 - v - w, v, w], 1)
    eps = 1e-30

    def edge(mask: np.ndarray, i: int, j: int, tval: np.ndarray) -> None:
        tval = np.clip(tval, 0.0, 1.0)
        out = np.zeros((mask.sum(), 3))
        out[:, i] = 1.0 - tval[mask]
        out[:, j] = tval[mask]
        bary[mask] = out

    # regions, in reverse priority so that vertex regions win
    m_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)
    edge(m_bc, 1, 2, (d4 - d3) / np.maximum((d4 - d3) + (d5 - d6), eps))
    m_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    edge(m_ac, 0, 2, d2 / np.maximum(d2 - d6, eps))
    m_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    edge(m_ab, 0, 1, d1 / np.maximum(d1 - d3, eps))
    for mask, i in (((d6 >= 0) & (d5 <= d6), 2), ((d3 >= 0) & (d4 <= d3), 1),
                    ((d1 <= 0) & (d2 <= 0), 0)):
        onehot = np.zeros(3)
        onehot[i] = 1.0
        bary[mask] = onehot
    closest = bary[:, :1] * a + bary[:, 1:2] * b + bary[:, 2:] * c
    return closest, bary


def closest_points_on_mesh(
    points: np.ndarray, vertices: np.ndarray, triangles: np.ndarray, candidates: int = 12
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Closest surface point of each point (N, 3) on a triangle mesh.

    Searches the triangles around the `candidates` nearest vertices (exact for the smooth,
    evenly sampled meshes used here). Returns (triangle ids (N,), barycentrics (N, 3),
    distances (N,)).
    """
    points = np.asarray(points, np.float64)
    vertices = np.asarray(vertices, np.float64)
    used = np.unique(triangles)
    d2 = ((points[:, None, :] - vertices[None, used, :]) ** 2).sum(-1)
    nearest = used[np.argsort(d2, axis=1)[:, :candidates]]  # N,k
    by_vertex: dict[int, list[int]] = {}
    for f, tri in enumerate(triangles):
        for v in tri:
            by_vertex.setdefault(int(v), []).append(f)
    best_tri = np.zeros(len(points), np.int64)
    best_bary = np.zeros((len(points), 3))
    best_dist = np.full(len(points), np.inf)
    for n in range(len(points)):
        faces = np.unique(np.concatenate([by_vertex[int(v)] for v in nearest[n]]))
        tri = triangles[faces]
        p = np.repeat(points[n : n + 1], len(faces), 0)
        closest, bary = closest_points_on_triangles(
            p, vertices[tri[:, 0]], vertices[tri[:, 1]], vertices[tri[:, 2]])
        dist = np.linalg.norm(closest - p, axis=1)
        k = int(np.argmin(dist))
        best_tri[n], best_bary[n], best_dist[n] = faces[k], bary[k], dist[k]
    return best_tri, best_bary, best_dist



def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals [..., V, 3] of vertices [..., V, 3], area-weighted over
    `triangles` [F, 3] (long, on the vertices' device; outward normal = cross(b - a, c - a)).

    On CUDA each vertex sums its faces' normals in a fixed order (`face_incidence`): one
    face per vertex per step, so no step adds twice into a vertex and the result is the same
    on every run. A plain `index_add_` over all faces sums, on CUDA, in the order its atomic
    adds land, which moved rendered colours, and so `dvp reenact`'s frames, between two
    runs. The CPU's `index_add_` is sequential, so the CPU keeps it (twice as fast there).
    Differentiable."""
    a, b, c = (vertices.index_select(-2, triangles[:, k]) for k in range(3))
    fn = torch.cross(b - a, c - a, dim=-1)
    n = torch.zeros_like(vertices)
    if vertices.is_cuda:
        for rows, faces in face_incidence(triangles, vertices.shape[-2]):
            n.index_add_(-2, rows, fn.index_select(-2, faces))
    else:
        for k in range(3):
            n.index_add_(-2, triangles[:, k], fn)
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)


#: face_incidence's tables, by the id of the triangle tensor (with a weak reference to it,
#: so a new tensor at a recycled id is not taken for the old one).
_INCIDENCE: dict[int, tuple[weakref.ref[torch.Tensor], int, list[tuple[torch.Tensor,
                                                                        torch.Tensor]]]] = {}


def face_incidence(triangles: torch.Tensor, n_vertices: int
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The faces of each vertex as steps (rows, faces), long tensors on the triangles'
    device: step k pairs every vertex with at least k + 1 faces (`rows`, each once) with its
    (k + 1)-th face in ascending order (`faces`). Made once per triangle tensor."""
    cached = _INCIDENCE.get(id(triangles))
    if cached is not None and cached[0]() is triangles and cached[1] == n_vertices:
        return cached[2]
    tri = triangles.detach().cpu().numpy().astype(np.int64)
    vertex = tri.reshape(-1)
    face = np.repeat(np.arange(len(tri)), 3)
    order = np.argsort(vertex, kind="stable")  # by vertex, faces ascending within
    vertex, face = vertex[order], face[order]
    counts = np.bincount(vertex, minlength=n_vertices)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.arange(len(vertex)) - starts[vertex]  # the face's place among its vertex's
    device = triangles.device
    steps = [(torch.from_numpy(vertex[rank == k]).to(device),
              torch.from_numpy(face[rank == k]).to(device))
             for k in range(int(counts.max(initial=0)))]
    for key in [k for k, v in _INCIDENCE.items() if v[0]() is None]:
        del _INCIDENCE[key]
    _INCIDENCE[id(triangles)] = (weakref.ref(triangles), n_vertices, steps)
    return steps
