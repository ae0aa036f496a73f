"""Footage no one here made: skimage's astronaut (a photo) and megamind.avi (animation)."""

from __future__ import annotations

import numpy as np
import pytest

from tracker.landmarks import LandmarkDetector, detect_image
from tracker.tracker import FaceTracker, track_landmarks


def test_astronaut_fit(face_model, regressor, tracker_config, astronaut) -> None:  # type: ignore[no-untyped-def]
    tracker = FaceTracker(face_model, tracker_config, "cpu", regressor)
    lm = detect_image(astronaut)
    tracker.calibrate([lm])
    out = tracker.step(lm, 0.0)
    assert out.valid and out.residual_px < 2.0
    names = face_model.expression_names
    smile = out.expression[[names.index("mouthSmile_L"), names.index("mouthSmile_R")]]
    assert smile.min() > 0.3  # she smiles
    assert out.expression[names.index("jawOpen")] < 0.3
    # in front of the camera, upright, a little turned
    assert 20 < out.translation[2] < 300
    assert np.degrees(np.linalg.norm(out.rotation)) < 30


@pytest.fixture(scope="module")
def megamind_tracked(face_model, regressor, tracker_config, megamind_frames):  # type: ignore[no-untyped-def]
    frames, times = megamind_frames
    with LandmarkDetector(stream=True, max_faces=tracker_config.max_faces) as det:
        landmarks = [det(f) for f in frames]
    params, tracked = track_landmarks(landmarks, times, face_model, tracker_config,
                                      regressor=regressor)
    return frames, landmarks, params, tracked


def test_megamind_faces_as_often_as_mediapipe(megamind_tracked) -> None:  # type: ignore[no-untyped-def]
    from mediapipe.python.solutions import face_mesh

    frames, _, params, _ = megamind_tracked
    with face_mesh.FaceMesh(static_image_mode=False, max_num_faces=1,
                            refine_landmarks=True) as mesh:
        alone = sum(bool(mesh.process(f).multi_face_landmarks) for f in frames)
    assert int(params.valid.sum()) >= alone
    assert not params.valid[0]  # the clip opens on a black frame: no face, no exception
    assert params.valid[1:].all()


def test_megamind_residual_and_jaw(megamind_tracked) -> None:  # type: ignore[no-untyped-def]
    _, landmarks, params, tracked = megamind_tracked
    res = [f.residual_px for f in tracked if f.valid]
    assert np.median(res) < 2.0
    # jawOpen follows the mouth: the lips' inner gap over the face height
    valid = params.valid
    gap = np.asarray([np.linalg.norm(lm.points[13] - lm.points[14])
                      / np.linalg.norm(lm.points[10] - lm.points[152]) if lm.found else 0.0
                      for lm in landmarks])
    names = [str(n) for n in params.expression_names]
    jaw = params.expression[:, names.index("jawOpen")]
    corr = np.corrcoef(jaw[valid], gap[valid])[0, 1]
    print(f"megamind: median residual {np.median(res):.2f} px, jaw-gap correlation {corr:.2f}")
    assert corr > 0.3


def test_track_frames_directly(face_model, regressor, tracker_config, astronaut) -> None:  # type: ignore[no-untyped-def]
    """FaceTracker.track runs MediaPipe itself (streaming); a blank frame is no face."""
    tracker = FaceTracker(face_model, tracker_config, "cpu", regressor)
    try:
        first = tracker.track(astronaut, 0.0)
        blank = tracker.track(np.zeros_like(astronaut), 0.04)
        again = tracker.track(astronaut, 0.08)
    finally:
        tracker.close()
    assert first.valid and not blank.valid and again.valid and again.cold
    assert first.residual_px < 3.0
