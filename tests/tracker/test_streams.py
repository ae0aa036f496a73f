"""The offline fit of a video in chunks stepped together (tracker.streams): each chunk is
what `FaceTracker.step` gives on that chunk alone, one chunk is `track_landmarks`."""

from __future__ import annotations

import numpy as np
import pytest

from tracker.landmarks import Landmarks
from tracker.streams import track_streams
from tracker.tracker import FaceTracker, track_landmarks


def frames_of(sequence, gap: range) -> list[Landmarks]:  # type: ignore[no-untyped-def]
    """The sequence's noisy landmarks, with no face on the frames of `gap`."""
    marks = sequence.landmarks()
    for i in gap:
        marks[i] = Landmarks.missing(sequence.image_size)
    return marks


def test_each_chunk_is_its_own_tracker(sequence, face_model, tracker_config,  # type: ignore[no-untyped-def]
                                       regressor) -> None:
    marks = frames_of(sequence, range(20, 23))  # a lost face inside the second chunk
    times = sequence.timestamps
    starts = [0, 15, 30]
    params, frames = track_streams(marks, times, face_model, tracker_config, "cpu", regressor,
                                   starts=starts)
    assert params.frames == len(marks) == len(frames)
    calib = FaceTracker(face_model, tracker_config, "cpu", regressor)
    calib._set_image_size(sequence.image_size)
    calib.calibrate(marks)
    np.testing.assert_allclose(params.identity, calib.identity, atol=1e-6)
    assert float(params.focal[0]) == pytest.approx(calib.focal)
    # On the CPU one frame alone is solved in float64 (LAPACK), a batch in float32: the
    # Levenberg-Marquardt paths part a little (the sparse expression most, the translation up
    # to 0.7 mm, the gaze following the pose up to 0.6 degree), equally accurate.
    errors: dict[str, list[float]] = {"streams": [], "alone": []}
    for a, b in zip(starts, [*starts[1:], len(marks)]):
        alone = FaceTracker(face_model, tracker_config, "cpu", regressor,
                            image_size=sequence.image_size, focal=calib.focal,
                            identity=calib.identity)
        for i in range(a, b):
            want, got = alone.step(marks[i], float(times[i])), frames[i]
            assert (got.valid, got.cold, got.iterations) == (want.valid, want.cold,
                                                             want.iterations), i
            np.testing.assert_allclose(got.rotation, want.rotation, atol=3e-3, err_msg=str(i))
            np.testing.assert_allclose(got.translation, want.translation, atol=0.1)
            np.testing.assert_allclose(got.gaze, want.gaze, atol=0.02)
            assert float(np.abs(got.expression - want.expression).mean()) < 0.01, i
            if got.valid:
                truth = sequence.expression[i]
                errors["streams"].append(float(np.abs(got.expression - truth).mean()))
                errors["alone"].append(float(np.abs(want.expression - truth).mean()))
    assert np.mean(errors["streams"]) < 1.1 * np.mean(errors["alone"])
    assert [frames[i].cold for i in starts] == [True, True, True]  # each from its own start
    assert not any(frames[i].valid for i in range(20, 23))
    assert frames[23].cold and frames[23].valid  # the face back: from the regressor


def test_one_chunk_is_track_landmarks(sequence, face_model, tracker_config,  # type: ignore[no-untyped-def]
                                      regressor) -> None:
    marks, times = sequence.landmarks()[:12], sequence.timestamps[:12]
    a, _ = track_streams(marks, times, face_model, tracker_config, "cpu", regressor, starts=[0])
    b, _ = track_landmarks(marks, times, face_model, tracker_config, "cpu", regressor)
    for key in ("rotation", "translation", "expression", "gaze", "valid", "identity", "focal"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key), err_msg=key)


@pytest.mark.gpu
def test_streams_on_cuda_agree_with_the_cpu(sequence, face_model, tracker_config,  # type: ignore[no-untyped-def]
                                            regressor) -> None:
    marks, times = sequence.landmarks()[:30], sequence.timestamps[:30]
    cpu, _ = track_streams(marks, times, face_model, tracker_config, "cpu", regressor,
                           starts=[0, 10, 20])
    gpu, frames = track_streams(marks, times, face_model, tracker_config, "cuda", regressor,
                                starts=[0, 10, 20])
    assert [frames[i].cold for i in (0, 10, 20)] == [True, True, True]
    np.testing.assert_allclose(gpu.rotation, cpu.rotation, atol=3e-3)
    np.testing.assert_allclose(gpu.translation, cpu.translation, atol=0.05)
    assert float(np.abs(gpu.expression - cpu.expression).mean()) < 0.01
