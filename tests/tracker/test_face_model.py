"""Face model: shapes, the camera-ready frame, blendshape linearity, landmark map, gaze."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tracker.face_model import EYELOOK_NAMES, FaceModel, gaze_rotation, gaze_to_eyelook


def test_shapes(face_model: FaceModel) -> None:
    m = face_model
    v = m.n_vertices
    assert m.neutral.shape == (v, 3)
    assert m.identity_basis.shape == (100, v, 3)
    assert m.expression_basis.shape == (53, v, 3)
    assert m.triangles.shape[1] == 3 and m.triangles.max() < v
    assert m.triangle_uvs.shape == m.triangles.shape and m.triangle_uvs.max() < len(m.uvs)
    assert (m.triangle_region >= 0).all()
    assert m.landmark_triangles.shape == (478,)
    np.testing.assert_allclose(m.landmark_barycentrics.sum(1), 1.0, atol=1e-5)
    assert m.expression_names[m.expression_index("jawOpen")] == "jawOpen"
    assert [m.expression_names[i] for i in m.eyelook_indices] == list(EYELOOK_NAMES)


def test_rotation_zero_looks_into_the_camera(face_model: FaceModel) -> None:
    m = face_model
    lm68 = m.neutral[m.landmark_68]
    nose, chin, brow = lm68[30], lm68[8], lm68[27]
    right_eye, left_eye = lm68[36], lm68[45]
    # nose is nearest the camera (smallest z), chin below (larger y), left eye at +x
    assert nose[2] < right_eye[2] - 2.0 and nose[2] < left_eye[2] - 2.0
    assert chin[1] > brow[1] + 5.0
    assert left_eye[0] > 3.0 and right_eye[0] < -3.0
    normals = m.normals(m.neutral)
    assert normals[m.landmark_68[30], 2] < -0.9  # nose-tip normal points at the camera
    assert m.eyeball_centres[0, 0] > 0 > m.eyeball_centres[1, 0]


def test_blendshapes_are_linear_and_torch_matches_numpy(face_model: FaceModel) -> None:
    m = face_model
    rng = np.random.default_rng(0)
    ident = rng.normal(size=(2, 100)).astype(np.float32)
    e1 = rng.uniform(size=(2, 53)).astype(np.float32)
    e2 = rng.uniform(size=(2, 53)).astype(np.float32)
    ids = np.arange(0, m.n_vertices, 97)
    v1 = m.vertices(ident, e1, vertex_ids=ids)
    v2 = m.vertices(ident, e2, vertex_ids=ids)
    v12 = m.vertices(ident, e1 + e2, vertex_ids=ids)
    v0 = m.vertices(ident, np.zeros_like(e1), vertex_ids=ids)
    np.testing.assert_allclose(v12 - v0, (v1 - v0) + (v2 - v0), atol=1e-4)
    vt = m.vertices(torch.from_numpy(ident), torch.from_numpy(e1), vertex_ids=ids)
    assert isinstance(vt, torch.Tensor) and vt.shape == (2, len(ids), 3)
    np.testing.assert_allclose(vt.numpy(), v1, atol=1e-4)
    full = m.vertices(ident[0], e1[0])
    np.testing.assert_allclose(full[ids], v1[0], atol=1e-5)


def test_landmark_map_lies_on_the_mean_face(face_model: FaceModel) -> None:
    m = face_model
    lm = m.landmarks(m.neutral)
    assert lm.shape == (478, 3)
    # MediaPipe's nose tip (1) sits near ICT's (measured: 8 mm lower, toward the columella),
    # its eye corners at ICT's
    np.testing.assert_allclose(lm[1], m.neutral[m.landmark_68[30]], atol=1.0)
    np.testing.assert_allclose(lm[33], m.neutral[m.landmark_68[36]], atol=0.6)
    np.testing.assert_allclose(lm[263], m.neutral[m.landmark_68[45]], atol=0.6)
    # iris points land on their own eyeball: 468-472 right (-x), 473-477 left (+x)
    assert (lm[468:473, 0] < 0).all() and (lm[473:478, 0] > 0).all()


def test_landmark_fit_figure_is_reported(dvp_home) -> None:  # type: ignore[no-untyped-def]
    import json

    manifest = json.loads((dvp_home / "face-model-v3" / "manifest.json").read_text())
    # after similarity alignment MediaPipe's canonical points lie within a few mm of ICT
    assert manifest["landmark_fit_median_mm"] < 2.0
    assert manifest["landmark_fit_p90_mm"] < 5.0


def test_gaze_convention(face_model: FaceModel) -> None:
    m = face_model
    look = gaze_rotation(np.asarray([[0.3, 0.0], [0.0, 0.2]], np.float32)) @ np.asarray(
        [0.0, 0.0, -1.0])
    assert look[0, 0] > 0.25  # yaw > 0: toward the subject's left (+x)
    assert look[1, 1] < -0.15  # pitch > 0: up (-y)
    gaze = np.asarray([[0.3, 0.0], [0.3, 0.0]], np.float32)
    iris_l = m.region_vertices("iris_left")
    moved = m.vertices(np.zeros(100, np.float32), np.zeros(53, np.float32), gaze)
    front = iris_l[np.argsort(m.neutral[iris_l, 2])[:20]]  # the iris front, nearest the camera
    shift = moved[front, 0].mean() - m.neutral[front, 0].mean()
    assert shift == pytest.approx(1.5 * np.sin(0.3), abs=0.1)  # eyeball radius about 1.5 cm
    # the rest of the face does not move
    np.testing.assert_array_equal(moved[:9409], m.neutral[:9409])
    torch_moved = m.vertices(torch.zeros(100), torch.zeros(53), torch.from_numpy(gaze))
    np.testing.assert_allclose(torch_moved.numpy(), moved, atol=1e-4)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_gaze_to_eyelook(lib: str) -> None:
    g = np.asarray([[[np.deg2rad(15), np.deg2rad(-25)], [np.deg2rad(15), np.deg2rad(50)]]],
                   np.float32)
    out = gaze_to_eyelook(torch.from_numpy(g) if lib == "torch" else g)
    out = np.asarray(out)[0]
    named = dict(zip(EYELOOK_NAMES, out))
    assert named["eyeLookOut_L"] == pytest.approx(0.5, abs=1e-5)
    assert named["eyeLookIn_R"] == pytest.approx(0.5, abs=1e-5)
    assert named["eyeLookIn_L"] == 0.0 and named["eyeLookOut_R"] == 0.0
    assert named["eyeLookDown_L"] == pytest.approx(1.0, abs=1e-5)
    assert named["eyeLookUp_R"] == 1.0  # clipped
    assert named["eyeLookUp_L"] == 0.0


def test_damaged_cache_says_how_to_recover(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tracker.face_model import FaceModelError

    bad = tmp_path / "face_model.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(FaceModelError, match=r"damaged face-model cache .*dvp assets install"):
        FaceModel.load(bad)


def test_lip_triangles_split_the_face_at_the_jaw(face_model: FaceModel) -> None:
    from tracker.face_model import lip_triangles

    m = face_model
    jaw = m.expression_basis[m.expression_index("jawOpen")]
    upper, lower = lip_triangles(m.neutral, jaw, m.triangles, m.triangle_region,
                                 m.region_names, m.landmark_68)
    face = m.region_triangles("face")
    assert len(set(upper) & set(lower)) == 0 and len(upper) + len(lower) == len(face)
    moves = np.linalg.norm(jaw, axis=1)
    assert moves[m.triangles[lower]].mean() > 3 * moves[m.triangles[upper]].mean()
    chin, brow = m.landmark_68[8], m.landmark_68[19]
    tri_of = {int(v): t for t in face for v in m.triangles[t]}
    assert tri_of[int(chin)] in set(lower) and tri_of[int(brow)] in set(upper)


def test_measured_map_file_is_read_and_checked(face_model: FaceModel, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tracker.face_model import LEARNED_MAP, FaceModelError, read_learned_map

    ids, tris, bary = read_learned_map(LEARNED_MAP, len(face_model.triangles))
    assert len(ids) == len(set(ids.tolist())) >= 400 and ids.max() < 468
    np.testing.assert_allclose(bary.sum(1), 1.0, atol=1e-5)
    # the face model carries the file's rows
    np.testing.assert_array_equal(face_model.landmark_triangles[ids], tris)
    np.testing.assert_allclose(face_model.landmark_barycentrics[ids], bary, atol=1e-6)
    assert read_learned_map(tmp_path / "absent.txt", 10) is None
    bad = tmp_path / "map.txt"
    bad.write_text("# comment\n3 12 0.5 0.5 0.0 100\n4 12 0.5 x 0.5\n")
    with pytest.raises(FaceModelError, match=r"map.txt:3: expected 'landmark triangle b0 b1 "
                                             r"b2', got '4 12 0.5 x 0.5'"):
        read_learned_map(bad, 100)
    bad.write_text("3 500 0.5 0.5 0.0\n")
    with pytest.raises(FaceModelError, match=r"map.txt:1: landmark, triangle or barycentrics "
                                             r"out of range: '3 500 0.5 0.5 0.0'"):
        read_learned_map(bad, 100)
