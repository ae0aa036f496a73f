"""Track a whole video file: landmarks on every frame (`tracker.landmarks`; the torch
backend batched over chunks of the video, `tracker.landmarks_chunk`), then the offline fit.

Shared by `dvp track` and `dvp prepare` (both read the video here, in `streamer`, since
library functions take arrays, never videos).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from streamer.cli.config import Config
from streamer.video.io import VideoError, VideoInfo, probe, read_frames
from tracker.assets import load_face_model
from tracker.face_model import FaceModel
from tracker.landmarks import Landmarks, make_landmark_detector
from tracker.landmarks_torch import TorchLandmarkSource, landmarks_in_chunks
from tracker.params import FaceParams
from tracker.regressor import load_or_train, settings_from_config
from tracker.tracker import TrackedFrame, track_landmarks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedVideo:
    """A tracked video: its info, the model, parameters (T frames, the video's camera), the
    per-frame fit results and the detected landmarks."""

    info: VideoInfo
    model: FaceModel
    params: FaceParams
    frames: list[TrackedFrame]
    landmarks: list[Landmarks]


def track_video(video: Path, config: Config, device: torch.device,
                max_frames: int | None = None, focal: float | None = None) -> TrackedVideo:
    """Landmarks of every frame (streaming mode), then identity and focal length over
    keyframes and a per-frame fit. A missing, empty or non-video file fails before any work."""
    info = probe(video)
    total = info.frame_count if max_frames is None else min(info.frame_count, max_frames)
    model = load_face_model()
    tc = config.tracker
    regressor = load_or_train(model, settings_from_config(tc))
    landmarks: list[Landmarks] = []
    times: list[float] = []
    detector = make_landmark_detector(tc, device)
    with contextlib.closing(detector), tqdm(total=total, desc="landmarks", unit="frame", leave=False) as bar:
        if isinstance(detector, TorchLandmarkSource) and tc.landmarks_chunk > 0:
            def frames() -> Iterator[np.ndarray]:
                for frame, t in read_frames(video, max_frames):
                    times.append(t)
                    yield frame

            landmarks = landmarks_in_chunks(frames(), detector.landmarks, tc.landmarks_chunk,
                                            tc.landmarks_streams,
                                            tc.landmarks_buffer_mb << 20, bar.update)
        else:
            for frame, t in read_frames(video, max_frames):
                landmarks.append(detector(frame))
                times.append(t)
                bar.update(1)
    if not landmarks:
        raise VideoError(f"{video} has no video frames")
    with tqdm(total=len(landmarks), desc="fit", unit="frame", leave=False) as bar:
        params, frames = track_landmarks(landmarks, times, model, tc, device, regressor,
                                         focal=focal, progress=bar.update)
    return TrackedVideo(info, model, params, frames, landmarks)
