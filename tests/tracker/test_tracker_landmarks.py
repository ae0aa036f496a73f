"""MediaPipe landmarks: pixels, presence, following one face, bad frames."""

from __future__ import annotations

import numpy as np
import pytest

from tracker.landmarks import (
    FrameError,
    LandmarkDetector,
    Landmarks,
    check_frame,
    detect_image,
)


def test_astronaut_face_in_pixels(astronaut: np.ndarray) -> None:
    lm = detect_image(astronaut)
    assert lm.found and lm.presence == 1.0
    assert lm.points.shape == (478, 2) and lm.points.dtype == np.float32
    assert lm.image_size == (512, 512)
    x0, y0, x1, y1 = lm.box
    # the face of skimage's astronaut sits about x 175..275, y 65..185
    assert 150 < x0 < 200 and 250 < x1 < 300 and 50 < y0 < 100 and 160 < y1 < 210
    # 468-472 are the subject's right iris: on the image's left of 473-477 (a frontal face)
    assert lm.points[468, 0] < lm.points[473, 0]


def test_pixel_coordinates_follow_the_image(astronaut: np.ndarray) -> None:
    """Landmarks are in pixels of the frame: padding the image shifts them by the pad."""
    base = detect_image(astronaut)
    padded = np.zeros((512 + 40, 512 + 100, 3), np.uint8)
    padded[40:, 100:] = astronaut
    moved = detect_image(padded)
    shift = np.median(moved.points - base.points, axis=0)
    np.testing.assert_allclose(shift, [100.0, 40.0], atol=1.5)


def test_no_face_is_absent_not_an_error() -> None:
    lm = detect_image(np.zeros((120, 160, 3), np.uint8))
    assert not lm.found and lm.presence == 0.0
    assert lm.points.shape == (478, 2) and not lm.points.any()
    assert lm.image_size == (120, 160)


def test_follows_the_largest_face_then_the_same_one(astronaut: np.ndarray) -> None:
    face = astronaut[40:240, 140:320]  # 200x180 crop around the face
    small = face[::2, ::2]
    frame = np.full((320, 640, 3), 40, np.uint8)
    frame[60:260, 40:220] = face  # large, on the left
    frame[110:210, 420:510] = small  # small, on the right
    with LandmarkDetector(stream=True, max_faces=3) as det:
        first = det(frame)
        assert first.found and first.box[0] < 320  # the large one
        # the followed face shrinks, the other grows larger: still the same person
        import cv2

        frame2 = np.full_like(frame, 40)
        frame2[80:240, 70:214] = cv2.resize(face, (144, 160))
        frame2[40:240, 400:580] = face
        second = det(frame2)
        assert second.found and second.box[0] < 320


def test_choice_by_overlap_then_size() -> None:
    det = object.__new__(LandmarkDetector)
    det._previous_box = None

    def face(x: float, y: float, size: float) -> np.ndarray:
        pts = np.random.default_rng(0).uniform(0, size, (478, 2)).astype(np.float32)
        return pts + np.asarray([x, y], np.float32)

    small, large = face(10, 10, 50), face(200, 10, 100)
    assert det._choose([small, large]) is large
    det._previous_box = np.asarray([5, 5, 62, 62], np.float32)
    assert det._choose([large, small]) is small
    det._previous_box = np.asarray([500, 500, 520, 520], np.float32)  # no overlap: largest
    assert det._choose([small, large]) is large


@pytest.mark.parametrize(("frame", "message"), [
    (np.zeros((4, 4, 3), np.float32), "frame must be uint8 RGB, got dtype float32"),
    (np.zeros((4, 4), np.uint8), "frame must have shape (H, W, 3) (RGB), got (4, 4)"),
    (np.zeros((4, 4, 4), np.uint8), "frame must have shape (H, W, 3) (RGB), got (4, 4, 4)"),
    ([[0]], "frame must be a numpy array (H, W, 3) uint8 RGB, got list"),
    (np.zeros((1, 4, 3), np.uint8), "frame is too small: 4x1 pixels"),
])
def test_bad_frames_say_what_is_wrong(frame: object, message: str) -> None:
    with pytest.raises(FrameError) as err:
        check_frame(frame)
    assert str(err.value) == message


def test_detector_rejects_bad_frame_and_closed_use() -> None:
    det = LandmarkDetector(stream=False)
    with pytest.raises(FrameError, match="frame must be uint8 RGB, got dtype float64"):
        det(np.zeros((8, 8, 3)))
    det.close()
    det.close()  # idempotent
    with pytest.raises(FrameError) as err:
        det(np.zeros((8, 8, 3), np.uint8))
    assert str(err.value) == "the landmark detector is closed"


def test_missing_landmarks_value() -> None:
    lm = Landmarks.missing((10, 20))
    assert not lm.found and lm.image_size == (10, 20) and lm.points.shape == (478, 2)
