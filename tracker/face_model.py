"""The ICT-FaceKit morphable face model, in DESIGN.md's camera-ready frame.

Frame: OpenCV axes with the face upright, looking along -z (into a camera at the origin
looking along +z); x toward the subject's left (the image's right), y down; units cm.
ICT's own files have y up and z toward the viewer: loading rotates them 180 degrees about x.

`FaceModel` holds numpy arrays (V = 26719 vertices, F triangles); `vertices()` and
`normals()` accept numpy arrays or torch tensors (CPU or CUDA, batched) and answer in kind.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, overload

import numpy as np
import torch

from tracker.errors import DvpError
from tracker.geometry import closest_points_on_mesh, umeyama, vertex_normals

N_IDENTITY = 100
N_LANDMARKS = 478
#: Format of the cached arrays. 2: the landmark map keeps inner-lip points on their own lip
#: and takes the 468 mesh points from the measured map (`LEARNED_MAP`) where it has them.
#: 3: that map measured with MediaPipe in streaming mode (as the product tracks).
MODEL_FORMAT = 3
#: The measured landmark map (see `renderer.landmark_map`): where MediaPipe puts each mesh
#: point on rendered faces of the model, as (triangle, barycentrics) rows.
LEARNED_MAP = Path(__file__).resolve().parent / "data" / "mediapipe_landmark_map.txt"
#: MediaPipe's inner-lip points between the corners (upper lip, lower lip); their map is
#: restricted to their own lip's triangles (the model's lips touch at rest).
INNER_LIP_UPPER_POINTS = (191, 80, 81, 82, 13, 312, 311, 310, 415)
INNER_LIP_LOWER_POINTS = (95, 88, 178, 87, 14, 317, 402, 318, 324)
#: ICT's Multi-PIE-68 landmark of the lower lip's inner centre.
_LOWER_LIP_68 = 66

#: ICT geometries: name -> (first vertex, last vertex + 1, first polygon, last polygon + 1),
#: from the README of ICT-FaceKit. "left"/"right" are the subject's sides.
REGIONS: dict[str, tuple[int, int, int, int]] = {
    "face": (0, 9409, 0, 9230),
    "head_neck": (9409, 11248, 9230, 11144),
    "mouth_socket": (11248, 13294, 11144, 13226),
    "eye_socket_left": (13294, 13678, 13226, 13630),
    "eye_socket_right": (13678, 14062, 13630, 14034),
    "gums_tongue": (14062, 17039, 14034, 17006),
    "teeth": (17039, 21451, 17006, 21496),
    "eyeball_left": (21451, 23021, 21496, 23094),
    "eyeball_right": (23021, 24591, 23094, 24692),
    "lacrimal_left": (24591, 24795, 24692, 24855),
    "lacrimal_right": (24795, 24999, 24855, 25018),
    "eye_blend_left": (24999, 25023, 25018, 25033),
    "eye_blend_right": (25023, 25047, 25033, 25048),
    "eye_occlusion_left": (25047, 25199, 25048, 25176),
    "eye_occlusion_right": (25199, 25351, 25176, 25304),
    "eyelashes_left": (25351, 26035, 25304, 25844),
    "eyelashes_right": (26035, 26719, 25844, 26384),
}
#: Sub-parts of the eyeballs (vertex ranges): scleras and irises.
EYE_PARTS: dict[str, tuple[int, int]] = {
    "sclera_left": (21451, 22221),
    "iris_left": (22221, 23021),
    "sclera_right": (23021, 23791),
    "iris_right": (23791, 24591),
}
#: The narrow face area (vertices [0, 6706)): cheeks, brows, nose, mouth, chin.
NARROW_FACE = 6706

#: The eight gaze-driven coefficients, in the order `gaze_to_eyelook` returns them.
EYELOOK_NAMES = (
    "eyeLookDown_L", "eyeLookDown_R", "eyeLookIn_L", "eyeLookIn_R",
    "eyeLookOut_L", "eyeLookOut_R", "eyeLookUp_L", "eyeLookUp_R",
)
#: Eye rotation (radians) at which an eyeLook coefficient reaches 1: horizontal, vertical.
EYELOOK_MAX_YAW = np.deg2rad(30.0)
EYELOOK_MAX_PITCH = np.deg2rad(25.0)

#: MediaPipe landmark ids and ICT's Multi-PIE-68 landmark positions that seed the alignment:
#: right eye outer corner, left eye outer corner, nose tip, mouth corners, chin.
_ANCHORS_MP = [33, 263, 1, 61, 291, 152]
_ANCHORS_68 = [36, 45, 30, 48, 54, 8]
#: MediaPipe iris landmarks: 468-472 the subject's right iris, 473-477 the left.
IRIS_RIGHT = list(range(468, 473))
IRIS_LEFT = list(range(473, 478))


class FaceModelError(DvpError):
    """The face-model cache is missing, stale or damaged."""


def parse_obj(text: str) -> tuple[np.ndarray, list[list[int]], np.ndarray, list[list[int]]]:
    """Vertices (V, 3), polygons (vertex ids, 0-based), UVs (N, 2), polygons' UV ids."""
    verts: list[list[str]] = []
    uvs: list[list[str]] = []
    polys: list[list[int]] = []
    poly_uvs: list[list[int]] = []
    for line in text.splitlines():
        if line.startswith("v "):
            verts.append(line.split()[1:4])
        elif line.startswith("vt "):
            uvs.append(line.split()[1:3])
        elif line.startswith("f "):
            corners = [c.split("/") for c in line.split()[1:]]
            polys.append([int(c[0]) - 1 for c in corners])
            poly_uvs.append([int(c[1]) - 1 if len(c) > 1 and c[1] else -1 for c in corners])
    return (np.asarray(verts, np.float32).reshape(-1, 3), polys,
            np.asarray(uvs, np.float32).reshape(-1, 2), poly_uvs)


def parse_obj_vertices(text: str) -> np.ndarray:
    """Only the vertices (V, 3) of an OBJ file (fast path for blendshape files)."""
    rows = " ".join(line[2:] for line in text.splitlines() if line.startswith("v "))
    return np.asarray(rows.split(), np.float32).reshape(-1, 3)


def _to_camera_frame(x: np.ndarray) -> np.ndarray:
    """ICT / MediaPipe model frame (y up, z toward the viewer) -> DESIGN frame (y down,
    face toward -z): a 180-degree rotation about x."""
    return (x * np.asarray([1.0, -1.0, -1.0], np.float32)).astype(np.float32)


def _split_polygons(polys: list[list[int]], poly_uvs: list[list[int]]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fan-split polygons into triangles: (F, 3) vertex ids, (F, 3) UV ids, (F,) polygon id."""
    tris, tri_uvs, owner = [], [], []
    for p, (poly, puv) in enumerate(zip(polys, poly_uvs)):
        for k in range(1, len(poly) - 1):
            tris.append([poly[0], poly[k], poly[k + 1]])
            tri_uvs.append([puv[0], puv[k], puv[k + 1]])
            owner.append(p)
    return (np.asarray(tris, np.int32), np.asarray(tri_uvs, np.int32),
            np.asarray(owner, np.int32))


def build_model_arrays(
    read_ict: Any, read_mediapipe: Any
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Build the compact model from the source files.

    read_ict(name) -> bytes reads `FaceXModel/<name>`; read_mediapipe(name) -> bytes reads a
    face-geometry OBJ. Returns (arrays for `face_model.npz`, landmark-fit figures in mm).
    """
    meta = json.loads(read_ict("vertex_indices.json"))
    names: list[str] = list(meta["expressions"])
    neutral_raw, polys, uvs, poly_uvs = parse_obj(read_ict("generic_neutral_mesh.obj").decode())
    neutral = _to_camera_frame(neutral_raw)

    def delta(name: str) -> np.ndarray:
        shape = parse_obj_vertices(read_ict(name).decode())
        if shape.shape != neutral_raw.shape:
            raise FaceModelError(f"FaceXModel/{name}: {len(shape)} vertices, expected "
                                 f"{len(neutral_raw)}")
        return _to_camera_frame(shape - neutral_raw)

    identity = np.stack([delta(f"identity{i:03d}.obj") for i in range(N_IDENTITY)])
    expression = np.stack([delta(f"{n}.obj") for n in names])
    triangles, triangle_uvs, owner = _split_polygons(polys, poly_uvs)
    region_names = list(REGIONS)
    triangle_region = np.full(len(triangles), -1, np.int32)
    for r, (_, _, p0, p1) in enumerate(REGIONS.values()):
        triangle_region[(owner >= p0) & (owner < p1)] = r
    mp_raw, _, _, _ = parse_obj(read_mediapipe("face_model_with_iris.obj").decode())
    landmark_68 = np.asarray(meta["idx_to_landmark_verts"], np.int64)
    lips = lip_triangles(neutral, expression[names.index("jawOpen")], triangles,
                         triangle_region, region_names, landmark_68)
    lm_tri, lm_bary, figures = _landmark_map(
        neutral, triangles, triangle_region, region_names, _to_camera_frame(mp_raw), landmark_68,
        lips)
    learned = read_learned_map(LEARNED_MAP, len(triangles))
    if learned is not None:
        ids, l_tri, l_bary = learned
        lm_tri[ids], lm_bary[ids] = l_tri, l_bary
        figures["learned_landmarks"] = float(len(ids))
    arrays = {
        "format": np.asarray(MODEL_FORMAT),
        "expression_names": np.asarray(names),
        "region_names": np.asarray(region_names),
        "neutral": neutral,
        "identity_basis": identity.astype(np.float32),
        "expression_basis": expression.astype(np.float32),
        "triangles": triangles,
        "triangle_uvs": triangle_uvs,
        "triangle_region": triangle_region,
        "uvs": uvs,
        "landmark_68": landmark_68,
        "landmark_triangles": lm_tri.astype(np.int32),
        "landmark_barycentrics": lm_bary.astype(np.float32),
        "eyeball_centres": _eyeball_centres(neutral),
    }
    return arrays, figures


def _sphere_centre(points: np.ndarray) -> np.ndarray:
    """Least-squares sphere centre of points (N, 3)."""
    a = np.concatenate([2.0 * points, np.ones((len(points), 1))], 1)
    b = (points ** 2).sum(1)
    sol, *_ = np.linalg.lstsq(a.astype(np.float64), b.astype(np.float64), rcond=None)
    return sol[:3]


def _eyeball_centres(neutral: np.ndarray) -> np.ndarray:
    """Centres (2, 3) of the left and right eyeballs: spheres fitted to the scleras."""
    return np.stack([_sphere_centre(neutral[slice(*EYE_PARTS[f"sclera_{side}"])])
                     for side in ("left", "right")]).astype(np.float32)


def lip_triangles(neutral: np.ndarray, jaw_open: np.ndarray, triangles: np.ndarray,
                  triangle_region: np.ndarray, region_names: list[str],
                  landmark_68: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(upper, lower) face-region triangle ids: `lower` those that follow the jaw (the mean
    jawOpen displacement of their vertices is at least half that of the lower lip's inner
    centre): lower lip, chin, jaw; `upper` the other face triangles (upper lip and above).

    jaw_open: the jawOpen blendshape's displacement (V, 3), cm per unit.
    """
    face = np.nonzero(triangle_region == region_names.index("face"))[0]
    moves = np.linalg.norm(jaw_open, axis=1)
    ref = moves[landmark_68[_LOWER_LIP_68]]
    lower = moves[triangles[face]].mean(1) >= 0.5 * ref
    return face[~lower], face[lower]


def read_learned_map(path: Path, n_triangles: int
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The measured map's rows: (landmark ids (N,), triangle ids (N,), barycentrics (N, 3)),
    or None when the file is absent. Lines: `landmark triangle b0 b1 b2 [samples]`, `#`
    comments. A malformed file is a FaceModelError naming the line."""
    if not path.is_file():
        return None
    ids, tris, bary = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.split()
        try:
            lm, tri = int(parts[0]), int(parts[1])
            b = [float(x) for x in parts[2:5]]
        except (ValueError, IndexError):
            raise FaceModelError(f"{path}:{number}: expected 'landmark triangle b0 b1 b2', "
                                 f"got '{text}'") from None
        if not 0 <= lm < N_LANDMARKS or not 0 <= tri < n_triangles or len(b) != 3 \
                or abs(sum(b) - 1.0) > 1e-3 or min(b) < -1e-6:
            raise FaceModelError(f"{path}:{number}: landmark, triangle or barycentrics out "
                                 f"of range: '{text}'")
        ids.append(lm)
        tris.append(tri)
        bary.append(b)
    return (np.asarray(ids, np.int64), np.asarray(tris, np.int64),
            np.asarray(bary, np.float64).reshape(-1, 3))


def _landmark_map(
    neutral: np.ndarray, triangles: np.ndarray, triangle_region: np.ndarray,
    region_names: list[str], mediapipe: np.ndarray, landmark_68: np.ndarray,
    lips: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Place MediaPipe's 478 canonical points on the ICT surface.

    A similarity transform from six anchor points, refined by iterated closest points on
    the face region (trimmed: the worst 10 % are left out of each refit). The 468 mesh points
    land on the face surface, the 10 iris points on their eyeball's iris. With `lips`
    (`lip_triangles`), the inner-lip points between the corners are placed on their own
    lip only (the model's lips touch at rest: a plain closest point can put a lower-lip
    point on the upper lip, where it would not follow the jaw).
    """
    face_tris = triangles[triangle_region == region_names.index("face")]
    s, rot, t = umeyama(mediapipe[_ANCHORS_MP].astype(np.float64),
                        neutral[landmark_68[_ANCHORS_68]].astype(np.float64))
    mesh = mediapipe[:468].astype(np.float64)
    for _ in range(8):
        moved = s * mesh @ rot.T + t
        tri, bary, dist = closest_points_on_mesh(moved, neutral, face_tris, candidates=6)
        target = (bary[:, :, None] * neutral[face_tris[tri]]).sum(1)
        keep = dist <= np.quantile(dist, 0.9)
        s, rot, t = umeyama(mesh[keep], target[keep])
    moved = s * mesh @ rot.T + t
    tri, bary, dist = closest_points_on_mesh(moved, neutral, face_tris, candidates=12)
    tri_ids = np.nonzero(triangle_region == region_names.index("face"))[0][tri]
    out_tri = np.zeros(N_LANDMARKS, np.int64)
    out_bary = np.zeros((N_LANDMARKS, 3))
    out_tri[:468], out_bary[:468] = tri_ids, bary
    if lips is not None:
        for ids, own in ((INNER_LIP_UPPER_POINTS, lips[0]), (INNER_LIP_LOWER_POINTS, lips[1])):
            ltri, lbary, _ = closest_points_on_mesh(moved[list(ids)], neutral, triangles[own],
                                                    candidates=12)
            out_tri[list(ids)], out_bary[list(ids)] = own[ltri], lbary
    iris_dist = []
    for ids, side in ((IRIS_RIGHT, "right"), (IRIS_LEFT, "left")):
        region = region_names.index(f"eyeball_{side}")
        lo, hi = EYE_PARTS[f"iris_{side}"]
        eye_tris = np.nonzero((triangle_region == region)
                              & np.all((triangles >= lo) & (triangles < hi), 1))[0]
        pts = s * mediapipe[ids].astype(np.float64) @ rot.T + t
        # MediaPipe's canonical irises sit in front of ICT's: move them onto the iris along z
        pts[:, 2] += neutral[lo:hi, 2].min() - pts[:, 2].mean()
        etri, ebary, edist = closest_points_on_mesh(pts, neutral, triangles[eye_tris], 12)
        out_tri[ids], out_bary[ids] = eye_tris[etri], ebary
        iris_dist.append(edist)
    figures = {
        "landmark_fit_median_mm": float(np.median(dist) * 10.0),
        "landmark_fit_mean_mm": float(np.mean(dist) * 10.0),
        "landmark_fit_p90_mm": float(np.quantile(dist, 0.9) * 10.0),
        "landmark_fit_scale": float(s),
    }
    return out_tri, out_bary, figures


@dataclass
class FaceModel:
    """The loaded face model (numpy, CPU); torch copies are made per device on first use.

    neutral (V, 3) cm; identity_basis (100, V, 3); expression_basis (53, V, 3) per unit
    coefficient; triangles (F, 3) int32, wound counter-clockwise seen from outside in ICT's
    frame (the outward normal is cross(b - a, c - a)); uvs (U, 2) and triangle_uvs (F, 3);
    triangle_region (F,) index into region_names; landmark_triangles (478,) and
    landmark_barycentrics (478, 3): MediaPipe's points on the surface; eyeball_centres
    (2, 3) of the neutral (0 = the subject's left eye).
    """

    expression_names: list[str]
    region_names: list[str]
    neutral: np.ndarray
    identity_basis: np.ndarray
    expression_basis: np.ndarray
    triangles: np.ndarray
    triangle_uvs: np.ndarray
    triangle_region: np.ndarray
    uvs: np.ndarray
    landmark_68: np.ndarray
    landmark_triangles: np.ndarray
    landmark_barycentrics: np.ndarray
    eyeball_centres: np.ndarray
    _torch: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str | Path) -> FaceModel:
        """Load `face_model.npz` from the cache (see tracker.assets.load_face_model)."""
        path = Path(path)
        if not path.is_file():
            raise FaceModelError(f"{path}: face model not installed; run 'dvp assets install'")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise FaceModelError(f"{path}: damaged face-model cache ({err}); "
                                 "remove it and run 'dvp assets install'") from err
        if int(arrays.get("format", -1)) != MODEL_FORMAT:
            raise FaceModelError(f"{path}: face-model cache of another format; "
                                 "remove it and run 'dvp assets install'")
        arrays.pop("format")
        arrays["expression_names"] = [str(n) for n in arrays["expression_names"]]
        arrays["region_names"] = [str(n) for n in arrays["region_names"]]
        return cls(**arrays)

    # ---- sizes and indices -------------------------------------------------------------
    @property
    def n_vertices(self) -> int:
        return int(self.neutral.shape[0])

    @property
    def n_expressions(self) -> int:
        return len(self.expression_names)

    def expression_index(self, name: str) -> int:
        """Position of expression `name` (ICT spelling, e.g. 'jawOpen')."""
        try:
            return self.expression_names.index(name)
        except ValueError:
            raise KeyError(f"unknown expression '{name}'") from None

    @property
    def eyelook_indices(self) -> np.ndarray:
        """Positions (8,) of the eyeLook coefficients, in EYELOOK_NAMES order."""
        return np.asarray([self.expression_index(n) for n in EYELOOK_NAMES])

    def region_vertices(self, *names: str) -> np.ndarray:
        """Vertex ids of the named regions (REGIONS or EYE_PARTS keys, or 'narrow_face')."""
        ids = []
        for name in names:
            if name == "narrow_face":
                ids.append(np.arange(NARROW_FACE))
            elif name in EYE_PARTS:
                ids.append(np.arange(*EYE_PARTS[name]))
            elif name in REGIONS:
                ids.append(np.arange(*REGIONS[name][:2]))
            else:
                raise KeyError(f"unknown region '{name}'")
        return np.concatenate(ids)

    def region_triangles(self, *names: str) -> np.ndarray:
        """Triangle ids of the named REGIONS."""
        wanted = [self.region_names.index(n) for n in names]
        return np.nonzero(np.isin(self.triangle_region, wanted))[0]

    @property
    def landmark_vertex_ids(self) -> np.ndarray:
        """Vertex ids (478, 3) of the triangle under each landmark."""
        return self.triangles[self.landmark_triangles]

    # ---- geometry ----------------------------------------------------------------------
    def _tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        key = str(device)
        if key not in self._torch:
            self._torch[key] = {
                "neutral": torch.from_numpy(self.neutral).to(device),
                "identity_basis": torch.from_numpy(self.identity_basis).to(device),
                "expression_basis": torch.from_numpy(self.expression_basis).to(device),
                "eyeball_centres": torch.from_numpy(self.eyeball_centres).to(device),
                "triangles": torch.from_numpy(self.triangles.astype(np.int64)).to(device),
            }
        return self._torch[key]

    @overload
    def vertices(self, identity: np.ndarray, expression: np.ndarray,
                 gaze: np.ndarray | None = None, vertex_ids: np.ndarray | None = None
                 ) -> np.ndarray: ...

    @overload
    def vertices(self, identity: torch.Tensor, expression: torch.Tensor,
                 gaze: torch.Tensor | None = None, vertex_ids: np.ndarray | None = None
                 ) -> torch.Tensor: ...

    def vertices(self, identity, expression, gaze=None, vertex_ids=None):  # type: ignore[no-untyped-def]
        """Model-frame vertices [..., V', 3] (cm) of identity [..., 100] and expression
        [..., 53]; with gaze [..., 2, 2] (yaw, pitch per eye) the eyeballs rotate about their
        centres. `vertex_ids` restricts the output (and the work) to those vertices.

        numpy in, numpy out; torch in, torch out on the input's device.
        """
        if isinstance(identity, torch.Tensor):
            t = self._tensors(identity.device)
            neutral, ib, eb = t["neutral"], t["identity_basis"], t["expression_basis"]
            if vertex_ids is not None:
                idx = torch.as_tensor(vertex_ids, device=identity.device, dtype=torch.long)
                neutral, ib, eb = neutral[idx], ib[:, idx], eb[:, idx]
            ident = identity.to(neutral.dtype)
            expr = expression.to(neutral.dtype)
            v = (neutral + torch.einsum("...k,kvc->...vc", ident, ib)
                 + torch.einsum("...k,kvc->...vc", expr, eb))
        else:
            neutral, ib, eb = self.neutral, self.identity_basis, self.expression_basis
            if vertex_ids is not None:
                neutral, ib, eb = neutral[vertex_ids], ib[:, vertex_ids], eb[:, vertex_ids]
            ident = np.asarray(identity, np.float32)
            expr = np.asarray(expression, np.float32)
            v = (neutral + np.einsum("...k,kvc->...vc", ident, ib, optimize=True)
                 + np.einsum("...k,kvc->...vc", expr, eb, optimize=True)).astype(np.float32)
        if gaze is not None:
            v = self._rotate_eyes(v, identity, gaze, vertex_ids)
        return v

    def eye_centres(self, identity: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Eyeball centres [..., 2, 3] (cm) for identity [..., 100] (0 = subject's left)."""
        ids = [np.arange(*EYE_PARTS["sclera_left"]), np.arange(*EYE_PARTS["sclera_right"])]
        if isinstance(identity, torch.Tensor):
            t = self._tensors(identity.device)
            shifts = [torch.einsum("...k,kvc->...c", identity.to(t["neutral"].dtype),
                                   t["identity_basis"][:, torch.as_tensor(i, device=identity.device)])
                      / len(i) for i in ids]
            return t["eyeball_centres"] + torch.stack(shifts, -2)
        shifts_np = [np.einsum("...k,kvc->...c", np.asarray(identity, np.float32),
                               self.identity_basis[:, i]) / len(i) for i in ids]
        return (self.eyeball_centres + np.stack(shifts_np, -2)).astype(np.float32)

    def _rotate_eyes(self, v, identity, gaze, vertex_ids):  # type: ignore[no-untyped-def]
        """Rotate each eyeball's vertices in v [..., V', 3] about its centre by gaze."""
        is_torch = isinstance(v, torch.Tensor)
        centres = self.eye_centres(identity)
        rot = gaze_rotation(gaze)  # ...,2,3,3
        all_ids = np.arange(self.n_vertices) if vertex_ids is None else np.asarray(vertex_ids)
        for eye, side in enumerate(("left", "right")):
            lo, hi = REGIONS[f"eyeball_{side}"][:2]
            sel = np.nonzero((all_ids >= lo) & (all_ids < hi))[0]
            if len(sel) == 0:
                continue
            c = centres[..., eye, None, :]
            r = rot[..., eye, :, :]
            if is_torch:
                s = torch.as_tensor(sel, device=v.device)
                v = v.clone() if eye == 0 else v
                v[..., s, :] = (v[..., s, :] - c) @ r.transpose(-1, -2) + c
            else:
                v = v.copy() if eye == 0 else v
                v[..., sel, :] = (v[..., sel, :] - c) @ np.swapaxes(r, -1, -2) + c
        return v

    def normals(self, vertices: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Unit vertex normals [..., V, 3], area-weighted over the incident triangles."""
        if isinstance(vertices, torch.Tensor):
            return vertex_normals(vertices, self._tensors(vertices.device)["triangles"])
        tri = self.triangles
        a, b, c = (vertices[..., tri[:, k], :] for k in range(3))
        fn = np.cross(b - a, c - a)
        n = np.zeros_like(vertices)
        for k in range(3):
            np.add.at(n, (..., tri[:, k], slice(None)), fn)
        return (n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)).astype(
            np.float32)

    def landmarks(self, vertices: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """MediaPipe's 478 points [..., 478, 3] on the surface given full vertices [..., V, 3]."""
        ids = self.landmark_vertex_ids
        if isinstance(vertices, torch.Tensor):
            idx = torch.as_tensor(ids, device=vertices.device, dtype=torch.long)
            bary = torch.as_tensor(self.landmark_barycentrics, device=vertices.device,
                                   dtype=vertices.dtype)
            return (vertices[..., idx, :] * bary[..., None]).sum(-2)
        return (vertices[..., ids, :] * self.landmark_barycentrics[..., None]).sum(-2)


def gaze_rotation(gaze: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Eye rotations [..., 2, 3, 3] for gaze [..., 2, 2] (yaw, pitch radians).

    At zero the eye looks along -z (at the camera). Yaw > 0 turns it toward the subject's
    left (+x), pitch > 0 up (-y): R = Ry(-yaw) @ Rx(-pitch), so R @ (0, 0, -1) =
    (sin yaw cos pitch, -sin pitch, -cos yaw cos pitch).
    """
    if isinstance(gaze, torch.Tensor):
        cy, sy = torch.cos(-gaze[..., 0]), torch.sin(-gaze[..., 0])
        cp, sp = torch.cos(-gaze[..., 1]), torch.sin(-gaze[..., 1])
        one, zero = torch.ones_like(cy), torch.zeros_like(cy)
        ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1)
        rx = torch.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1)
        return ry.reshape(gaze.shape[:-1] + (3, 3)) @ rx.reshape(gaze.shape[:-1] + (3, 3))
    g = np.asarray(gaze, np.float32)
    cy, sy = np.cos(-g[..., 0]), np.sin(-g[..., 0])
    cp, sp = np.cos(-g[..., 1]), np.sin(-g[..., 1])
    one, zero = np.ones_like(cy), np.zeros_like(cy)
    ry = np.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1)
    rx = np.stack([one, zero, zero, zero, cp, -sp, zero, sp, cp], -1)
    return ry.reshape(g.shape[:-1] + (3, 3)) @ rx.reshape(g.shape[:-1] + (3, 3))


def gaze_to_eyelook(gaze: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """The fixed map from gaze [..., 2, 2] to the eight eyeLook coefficients [..., 8].

    Order EYELOOK_NAMES (Down_L, Down_R, In_L, In_R, Out_L, Out_R, Up_L, Up_R). For the left
    eye (0) yaw > 0 looks out, for the right eye (1) in; pitch > 0 looks up. A coefficient
    is |angle| / max angle clipped to [0, 1] (30 degrees horizontal, 25 vertical).
    """
    lib: Any = torch if isinstance(gaze, torch.Tensor) else np
    yaw_l = gaze[..., 0, 0] / EYELOOK_MAX_YAW
    yaw_r = gaze[..., 1, 0] / EYELOOK_MAX_YAW
    pit_l = gaze[..., 0, 1] / EYELOOK_MAX_PITCH
    pit_r = gaze[..., 1, 1] / EYELOOK_MAX_PITCH
    coeffs = [-pit_l, -pit_r, -yaw_l, yaw_r, yaw_l, -yaw_r, pit_l, pit_r]
    out = lib.stack(coeffs, -1)
    return out.clamp(0.0, 1.0) if lib is torch else np.clip(out, 0.0, 1.0).astype(np.float32)
