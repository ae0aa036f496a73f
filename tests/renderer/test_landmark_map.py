"""The measured landmark map's machinery: surface points under landmarks, the map from
them, and its file (the measurement itself renders 1,000 frames: `python -m
renderer.landmark_map`)."""

import numpy as np
import pytest

from renderer.landmark_map import (
    EYE_CONTOURS,
    candidate_triangles,
    learned_map,
    surface_hits,
    write_map,
)
from renderer.synth import SynthActor
from tracker.face_model import INNER_LIP_LOWER_POINTS, read_learned_map
from tracker.fitting import LandmarkModel, params_landmarks
from tracker.landmarks import Landmarks


@pytest.fixture(scope="module")
def candidates(face_model):
    return candidate_triangles(face_model)


def test_landmarks_exactly_on_the_model_give_back_the_map(face_model, candidates, tmp_path):
    """Landmarks projected from the model itself hit the surface where the map puts them;
    the map made from those hits is the map; it survives its file."""
    actor = SynthActor(face_model, seed=4, size=16, texture_size=16, supersample=1)
    params = actor.motion(48).select(np.arange(0, 48, 4))
    pts = params_landmarks(LandmarkModel(face_model), params)
    lms = [Landmarks(p, 1.0, (256, 256)) for p in pts]
    lms[3] = Landmarks.missing((256, 256))
    hits = surface_hits(face_model, params, lms, candidates)
    assert hits.shape == (12, 468, 3) and np.isnan(hits[3]).all()
    at = face_model.landmarks(face_model.neutral)[:468]
    found = np.isfinite(hits).all(-1)
    assert found[np.arange(12) != 3].mean() > 0.95
    err = np.linalg.norm(hits - at[None], axis=-1)[found]
    # cm; some points are hidden by the surface in front of them (silhouette, nostril
    # wings, the rolled lower lip's inner edge, lower lid margins): the visible hit is kept
    assert np.median(err) < 1e-3 and (err < 0.05).mean() > 0.9
    ids, tris, bary, counts = learned_map(face_model, hits, candidates, min_samples=8)
    assert not set(ids.tolist()) & set(EYE_CONTOURS) and len(ids) > 400
    pos = (face_model.neutral[face_model.triangles[tris]] * bary[..., None]).sum(1)
    assert np.median(np.linalg.norm(pos - at[ids], axis=1)) < 1e-3
    assert counts.max() <= 11
    path = tmp_path / "map.txt"
    write_map(path, (ids, tris, bary, counts), "test map\nsecond line")
    assert path.read_text().startswith("# test map\n# second line\n")
    r_ids, r_tris, r_bary = read_learned_map(path, len(face_model.triangles))
    np.testing.assert_array_equal(r_ids, ids)
    np.testing.assert_array_equal(r_tris, tris)
    np.testing.assert_allclose(r_bary, bary, atol=2e-6)


def test_inner_lip_points_search_only_their_own_lip(face_model, candidates):
    from tracker.face_model import lip_triangles

    _, lower = lip_triangles(face_model.neutral,
                             face_model.expression_basis[face_model.expression_index("jawOpen")],
                             face_model.triangles, face_model.triangle_region,
                             face_model.region_names, face_model.landmark_68)
    for i in INNER_LIP_LOWER_POINTS:
        row = candidates.ids[i]
        assert np.isin(row[row >= 0], lower).all()
        assert np.array_equal(candidates.allowed[i], lower)
