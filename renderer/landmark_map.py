"""The measured landmark map: where MediaPipe puts its 468 mesh points on rendered faces.

The geometric map (`tracker.face_model._landmark_map`) lays MediaPipe's canonical mesh onto
ICT's mean face by a similarity and closest points. MediaPipe's detector, run on images of
ICT faces, puts many points elsewhere: on `dvp synth` video the median point sat 2.2 px
(p90 4.8 px) from its mapped position on a face of 37 px RMS radius, the brows 5.6 px
higher, the face oval 2 px higher, while a point's scatter about its own mean was 0.6 px.
Fitted through that map, the head pitch came out 4.5 degrees off and the translation 6 cm.

This module measures the map instead. Synthetic actors (`renderer.synth`: random identity,
skin, lighting, focal length, pose, speech, blinks) are rendered with known geometry;
MediaPipe finds its points on each frame (streaming mode, as the product tracks: a fresh
detector per actor over its consecutive frames); the surface point under each detected
point is found on the true mesh: the nearest front-facing hit among the face triangles
within `RADIUS_CM` (on the mean face) of the point's geometric position, inner-lip points
among their own lip's triangles only (`tracker.face_model.lip_triangles`), and a point just
off the surface (an eyelid or lip margin over the eye or the open mouth) snapped to the
nearest such triangle within `SNAP_PX`. The hits are taken to the mean face, their median
per axis is projected back onto its surface (own lip for the inner-lip points), and a row
(landmark, triangle, barycentrics, samples) is written for every point with at least
`MIN_SAMPLES` hits. The face model build (`tracker.face_model.build_model_arrays`) reads the
file; the 10 iris points keep their geometric map (they only drive gaze).

    python -m renderer.landmark_map [--actors 40] [--frames 40] [-o FILE]

writes `tracker/data/mediapipe_landmark_map.txt` by default (seeds 1000.. so that the
benchmarks' actors, seeds 0.., are not among them). Then rebuild the face-model cache
(bump `tracker.face_model.MODEL_FORMAT` when the shipped file changes).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tracker.face_model import (
    INNER_LIP_LOWER_POINTS,
    INNER_LIP_UPPER_POINTS,
    LEARNED_MAP,
    FaceModel,
    lip_triangles,
)
from tracker.geometry import closest_points_on_mesh
from tracker.landmarks import Landmarks
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix_np

log = logging.getLogger(__name__)

N_MESH = 468
#: A detected point is searched for among the face triangles whose centroid lies within
#: this distance (cm, on the mean face) of its geometric map position.
RADIUS_CM = 2.0
#: A detected point that hits none of its triangles snaps to the nearest one within this
#: distance in the image (pixels).
SNAP_PX = 1.5
#: Points with fewer hits keep their geometric map.
MIN_SAMPLES = 30
#: First seed of the actors rendered for the measurement.
FIRST_SEED = 1000
#: Frames between the starts of successive actors' windows (mod the motion's length).
WINDOW_STRIDE = 37
#: MediaPipe's eye contours (lid margins; right eye, then left): these keep the geometric
#: map. Measured, they sit where MediaPipe puts them on open eyes and follow a closing lid
#: worse: eyeBlink MAE 0.11-0.14 against 0.06-0.08 geometric on `dvp synth` video.
EYE_CONTOURS = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246,
                263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)


@dataclass(frozen=True)
class Candidates:
    """Per mesh point, the triangles its hits are searched among: ids [468, K] int64 into
    the model's triangles, -1 padding; allowed sets for the final projection (lists of
    triangle-id arrays per point)."""

    ids: np.ndarray
    allowed: list[np.ndarray]


def _lips(model: FaceModel) -> tuple[np.ndarray, np.ndarray]:
    return lip_triangles(model.neutral, model.expression_basis[model.expression_index("jawOpen")],
                         model.triangles, model.triangle_region, model.region_names,
                         model.landmark_68)


def candidate_triangles(model: FaceModel, radius_cm: float = RADIUS_CM) -> Candidates:
    """The triangles each mesh point may land on (see the module doc)."""
    face = model.region_triangles("face")
    upper, lower = _lips(model)
    own: dict[int, np.ndarray] = {i: upper for i in INNER_LIP_UPPER_POINTS}
    own |= {i: lower for i in INNER_LIP_LOWER_POINTS}
    centroid = model.neutral[model.triangles].mean(1)  # F,3
    at = model.landmarks(model.neutral)[:N_MESH]
    lists, allowed = [], []
    for i in range(N_MESH):
        pool = own.get(i, face)
        near = pool[np.linalg.norm(centroid[pool] - at[i], axis=1) <= radius_cm]
        lists.append(near)
        allowed.append(pool)
    k = max(len(x) for x in lists)
    ids = np.full((N_MESH, k), -1, np.int64)
    for i, x in enumerate(lists):
        ids[i, :len(x)] = x
    return Candidates(ids, allowed)


def surface_hits(model: FaceModel, params: FaceParams, landmarks: Sequence[Landmarks],
                 candidates: Candidates, snap_px: float = SNAP_PX) -> np.ndarray:
    """Mean-face positions [T, 468, 3] (cm) of the true surface under each detected mesh
    point of T frames (NaN where a frame has no face or a point found no triangle).

    params: the frames' true geometry and camera; landmarks: MediaPipe's points on them.
    """
    t_all = params.frames
    out = np.full((t_all, N_MESH, 3), np.nan)
    cand = torch.as_tensor(candidates.ids)
    valid_c = cand >= 0
    tri_v = torch.as_tensor(model.triangles.astype(np.int64))[cand.clamp_min(0)]  # 468,K,3
    neutral = torch.as_tensor(model.neutral, dtype=torch.float64)
    verts = model.vertices(np.broadcast_to(params.identity, (t_all, len(params.identity))),
                           params.expression, params.gaze)
    rot = axis_angle_to_matrix_np(params.rotation.astype(np.float64))
    f = float(params.focal[0])
    cx, cy = (float(c) for c in params.principal_point)
    for t in range(t_all):
        if not landmarks[t].found:
            continue
        x = torch.as_tensor(verts[t].astype(np.float64) @ rot[t].T
                            + params.translation[t].astype(np.float64))
        z = x[:, 2].clamp_min(1e-3)
        uv = torch.stack([f * x[:, 0] / z + cx, f * x[:, 1] / z + cy], -1)
        p = uv[tri_v]  # 468,K,3,2
        zt = z[tri_v]  # 468,K,3
        q = torch.as_tensor(landmarks[t].points[:N_MESH].astype(np.float64))[:, None, None]
        area2 = ((p[..., 1, 0] - p[..., 0, 0]) * (p[..., 2, 1] - p[..., 0, 1])
                 - (p[..., 2, 0] - p[..., 0, 0]) * (p[..., 1, 1] - p[..., 0, 1]))
        front = valid_c & (area2 < 0) & (zt > 1.0).all(-1)
        # screen barycentrics of the point in each candidate
        e = []
        for a, b in ((1, 2), (2, 0), (0, 1)):
            pa, pb = p[..., a, :], p[..., b, :]
            e.append((pb[..., 0] - pa[..., 0]) * (q[..., 0, 1] - pa[..., 1])
                     - (pb[..., 1] - pa[..., 1]) * (q[..., 0, 0] - pa[..., 0]))
        lam = torch.stack(e, -1) / torch.where(area2.abs() > 1e-12, area2, 1e-12)[..., None]
        inside = front & (lam >= 0).all(-1)
        qinv = lam / zt
        depth = 1.0 / qinv.sum(-1).where(inside, torch.ones_like(area2))
        depth = torch.where(inside, depth, torch.full_like(depth, float("inf")))
        best = depth.argmin(1)  # 468
        hit = torch.gather(inside, 1, best[:, None])[:, 0]
        lam_hit = torch.gather(lam, 1, best[:, None, None].expand(-1, 1, 3))[:, 0]
        # snap: the nearest point on the front-facing candidates' edges
        dist = torch.full(area2.shape, float("inf"), dtype=torch.float64)
        lam_snap = torch.zeros_like(lam)
        for k, (a, b) in enumerate(((1, 2), (2, 0), (0, 1))):
            pa, pb = p[..., a, :], p[..., b, :]
            ab = pb - pa
            s = (((q[:, :, 0] - pa) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)
                 ).clamp(0.0, 1.0)
            d = (pa + s[..., None] * ab - q[:, :, 0]).norm(dim=-1)
            d = torch.where(front, d, torch.full_like(d, float("inf")))
            closer = d < dist
            dist = torch.where(closer, d, dist)
            edge = torch.zeros_like(lam)
            edge[..., a] = 1.0 - s
            edge[..., b] = s
            lam_snap = torch.where(closer[..., None], edge, lam_snap)
        near = dist.argmin(1)
        snap_ok = torch.gather(dist, 1, near[:, None])[:, 0] <= snap_px
        lam_near = torch.gather(lam_snap, 1, near[:, None, None].expand(-1, 1, 3))[:, 0]
        choice = torch.where(hit, best, near)
        lam_use = torch.where(hit[:, None], lam_hit, lam_near)
        ok = hit | snap_ok
        zc = torch.gather(zt, 1, choice[:, None, None].expand(-1, 1, 3))[:, 0]
        bary = lam_use / zc
        bary = bary / bary.sum(-1, keepdim=True)
        vids = torch.gather(tri_v, 1, choice[:, None, None].expand(-1, 1, 3))[:, 0]
        pos = (neutral[vids] * bary[..., None]).sum(1)
        out[t, ok.numpy()] = pos[ok].numpy()
    return out


def learned_map(model: FaceModel, hits: np.ndarray, candidates: Candidates,
                min_samples: int = MIN_SAMPLES
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(landmark ids, triangle ids, barycentrics [N, 3], samples) of the mesh points with at
    least `min_samples` hits in `hits` [T, 468, 3], the eye contours left out: the median hit
    per axis, projected onto the mean face (within the point's allowed triangles)."""
    keep, medians, counts = [], [], []
    for i in range(N_MESH):
        h = hits[:, i]
        h = h[np.isfinite(h).all(1)]
        if i in EYE_CONTOURS or len(h) < min_samples:
            continue
        keep.append(i)
        medians.append(np.median(h, 0))
        counts.append(len(h))
    ids = np.asarray(keep, np.int64)
    tris = np.zeros(len(ids), np.int64)
    bary = np.zeros((len(ids), 3))
    # one closest-point search per allowed set (the face, each lip)
    pools: dict[int, list[int]] = {}
    for k, i in enumerate(keep):
        pools.setdefault(id(candidates.allowed[i]), []).append(k)
    for members in pools.values():
        pool = candidates.allowed[keep[members[0]]]
        tri, b, _ = closest_points_on_mesh(np.asarray(medians)[members], model.neutral,
                                           model.triangles[pool], candidates=12)
        tris[members], bary[members] = pool[tri], b
    return ids, tris, bary, np.asarray(counts, np.int64)


def measure(model: FaceModel, actors: int = 40, frames: int = 40, sizes: Sequence[int] = (256, 512),
            seconds: float = 20.0, fps: float = 25.0, first_seed: int = FIRST_SEED,
            device: torch.device | str = "cpu",
            progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Hits [actors * frames, 468, 3] of `actors` synthetic actors (seeds from `first_seed`,
    sizes alternating): each actor's `frames` consecutive frames at `fps` (a window of its
    first `seconds` of motion, the windows spread over it), through MediaPipe in streaming
    mode, a fresh detector per actor, as `dvp track`, `dvp prepare` and the live path run it
    (its tracking from the previous frame's points moves them against image mode)."""
    from renderer.synth import SynthActor
    from tracker.landmarks import LandmarkDetector

    cand = candidate_triangles(model)
    span = max(frames + 1, int(seconds * fps))
    parts = []
    for a in range(actors):
        actor = SynthActor(model, seed=first_seed + a, size=int(sizes[a % len(sizes)]),
                           device=device)
        start = (a * WINDOW_STRIDE) % (span - frames)
        params = actor.motion(span, fps).select(np.arange(start, start + frames))
        images = actor.render(params)
        with LandmarkDetector(stream=True) as detector:
            lms = [detector(im) for im in images]
        parts.append(surface_hits(model, params, lms, cand))
        if progress is not None:
            progress(a + 1, actors)
    return np.concatenate(parts)


def write_map(path: Path, rows: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
              header: str) -> None:
    """Write the map's rows (see `tracker.face_model.read_learned_map`), atomically."""
    ids, tris, bary, counts = rows
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append("# landmark triangle b0 b1 b2 samples")
    for i, t, b, c in zip(ids, tris, bary, counts):
        lines.append(f"{i} {t} {b[0]:.6f} {b[1]:.6f} {1.0 - round(b[0], 6) - round(b[1], 6):.6f}"
                     f" {c}")
    tmp = path.with_name(path.name + ".part")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--actors", type=int, default=40)
    ap.add_argument("--frames", type=int, default=40, help="consecutive frames per actor")
    ap.add_argument("-o", "--output", type=Path, default=LEARNED_MAP)
    ap.add_argument("--hits", type=Path, help="also save the raw hits (.npy)")
    ap.add_argument("--from-hits", type=Path, help="make the map from hits saved earlier")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(1)
    from tracker.assets import load_face_model

    model = load_face_model()
    if args.from_hits:
        hits = np.load(args.from_hits)
    else:
        hits = measure(model, args.actors, args.frames,
                       progress=lambda i, n: print(f"actor {i}/{n}", file=sys.stderr,
                                                   flush=True))
    if args.hits:
        np.save(args.hits, hits)
    cand = candidate_triangles(model)
    rows = learned_map(model, hits, cand)
    header = (f"MediaPipe's mesh points on ICT's surface, measured by renderer.landmark_map:\n"
              f"{args.actors} synthetic actors (seeds {FIRST_SEED}..{FIRST_SEED + args.actors - 1},"
              f" sizes 256/512), {args.frames} consecutive frames each, MediaPipe streaming"
              f" mode;\n"
              f"median hit on the mean face, >= {MIN_SAMPLES} samples; {len(rows[0])} points\n"
              f"(the 32 eye-contour points keep the geometric map: see EYE_CONTOURS).")
    write_map(args.output, rows, header)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
