"""The torch landmark backend against MediaPipe on a `dvp synth` actor (the renderer's
synthetic face: a face neither backend was made for)."""

import numpy as np
import pytest

from renderer.synth import synthesize
from tracker.landmarks import LandmarkDetector, compare_landmarks
from tracker.landmarks_torch import TorchLandmarks

pytestmark = pytest.mark.slow


def test_torch_landmarks_follow_mediapipe_on_a_synth_actor(face_model) -> None:  # type: ignore[no-untyped-def]
    frames, _ = synthesize(face_model, frames=4, size=192, seed=0, supersample=1,
                           texture_size=256)
    with LandmarkDetector(stream=True) as mp:
        ref = [mp(f) for f in frames]
    ours = TorchLandmarks("cpu")
    cand = [ours.detect_batch([f], ["synth"])[0] for f in frames]
    agree = compare_landmarks(ref, cand)
    print("synth actor:", agree.as_dict())
    assert agree.found_reference == len(frames) and agree.found_differ == 0
    assert agree.mean <= 0.01 and agree.p95 <= 0.03
    assert np.isfinite(agree.max)
