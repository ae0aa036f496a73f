"""Fixtures of the tracker tests: a small regressor (trained once per session), the
landmark model, synthetic sequences, and the shared media."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tracker_testdata import MEGAMIND, SMALL

from tracker.config import TrackerConfig


@pytest.fixture(scope="session")
def tracker_config() -> TrackerConfig:
    """Default settings, with the small regressor."""
    return TrackerConfig(**SMALL)


@pytest.fixture(scope="session")
def regressor(face_model, tracker_config):  # type: ignore[no-untyped-def]
    """A small regressor, trained once per session into the test DVP_HOME."""
    from tracker.regressor import load_or_train, settings_from_config

    return load_or_train(face_model, settings_from_config(tracker_config))


@pytest.fixture(scope="session")
def landmark_model(face_model):  # type: ignore[no-untyped-def]
    from tracker.fitting import LandmarkModel

    return LandmarkModel(face_model)


@pytest.fixture(scope="session")
def sequence(landmark_model):  # type: ignore[no-untyped-def]
    """A 45-frame synthetic sequence with 1 px landmark noise."""
    from tracker.synthetic import synthetic_sequence

    return synthetic_sequence(landmark_model, frames=45, seed=3, noise_px=1.0)


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()


@pytest.fixture(scope="session")
def megamind_frames():  # type: ignore[no-untyped-def]
    """The first 40 frames of ../shared/media/megamind.avi and their timestamps."""
    if not MEGAMIND.is_file():
        pytest.skip(f"{MEGAMIND} not present")
    from streamer.video.io import read_frames

    frames, times = [], []
    for frame, t in read_frames(MEGAMIND, max_frames=40):
        frames.append(frame)
        times.append(t)
    return frames, times


@pytest.fixture(autouse=True)
def _one_thread():  # type: ignore[no-untyped-def]
    """Single-threaded torch: these tiny problems only lose time to thread handoffs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
