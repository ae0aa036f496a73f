"""A synthetic actor with ground truth: the test target and source of the whole project.

`SynthActor(model, seed, size)` makes a look from the seed (identity, skin tone and detail,
lips, brows, optional stubble and freckles, hair colour, hairline and volume, iris colour,
shirt, background, key light) and `synthesize(model, frames, size, seed)` returns the
rendered frames `(T, S, S, 3)` uint8 RGB and their ground-truth `FaceParams` (valid, at
`fps`, camera of the S x S image, `sh` the diffuse part of the lighting).

The render is deliberately richer than the conditioning images: a baked procedural skin
texture (pores, blush, lips, brows, stubble, freckles), a hair shell over the scalp with
strand texture and a sheen, eyelashes, glossy eyes with iris streaks, Blinn-Phong specular
highlights from the key light, a darkened mouth interior, shoulders and a shirt that follow
the head partly, a static background, and 2x supersampling. Motion: smooth head rotation
and drift, talking (jaw and mouth shapes at syllable rate, with pauses), brow raises,
smiles, blinks every few seconds and gaze saccades; `expression[:, eyeLook*]` follows
`gaze_to_eyelook(gaze)` as DESIGN.md requires.

Everything is a pure function of (seed, frames, size, fps): same inputs, same pixels.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from renderer.conditioning import RendererError, interpolate
from renderer.raster_ref import rasterize_reference
from renderer.sh import ambient_sh, directional_sh, irradiance_basis
from tracker.face_model import FaceModel, gaze_to_eyelook
from tracker.geometry import vertex_normals
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix, axis_angle_to_matrix_np

#: ICT regions drawn by the synthetic render (eye occlusion and blend meshes are left out,
#: and ICT's eyelash cards, which look like thick black bands without alpha; the lid margins
#: are darkened in the skin texture instead).
SYNTH_REGIONS = ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right",
                 "gums_tongue", "teeth", "eyeball_left", "eyeball_right", "lacrimal_left",
                 "lacrimal_right")
#: Materials of the synthetic render.
SKIN, HAIR, SHIRT, EYE, TEETH, MOUTH, GUMS, LACRIMAL = range(8)
_REGION_MATERIAL = {"face": SKIN, "head_neck": SKIN, "mouth_socket": MOUTH,
                    "eye_socket_left": MOUTH, "eye_socket_right": MOUTH, "gums_tongue": GUMS,
                    "teeth": TEETH, "eyeball_left": EYE, "eyeball_right": EYE,
                    "lacrimal_left": LACRIMAL, "lacrimal_right": LACRIMAL}
#: Camera: the reference focal length in units of S, head distance (cm) and head offset along
#: y (cm; < 0 up) at that focal length: head and shoulders in frame, the face about a third
#: of the height. Each actor draws its own focal length in FOCAL_RANGE (units of S); distance,
#: offset and head drift scale with it, so the face keeps its size in the frame while the
#: perspective changes (0.9 S: 37 cm away, 2.2 S: 89 cm).
FOCAL_PER_SIZE = 1.6
FOCAL_RANGE = (0.9, 2.2)
DISTANCE_CM = 65.0
HEAD_OFFSET_Y_CM = -3.0

_SKIN_TONES = np.asarray([[0.87, 0.70, 0.60], [0.78, 0.60, 0.49], [0.66, 0.47, 0.35],
                          [0.52, 0.36, 0.26], [0.38, 0.25, 0.18]], np.float32)
_HAIR_COLOURS = np.asarray([[0.06, 0.05, 0.05], [0.18, 0.11, 0.07], [0.33, 0.21, 0.12],
                            [0.62, 0.48, 0.30], [0.50, 0.22, 0.10], [0.55, 0.55, 0.56]],
                           np.float32)
_IRIS_COLOURS = np.asarray([[0.30, 0.18, 0.10], [0.20, 0.35, 0.55], [0.30, 0.42, 0.25],
                            [0.45, 0.35, 0.20]], np.float32)


@dataclass(frozen=True)
class Look:
    """What the seed chooses besides the identity (colours linear in [0, 1])."""

    skin: np.ndarray
    hair: np.ndarray
    iris: np.ndarray
    shirt: np.ndarray
    shirt_stripes: float
    hairline_cm: float
    hair_back_cm: float
    hair_thickness_cm: float
    stubble: float
    freckles: float
    light_direction: np.ndarray
    light_intensity: float
    ambient: np.ndarray
    light_colour: np.ndarray
    light_drift: float
    focal_per_size: float


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


class _Noise:
    """Smooth 3D value noise (cubic B-spline of a periodic random grid), seeded."""

    def __init__(self, rng: np.random.Generator, n: int = 32) -> None:
        grid = rng.standard_normal((n, n, n))
        self.coeffs = ndimage.spline_filter(grid, order=3, mode="grid-wrap")
        self.n = n
        self.offset = rng.uniform(0, n, 3)

    def __call__(self, points: np.ndarray, freq: float) -> np.ndarray:
        coords = (points * freq + self.offset).T % self.n
        return ndimage.map_coordinates(self.coeffs, coords, order=3, mode="grid-wrap",
                                       prefilter=False).astype(np.float32)


def _map2d(shape_cm: tuple[float, float, float, float], res: float,
           draw: callable) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A 2D map over x in [x0, x1], y in [y0, y1] (cm) at `res` cm per pixel."""
    x0, x1, y0, y1 = shape_cm
    img = np.zeros((int((y1 - y0) / res) + 1, int((x1 - x0) / res) + 1), np.float32)
    draw(img, lambda xy: ((np.asarray(xy)[..., 1] - y0) / res, (np.asarray(xy)[..., 0] - x0) / res))
    return img, (x0, y0, res)


def _sample2d(img: np.ndarray, frame: tuple[float, float, float], points: np.ndarray
              ) -> np.ndarray:
    x0, y0, res = frame
    coords = np.stack([(points[:, 1] - y0) / res, (points[:, 0] - x0) / res])
    return ndimage.map_coordinates(img, coords, order=1, mode="constant").astype(np.float32)


def _uv_surface(model: FaceModel, region: str, tile: int, size: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """Mean-face positions `(size, size, 3)` of a region's texels in its UDIM tile, and the
    mask of texels that a triangle covers (texels outside are filled from the nearest)."""
    tri_ids = model.region_triangles(region)
    uv_ids = model.triangle_uvs[tri_ids].astype(np.int64)
    uvs = model.uvs.astype(np.float64)
    screen = np.stack([(uvs[:, 0] - tile) * size, (1.0 - uvs[:, 1]) * size,
                       np.ones(len(uvs))], 1).astype(np.float32)
    r = rasterize_reference(torch.from_numpy(screen)[None], torch.from_numpy(uv_ids), size,
                            size, cull_back=False)
    tri = r.triangle[0].numpy()
    covered = tri >= 0
    bary = r.bary[0].numpy().astype(np.float64)
    verts = model.triangles[tri_ids][np.clip(tri, 0, None)]  # S,S,3
    pos = (model.neutral[verts] * bary[..., None]).sum(2)
    if covered.any() and not covered.all():
        _, (ii, jj) = ndimage.distance_transform_edt(~covered, return_indices=True)
        pos = pos[ii, jj]
    return pos.astype(np.float32), covered


def _torso_mesh(n_y: int = 24, n_theta: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Shoulders and chest in the head's model frame (cm): vertices, triangles (outward),
    and per-vertex (theta, y) coordinates for the shirt pattern."""
    ys = np.linspace(9.0, 52.0, n_y)
    thetas = np.linspace(0.0, 2.0 * np.pi, n_theta, endpoint=False)
    yy, tt = np.meshgrid(ys, thetas, indexing="ij")
    rx = 5.2 + 14.8 * _smoothstep(13.0, 25.0, yy)
    rz = 4.6 + 5.4 * _smoothstep(13.0, 27.0, yy)
    x = rx * np.sin(tt)
    z = 0.8 - rz * np.cos(tt)
    verts = np.stack([x, yy, z], -1).reshape(-1, 3).astype(np.float32)
    tris = []
    for i in range(n_y - 1):
        for j in range(n_theta):
            a, b = i * n_theta + j, i * n_theta + (j + 1) % n_theta
            c, d = a + n_theta, b + n_theta
            tris += [[a, c, b], [b, c, d]]
    tris = np.asarray(tris, np.int64)
    v = verts
    n = np.cross(v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]])
    centre = v[tris].mean(1) - np.asarray([0.0, 0.0, 0.8])
    centre[:, 1] = 0.0
    if (np.einsum("ij,ij->i", n, centre) < 0).mean() > 0.5:
        tris = tris[:, [0, 2, 1]]
    coords = np.stack([tt.reshape(-1), yy.reshape(-1)], -1).astype(np.float32)
    return verts, tris, coords


class SynthActor:
    """A seeded synthetic actor: look, baked textures, hair shell, torso, background."""

    def __init__(self, model: FaceModel, seed: int = 0, size: int = 256,
                 texture_size: int = 512, supersample: int | None = None,
                 device: torch.device | str = "cpu") -> None:
        if int(size) <= 0:
            raise RendererError(f"synthetic actor size must be positive, got {size}")
        self.model = model
        self.seed = int(seed)
        self.size = int(size)
        self.supersample = (2 if self.size <= 256 else 1) if supersample is None \
            else max(1, int(supersample))
        self.device = torch.device(device)
        rng = np.random.default_rng([self.seed, 0x5EED])
        self.identity = np.clip(rng.normal(0.0, 0.8, model.identity_basis.shape[0]),
                                -2.0, 2.0).astype(np.float32)
        self.look = self._pick_look(rng, np.random.default_rng([self.seed, 0xF0CA1]))
        self._noise = _Noise(rng)
        self._noise_b = _Noise(rng)
        self._iris_noise = rng.uniform(0.0, 1.0, 64).astype(np.float32)
        self.skin_texture, self.hair_texture = self._bake(int(texture_size))
        self.background = self._background(rng)
        self._build_meshes()

    # ---- look ----------------------------------------------------------------------------
    @staticmethod
    def _pick_look(rng: np.random.Generator, camera_rng: np.random.Generator) -> Look:
        """The look from `rng`; focal length and light colour and drift from `camera_rng`
        (a stream of their own, so that adding them left every other draw as it was)."""
        k = rng.uniform(0, len(_SKIN_TONES) - 1)
        lo = int(k)
        skin = _SKIN_TONES[lo] + (k - lo) * (_SKIN_TONES[min(lo + 1, 4)] - _SKIN_TONES[lo])
        hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.15)
        iris = _IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))] * rng.uniform(0.8, 1.2)
        shirt = rng.uniform(0.1, 0.85, 3).astype(np.float32)
        az = rng.uniform(-0.9, 0.9)
        el = rng.uniform(0.2, 0.7)
        direction = np.asarray([math.sin(az) * math.cos(el), -math.sin(el),
                                -math.cos(az) * math.cos(el)], np.float32)
        return Look(
            skin=skin.astype(np.float32), hair=np.clip(hair, 0, 1).astype(np.float32),
            iris=np.clip(iris, 0, 1).astype(np.float32), shirt=shirt,
            shirt_stripes=float(rng.uniform() < 0.5),
            hairline_cm=float(rng.uniform(-10.0, -8.0)),
            hair_back_cm=float(rng.uniform(2.0, 8.0)),
            hair_thickness_cm=float(rng.uniform(0.8, 2.0)),
            stubble=float(rng.uniform() < 0.4) * float(rng.uniform(0.3, 0.8)),
            freckles=float(rng.uniform() < 0.3) * float(rng.uniform(0.3, 1.0)),
            light_direction=direction, light_intensity=float(rng.uniform(0.45, 0.75)),
            ambient=(rng.uniform(0.35, 0.55) * rng.uniform(0.9, 1.1, 3)).astype(np.float32),
            light_colour=(1.0 + np.asarray([1.0, 0.0, -1.0]) * camera_rng.uniform(-0.12, 0.12)
                          + camera_rng.uniform(-0.04, 0.04, 3)).astype(np.float32),
            light_drift=float(camera_rng.uniform(0.0, 0.35)),
            focal_per_size=float(camera_rng.uniform(*FOCAL_RANGE)),
        )

    def light_directions(self, times: np.ndarray) -> np.ndarray:
        """`(T, 3)` key-light directions at `times` (s): the look's direction, its azimuth
        drifting slowly (+-light_drift radians, period 20 s) about the camera's y axis."""
        look = self.look
        ang = look.light_drift * np.sin(2.0 * np.pi * np.asarray(times, np.float64) / 20.0)
        c, s = np.cos(ang), np.sin(ang)
        d = look.light_direction.astype(np.float64)
        return np.stack([c * d[0] + s * d[2], np.full_like(c, d[1]), -s * d[0] + c * d[2]],
                        -1).astype(np.float32)

    def sh(self, times: np.ndarray | None = None) -> np.ndarray:
        """SH coefficients of the diffuse lighting (ambient + the tinted key light): `(9, 3)`
        at time 0, or `(T, 9, 3)` at `times` (s) when given (the key light drifts)."""
        look = self.look
        amb = ambient_sh(1.0, tuple(float(a) for a in look.ambient))
        ts = np.zeros(1) if times is None else np.asarray(times, np.float64).reshape(-1)
        out = np.stack([amb + directional_sh(d, look.light_intensity * look.light_colour)
                        for d in self.light_directions(ts)]).astype(np.float32)
        return out[0] if times is None else out

    def _hair_weight(self, p: np.ndarray) -> np.ndarray:
        """1 on the scalp (under the hair), 0 elsewhere, soft over ~1 cm: p (N, 3) mean face."""
        look = self.look
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        t = _smoothstep(-8.0, 6.0, z)
        line = look.hairline_cm + t * (look.hair_back_cm - look.hairline_cm)
        w = _smoothstep(0.0, 1.2, line - y)
        ears = _smoothstep(6.0, 7.0, np.abs(x)) * _smoothstep(-6.5, -5.0, y) \
            * (1.0 - _smoothstep(2.0, 4.0, z))
        return (w * (1.0 - ears)).astype(np.float32)

    def _skin(self, p: np.ndarray) -> np.ndarray:
        """Skin albedo (N, 3) at mean-face points p (N, 3) cm."""
        look, m = self.look, self.model
        n1 = self._noise(p, 0.35)
        n2 = self._noise_b(p, 1.7)
        pores = self._noise(p, 9.0)
        col = look.skin[None] * (1.0 + 0.05 * n1[:, None] + 0.025 * n2[:, None]
                                 + 0.025 * pores[:, None])
        lm = m.neutral[m.landmark_68]
        front = _smoothstep(-6.0, -8.0, p[:, 2])
        for side in (-1.0, 1.0):  # blush on the cheeks
            d2 = ((p[:, 0] - side * 4.2) ** 2 + (p[:, 1] - 1.0) ** 2)
            col += (np.exp(-d2 / (2 * 1.8 ** 2)) * front)[:, None] * \
                np.asarray([0.05, -0.015, -0.01], np.float32)
        box = (-9.0, 9.0, -9.0, 10.0)

        def lips(img: np.ndarray, to_px) -> None:  # type: ignore[no-untyped-def]
            from skimage.draw import polygon
            rr, cc = to_px(lm[48:60, :2])
            ri, ci = polygon(rr, cc, img.shape)
            img[ri, ci] = 1.0

        lip_map, frame = _map2d(box, 0.05, lips)
        lip_map = ndimage.gaussian_filter(lip_map, 2.0)
        lip = _sample2d(lip_map, frame, p) * front
        lip_col = look.skin * np.asarray([0.86, 0.58, 0.58], np.float32)
        col = col * (1.0 - lip[:, None]) + lip[:, None] * lip_col[None] * \
            (1.0 + 0.03 * pores[:, None])

        def brows(img: np.ndarray, to_px) -> None:  # type: ignore[no-untyped-def]
            from skimage.draw import disk
            for ids in (range(17, 22), range(22, 27)):
                pts = lm[list(ids), :2] - np.asarray([0.0, 0.25])
                for a, b in itertools.pairwise(pts):
                    for t in np.linspace(0, 1, 12):
                        q = a + t * (b - a)
                        r, c = to_px(q)
                        width = 0.42 if q[0] * np.sign(q[0]) < 3.5 else 0.3
                        rr, cc = disk((float(r), float(c)), width / 0.05, shape=img.shape)
                        img[rr, cc] = 1.0

        brow_map, frame = _map2d(box, 0.05, brows)
        brow_map = ndimage.gaussian_filter(brow_map, 1.5)
        strands = 0.5 + 0.5 * self._noise_b(p * np.asarray([1.0, 6.0, 1.0]), 3.0)
        brow = np.clip(_sample2d(brow_map, frame, p) * front * (0.55 + 0.6 * strands), 0, 1)
        col = col * (1.0 - brow[:, None]) + brow[:, None] * look.hair[None] * 0.9

        def lids(img: np.ndarray, to_px) -> None:  # type: ignore[no-untyped-def]
            from skimage.draw import disk
            for ids in (range(36, 40), range(42, 46)):  # upper lid contours
                pts = lm[list(ids), :2] - np.asarray([0.0, 0.05])
                for a, b in itertools.pairwise(pts):
                    for t in np.linspace(0, 1, 10):
                        r, c = to_px(a + t * (b - a))
                        rr, cc = disk((float(r), float(c)), 0.14 / 0.05, shape=img.shape)
                        img[rr, cc] = 1.0

        lid_map, frame = _map2d(box, 0.05, lids)
        lid = _sample2d(ndimage.gaussian_filter(lid_map, 1.0), frame, p) * front
        col = col * (1.0 - 0.75 * lid[:, None]) + 0.75 * lid[:, None] * look.hair[None] * 0.5
        if look.stubble > 0:
            jaw = _smoothstep(2.0, 4.5, p[:, 1]) * _smoothstep(-4.5, -7.0, p[:, 2]) \
                * (1.0 - lip) * _smoothstep(7.8, 6.0, np.abs(p[:, 0]) + 0.0)
            dots = np.clip(self._noise(p, 14.0) * 1.5, 0, 1)
            s = (look.stubble * jaw * (0.35 + 0.65 * dots))[:, None]
            col = col * (1.0 - 0.6 * s) + 0.6 * s * look.hair[None]
        if look.freckles > 0:
            zone = np.exp(-(p[:, 0] ** 2 / 30.0 + (p[:, 1] + 0.5) ** 2 / 8.0)) * front
            spots = np.clip((self._noise_b(p, 6.0) - 1.0) * 2.0, 0, 1)
            col *= (1.0 - 0.35 * look.freckles * zone * spots)[:, None]
        hair = self._hair_weight(p)[:, None]
        col = col * (1.0 - hair) + hair * (0.6 * look.hair + 0.4 * look.skin * 0.6)[None]
        return np.clip(col, 0.0, 1.0).astype(np.float32)

    def _hair(self, p: np.ndarray) -> np.ndarray:
        """Hair albedo (N, 3) with strands running down the head."""
        look = self.look
        s1 = self._noise(p * np.asarray([1.0, 0.12, 1.0]), 7.0)
        s2 = self._noise_b(p * np.asarray([1.0, 0.2, 1.0]), 2.5)
        shade = 1.0 + 0.28 * s1 + 0.15 * s2
        return np.clip(look.hair[None] * shade[:, None] + 0.02 * s1[:, None], 0, 1).astype(
            np.float32)

    def _bake(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Skin and hair UV textures `(A, 2A, 3)` float32 (layout of `conditioning`)."""
        skin = np.zeros((size, 2 * size, 3), np.float32)
        hair = np.zeros_like(skin)
        for region, tile in (("face", 0), ("head_neck", 1)):
            pos, _ = _uv_surface(self.model, region, tile, size)
            flat = pos.reshape(-1, 3)
            skin[:, tile * size:(tile + 1) * size] = self._skin(flat).reshape(size, size, 3)
            hair[:, tile * size:(tile + 1) * size] = self._hair(flat).reshape(size, size, 3)
        return skin, hair

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """A static room-like background `(S, S, 3)` float32."""
        s = self.size
        yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
        wall = rng.uniform(0.25, 0.8, 3).astype(np.float32)
        tilt = rng.uniform(-0.25, 0.25, 2)
        bg = wall[None, None] * (1.0 + tilt[0] * (xx - 0.5) + tilt[1] * (yy - 0.5))[..., None]
        for _ in range(int(rng.integers(2, 5))):  # frames, shelves, windows
            x0, y0 = rng.uniform(-0.1, 0.9, 2)
            w, h = rng.uniform(0.1, 0.45, 2)
            inside = (xx >= x0) & (xx < x0 + w) & (yy >= y0) & (yy < y0 + h)
            bg[inside] = rng.uniform(0.1, 0.95, 3)
        blobs = ndimage.gaussian_filter(rng.standard_normal((s, s)), s / 24.0)
        bg = bg * (1.0 + 0.6 * blobs / (np.abs(blobs).max() + 1e-6))[..., None]
        bg = ndimage.gaussian_filter(bg, (max(s / 256.0, 0.5), max(s / 256.0, 0.5), 0))
        return np.clip(bg, 0.0, 1.0).astype(np.float32)

    # ---- meshes --------------------------------------------------------------------------
    def _build_meshes(self) -> None:
        m, dev = self.model, self.device
        tri_ids = m.region_triangles(*SYNTH_REGIONS)
        head_tris = m.triangles[tri_ids].astype(np.int64)
        names = [m.region_names[r] for r in m.triangle_region[tri_ids]]
        material = np.asarray([_REGION_MATERIAL[n] for n in names], np.int64)
        n_head = m.n_vertices
        # hair shell: scalp triangles of face and head_neck, pushed out along the normals
        skin_ids = m.region_triangles("face", "head_neck")
        mean_v = m.neutral
        weight = self._hair_weight(mean_v)
        scalp = skin_ids[(weight[m.triangles[skin_ids]] > 0.02).all(1)]
        shell_vids = np.unique(m.triangles[scalp])
        remap = np.full(n_head, -1, np.int64)
        remap[shell_vids] = np.arange(len(shell_vids)) + n_head
        shell_tris = remap[m.triangles[scalp]]
        own = m.vertices(self.identity, np.zeros(m.n_expressions, np.float32))
        normals = m.normals(own)[shell_vids]
        p = mean_v[shell_vids]
        top = _smoothstep(-4.0, -13.0, p[:, 1])
        volume = 1.0 + 0.25 * self._noise(p, 0.8)
        thick = self.look.hair_thickness_cm * (0.45 + 0.55 * top) * volume
        thick *= _smoothstep(0.02, 0.6, weight[shell_vids])
        self._shell_ids = torch.from_numpy(shell_vids).to(dev)
        self._shell_offset = torch.from_numpy((normals * thick[:, None]).astype(np.float32)).to(
            dev)
        # torso
        t_verts, t_tris, t_coords = _torso_mesh()
        n_shell = len(shell_vids)
        self._torso = torch.from_numpy(t_verts).to(dev)
        self._torso_coords = torch.from_numpy(t_coords).to(dev)
        torso_tris = t_tris + n_head + n_shell
        self._n_head, self._n_shell = n_head, n_shell
        tris = np.concatenate([head_tris, shell_tris, torso_tris])
        mats = np.concatenate([material, np.full(len(shell_tris), HAIR),
                               np.full(len(torso_tris), SHIRT)])
        # per triangle: the UV triangle (hair shell uses the scalp's UVs)
        uv_tri = np.concatenate([m.triangle_uvs[tri_ids], m.triangle_uvs[scalp],
                                 np.zeros((len(torso_tris), 3), np.int32)])
        uv = m.uvs[uv_tri].astype(np.float32)  # F,3,2
        # mean-face positions per vertex (torso: its own coordinates) for eyes and patterns
        mean_all = np.concatenate([mean_v, mean_v[shell_vids], t_verts]).astype(np.float32)
        self._tris = torch.from_numpy(tris).to(dev)
        self._mats = torch.from_numpy(mats).to(dev)
        self._uv = torch.from_numpy(uv.reshape(-1, 6)).to(dev)
        self._mean = torch.from_numpy(mean_all).to(dev)
        self._n_torso = len(t_verts)
        self._torso_first = n_head + n_shell
        tex = torch.from_numpy
        self._skin_tex = tex(self.skin_texture).permute(2, 0, 1)[None].contiguous().to(dev)
        self._hair_tex = tex(self.hair_texture).permute(2, 0, 1)[None].contiguous().to(dev)
        self._bg = tex(self.background).to(dev)
        self._centres = tex(m.eyeball_centres.astype(np.float32)).to(dev)

    # ---- motion --------------------------------------------------------------------------
    def motion(self, frames: int, fps: float = 25.0, still_seconds: float = 0.0,
               still_start: float | None = None) -> FaceParams:
        """Ground-truth parameters of `frames` frames at `fps` (seeded by the actor's seed).

        still_seconds > 0 holds head, face, eyes and light still for that long (the frames
        are identical; no blink), starting at `still_start` seconds (default: centred in
        the clip, moved to the next frame whose eyes are open); the motion resumes where
        it stopped. It must be shorter than the clip.
        """
        if frames <= 0:
            raise RendererError(f"frames must be positive, got {frames}")
        if not fps > 0:
            raise RendererError(f"fps must be positive, got {fps}")
        n_still = round(max(0.0, float(still_seconds)) * fps)
        if n_still >= frames:
            raise RendererError(f"the still segment ({still_seconds} s) must be shorter than "
                                f"the clip ({frames} frames at {fps} fps)")
        moving = self._moving(frames - n_still, fps)
        if n_still == 0:
            return moving
        if still_start is None:
            start = (frames - n_still) // 2
        else:
            start = round(float(still_start) * fps)
            if not 0 <= start < frames - n_still:
                raise RendererError(f"still_start {still_start} s is outside the clip's "
                                    f"moving part (0 .. {(frames - n_still - 1) / fps:.2f} s)")
        blink = moving.expression[:, [self.model.expression_index("eyeBlink_L"),
                                      self.model.expression_index("eyeBlink_R")]].max(1)
        open_eyes = np.nonzero(blink[start:] < 1e-3)[0]
        start += int(open_eyes[0]) if len(open_eyes) else 0
        index = np.concatenate([np.arange(start), np.full(n_still, start),
                                np.arange(start, frames - n_still)])
        held = moving.select(index)
        return FaceParams(
            identity=held.identity, expression=held.expression,
            expression_names=held.expression_names, rotation=held.rotation,
            translation=held.translation, sh=held.sh, gaze=held.gaze, focal=held.focal,
            principal_point=held.principal_point, image_size=held.image_size,
            valid=held.valid, timestamps=(np.arange(frames) / fps).astype(np.float32))

    def still_frames(self, frames: int, fps: float = 25.0, still_seconds: float = 0.0,
                     still_start: float | None = None) -> np.ndarray:
        """`(T,)` bool: the frames of `motion(...)`'s still segment (same arguments)."""
        p = self.motion(frames, fps, still_seconds, still_start)
        same = np.zeros(frames, bool)
        if frames > 1:
            keys = np.concatenate([p.rotation, p.translation, p.expression,
                                   p.gaze.reshape(frames, -1)], 1)
            eq = np.all(keys[1:] == keys[:-1], 1)
            same[1:] |= eq
            same[:-1] |= eq
        return same

    def _moving(self, frames: int, fps: float) -> FaceParams:
        """The actor's motion without a still segment."""
        m = self.model
        rng = np.random.default_rng([self.seed, 0x0707])
        t = np.arange(frames) / fps
        zoom = self.look.focal_per_size / FOCAL_PER_SIZE  # distance and drift scale along

        def wave(amplitude: float, lo: float = 0.08, hi: float = 0.4) -> np.ndarray:
            f = rng.uniform(lo, hi, 3)
            ph = rng.uniform(0, 2 * np.pi, 3)
            w = rng.uniform(0.5, 1.0, 3)
            return amplitude * (w[:, None] * np.sin(2 * np.pi * f[:, None] * t + ph[:, None])
                                ).sum(0) / w.sum()

        rotation = np.stack([wave(0.14), wave(0.30), wave(0.08)], 1)  # pitch, yaw, roll
        translation = zoom * np.stack([wave(1.5), HEAD_OFFSET_Y_CM + wave(1.0),
                                       DISTANCE_CM + wave(3.0, 0.05, 0.2)], 1)
        expr = np.zeros((frames, m.n_expressions), np.float32)

        def name(n: str) -> int:
            return m.expression_index(n)

        # talking: syllables at ~4 Hz inside speech bursts
        syll = np.clip(np.sin(2 * np.pi * (rng.uniform(3.0, 4.5) * t + rng.uniform())
                              + 0.8 * np.sin(2 * np.pi * 1.3 * t)), 0, None)
        bursts = _smoothstep(-0.3, 0.3, np.sin(2 * np.pi * rng.uniform(0.15, 0.3) * t
                                               + rng.uniform(0, 6.3)) + 0.35)
        loud = 0.55 + 0.45 * np.abs(wave(1.0, 0.5, 1.5))
        jaw = 0.55 * syll * bursts * loud
        expr[:, name("jawOpen")] = jaw
        shapes = {"mouthFunnel": 0.5, "mouthPucker": 0.5, "mouthStretch_L": 0.35,
                  "mouthStretch_R": 0.35, "mouthLowerDown_L": 0.5, "mouthLowerDown_R": 0.5,
                  "mouthUpperUp_L": 0.4, "mouthUpperUp_R": 0.4, "mouthClose": 0.15,
                  "mouthRollLower": 0.3}
        for n, a in shapes.items():
            expr[:, name(n)] = a * bursts * np.clip(wave(1.0, 0.6, 2.5), 0, None)
        smile = np.clip(wave(1.0, 0.05, 0.15) + 0.1, 0, None) * 0.7
        for n in ("mouthSmile_L", "mouthSmile_R", "cheekSquint_L", "cheekSquint_R"):
            expr[:, name(n)] = smile * (1.0 if "Smile" in n else 0.5)
        brow = np.clip(wave(1.0, 0.1, 0.3) - 0.2, 0, None) * 1.2
        for n in ("browInnerUp_L", "browInnerUp_R", "browOuterUp_L", "browOuterUp_R"):
            expr[:, name(n)] = brow
        # blinks: every 2-5 s, ~0.25 s long
        blink = np.zeros(frames)
        start = rng.uniform(0.3, 2.0)
        while start < t[-1] + 1.0:
            dur = rng.uniform(0.18, 0.3)
            phase = (t - start) / dur
            blink = np.maximum(blink, np.where((phase >= 0) & (phase <= 1),
                                               np.sin(np.pi * np.clip(phase, 0, 1)) ** 0.7, 0))
            start += rng.uniform(2.0, 5.0)
        expr[:, name("eyeBlink_L")] = blink
        expr[:, name("eyeBlink_R")] = blink
        # gaze: saccades between fixations held 0.4-2 s
        gaze = np.zeros((frames, 2, 2), np.float32)
        target = np.zeros(2)
        change = 0.0
        for k, tk in enumerate(t):
            if tk >= change:
                target = np.asarray([rng.uniform(-0.35, 0.35), rng.uniform(-0.2, 0.2)])
                change = tk + rng.uniform(0.4, 2.0)
            prev = gaze[k - 1, 0] if k else target
            gaze[k, 0] = gaze[k, 1] = prev + 0.6 * (target - prev)
        verge = 0.03
        gaze[:, 0, 0] -= verge
        gaze[:, 1, 0] += verge
        expr = np.clip(expr, 0.0, 1.0)
        expr[:, m.eyelook_indices] = gaze_to_eyelook(gaze)
        s = self.size
        return FaceParams(
            identity=self.identity, expression=expr.astype(np.float32),
            expression_names=np.asarray(m.expression_names),
            rotation=rotation.astype(np.float32), translation=translation.astype(np.float32),
            sh=self.sh(t),
            gaze=gaze.astype(np.float32),
            focal=np.asarray([self.look.focal_per_size * s], np.float32),
            principal_point=np.asarray([s / 2.0, s / 2.0], np.float32),
            image_size=np.asarray([s, s], np.int64), valid=np.ones(frames, bool),
            timestamps=t.astype(np.float32))

    # ---- rendering -----------------------------------------------------------------------
    def render(self, params: FaceParams, batch: int = 8) -> np.ndarray:
        """Frames `(T, S, S, 3)` uint8 RGB of `params` (S x S camera of this actor)."""
        out = np.zeros((params.frames, self.size, self.size, 3), np.uint8)
        for start in range(0, params.frames, batch):
            sel = np.arange(start, min(start + batch, params.frames))
            out[sel] = self._render_batch(params, sel)
        return out

    def _render_batch(self, params: FaceParams, sel: np.ndarray) -> np.ndarray:
        m, dev = self.model, self.device
        ss = self.supersample
        big = self.size * ss
        h, w = (int(x) for x in params.image_size)
        k = big / max(h, w)
        f = float(params.focal[0]) * k
        cx = float(params.principal_point[0]) * k + (big - k * w) / 2.0
        cy = float(params.principal_point[1]) * k + (big - k * h) / 2.0

        def tt(x: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(np.ascontiguousarray(x, np.float32), device=dev)

        ident = tt(params.identity)
        b = len(sel)
        head = m.vertices(ident.expand(b, -1), tt(params.expression[sel]),
                          tt(params.gaze[sel]))  # B,V,3
        shell = head.index_select(1, self._shell_ids) + self._shell_offset
        rotvec = tt(params.rotation[sel])
        rot = axis_angle_to_matrix(rotvec)
        trans = tt(params.translation[sel])
        rot_t = axis_angle_to_matrix(0.3 * rotvec)
        pivot = torch.tensor([0.0, 12.0, 0.0], device=dev)
        trans_t = (rot @ pivot) + trans - (rot_t @ pivot)
        x_head = torch.cat([head, shell], 1) @ rot.transpose(-1, -2) + trans[:, None]
        x_torso = self._torso @ rot_t.transpose(-1, -2) + trans_t[:, None]
        x = torch.cat([x_head, x_torso], 1)  # B,V,3 camera
        z = x[..., 2]
        screen = torch.stack([f * x[..., 0] / z + cx, f * x[..., 1] / z + cy, z], -1)
        r = rasterize_reference(screen.contiguous(), self._tris, big, big)
        normals = vertex_normals(x, self._tris)
        img = self._bg.repeat_interleave(ss, 0).repeat_interleave(ss, 1)[None].repeat(
            b, 1, 1, 1).reshape(-1, 3).clone()
        flat = r.triangle.reshape(-1)
        pix = torch.nonzero(flat >= 0).squeeze(1)
        if pix.numel():
            img[pix] = self._shade(pix, flat, r, x, normals, params, sel, f, cx, cy, big)
        img = img.reshape(b, self.size, ss, self.size, ss, 3).mean((2, 4))
        return (img.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()

    def _key_light(self, sh: np.ndarray) -> torch.Tensor:
        """`(B, 3)` unit key-light directions of frames' SH `(B, 9, 3)`: the direction of
        their band-1 coefficients (a directional light's L_1m = I Y_1m(d)); the look's own
        direction where the lighting has no band 1."""
        band1 = torch.as_tensor(np.asarray(sh, np.float32)[:, [3, 1, 2], :].mean(-1),
                                device=self.device)
        norm = band1.norm(dim=-1, keepdim=True)
        own = torch.as_tensor(self.look.light_direction, device=self.device)
        own = (own / own.norm())[None].expand_as(band1)
        return torch.where(norm > 1e-6, band1 / norm.clamp_min(1e-12), own)

    def _shade(self, pix: torch.Tensor, flat: torch.Tensor, r, x, normals, params, sel,  # type: ignore[no-untyped-def]
               f: float, cx: float, cy: float, big: int) -> torch.Tensor:
        dev = self.device
        plane = big * big
        frame = pix // plane
        rem = pix - frame * plane
        py = (rem // big).float() + 0.5
        px = (rem % big).float() + 0.5
        tri = flat.index_select(0, pix).long()
        bary = r.bary.reshape(-1, 3).index_select(0, pix)
        depth = r.depth.reshape(-1).index_select(0, pix)
        vids = self._tris.index_select(0, tri)
        nv = x.shape[1]
        gv = vids + (frame * nv)[:, None]
        b0, b1, b2 = bary[:, 0:1], bary[:, 1:2], bary[:, 2:3]
        n = interpolate(normals.reshape(-1, 3), gv, bary)
        n = n / n.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        mean = interpolate(self._mean, vids, bary)
        uvc = self._uv.index_select(0, tri)
        uv = uvc[:, 0:2] * b0 + uvc[:, 2:4] * b1 + uvc[:, 4:6] * b2
        mat = self._mats.index_select(0, tri)
        # view vector and key light
        p = torch.stack([(px - cx) / f, (py - cy) / f, torch.ones_like(px)], -1) * depth[:, None]
        view = -p / p.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        light = self._key_light(params.sh[sel])[frame]  # N,3
        half = view + light
        half = half / half.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        n_dot_h = (n * half).sum(-1).clamp_min(0.0)
        # diffuse: the ground-truth SH (ambient + key light)
        sh = torch.as_tensor(params.sh[sel], device=dev)  # B,9,3
        basis = irradiance_basis(n)
        counts = torch.bincount(frame, minlength=sh.shape[0]).tolist()
        irr = torch.cat([chunk @ sh[k] for k, chunk in enumerate(torch.split(basis, counts))]
                        ).clamp_min(0.0)
        # albedo by material
        from renderer.conditioning import sample_texture
        albedo = torch.zeros_like(n)
        spec_k = torch.zeros_like(depth)
        shine = torch.full_like(depth, 16.0)
        occl = torch.ones_like(depth)
        is_skin = mat == SKIN
        is_hair = mat == HAIR
        if bool(is_skin.any()):
            idx = torch.nonzero(is_skin).squeeze(1)
            albedo[idx] = sample_texture(self._skin_tex, uv[idx])
            tzone = torch.exp(-(mean[idx, 0] ** 2) / 6.0) * (mean[idx, 2] < -8.5).float()
            spec_k[idx] = 0.08 + 0.12 * tzone
            shine[idx] = 24.0
        if bool(is_hair.any()):
            idx = torch.nonzero(is_hair).squeeze(1)
            albedo[idx] = sample_texture(self._hair_tex, uv[idx])
            spec_k[idx] = 0.12
            shine[idx] = 12.0
        # the shirt: the torso, and ICT's chest below a crew neckline
        neckline = 13.5 + 0.02 * mean[:, 0] ** 2
        shirt = (mat == SHIRT) | (is_skin & (mean[:, 1] > neckline))
        if bool(shirt.any()):
            idx = torch.nonzero(shirt).squeeze(1)
            yy = mean[idx, 1]
            col = torch.as_tensor(self.look.shirt, device=dev)[None].repeat(len(idx), 1)
            if self.look.shirt_stripes:
                stripes = (torch.sin(yy * 2.2) > 0.3).float()[:, None]
                col = col * (1.0 - 0.35 * stripes)
            collar = (yy < neckline[idx] + 1.0).float()[:, None]
            col = col * (1.0 - 0.3 * collar)
            albedo[idx] = col
            spec_k[idx] = 0.03
        eye = mat == EYE
        if bool(eye.any()):
            idx = torch.nonzero(eye).squeeze(1)
            q = mean[idx]
            centre = torch.where((q[:, 0] < 0)[:, None], self._centres[1], self._centres[0])
            d = q - centre
            dn = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-9)
            ang = torch.rad2deg(torch.arccos((-dn[:, 2]).clamp(-1, 1)))
            phi = torch.atan2(dn[:, 1], dn[:, 0])
            streak = torch.as_tensor(self._iris_noise, device=dev)[
                ((phi + math.pi) / (2 * math.pi) * 64).long().clamp(0, 63)]
            iris = torch.as_tensor(self.look.iris, device=dev)[None] * (
                0.7 + 0.5 * streak[:, None]) * (1.0 - 0.5 * ((ang > 22) & (ang < 28)).float()
                                               [:, None])
            sclera = torch.tensor([0.9, 0.86, 0.84], device=dev)[None] * (
                1.0 - 0.12 * (ang / 90.0).clamp(0, 1))[:, None]
            pupil = torch.full_like(iris, 0.02)
            col = torch.where((ang < 10.0)[:, None], pupil,
                              torch.where((ang < 28.0)[:, None], iris, sclera))
            albedo[idx] = col
            spec_k[idx] = 0.9
            shine[idx] = 250.0
        for material, colour, k_s, occ in ((TEETH, (0.92, 0.9, 0.82), 0.3, 0.75),
                                           (GUMS, (0.75, 0.35, 0.38), 0.2, 0.45),
                                           (MOUTH, (0.5, 0.2, 0.2), 0.05, 0.3),
                                           (LACRIMAL, (0.85, 0.5, 0.5), 0.4, 0.9)):
            sel_m = mat == material
            if bool(sel_m.any()):
                idx = torch.nonzero(sel_m).squeeze(1)
                albedo[idx] = torch.tensor(colour, device=dev)
                spec_k[idx] = k_s
                occl[idx] = occ
        spec = spec_k * n_dot_h.pow(shine) * self.look.light_intensity * 2.0
        return (albedo * irr * occl[:, None] + spec[:, None]).clamp(0.0, 1.0)


def synthesize(model: FaceModel, frames: int = 100, size: int = 256, seed: int = 0,
               fps: float = 25.0, device: torch.device | str = "cpu",
               supersample: int | None = None, texture_size: int = 512
               ) -> tuple[np.ndarray, FaceParams]:
    """Frames `(T, S, S, 3)` uint8 RGB of a seeded synthetic actor and their ground truth."""
    actor = SynthActor(model, seed=seed, size=size, supersample=supersample, device=device,
                       texture_size=texture_size)
    params = actor.motion(frames, fps)
    return actor.render(params), params


def head_rotation_matrices(params: FaceParams) -> np.ndarray:
    """`(T, 3, 3)` rotation matrices of params (for evaluation helpers)."""
    return axis_angle_to_matrix_np(params.rotation)


__all__ = ["Look", "SynthActor", "head_rotation_matrices", "synthesize"]
