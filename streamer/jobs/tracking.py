"""Track a whole video file: landmarks on every frame (`tracker.landmarks`, over worker
processes: `streamer.jobs.landmarks`), then the offline fit (`tracker.streams`: the same
chunks, each from its own start, stepped together as one batch).

Shared by `dvp track` and `dvp prepare` (both read the video here, in `streamer`, since
library functions take arrays, never videos).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from streamer.cli.config import Config
from streamer.jobs.landmarks import video_landmarks
from streamer.video.io import VideoError, VideoInfo, probe
from tracker.assets import load_face_model
from tracker.face_model import FaceModel
from tracker.landmarks import Landmarks
from tracker.params import FaceParams
from tracker.regressor import load_or_train, settings_from_config
from tracker.streams import track_streams
from tracker.tracker import TrackedFrame

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackedVideo:
    """A tracked video: its info, the model, parameters (T frames, the video's camera), the
    per-frame fit results, the detected landmarks, the landmark worker processes used and
    the seconds spent on landmarks and on the fit."""

    info: VideoInfo
    model: FaceModel
    params: FaceParams
    frames: list[TrackedFrame]
    landmarks: list[Landmarks]
    workers: int = 1
    seconds: dict[str, float] = field(default_factory=dict)


def track_video(video: Path, config: Config, device: torch.device,
                max_frames: int | None = None, focal: float | None = None,
                progress: bool = True) -> TrackedVideo:
    """Landmarks of every frame (streaming mode, over worker processes: streamer.jobs.
    landmarks), then identity and focal length over keyframes and a per-frame fit, the
    landmark chunks fitted together as one batch per step (tracker.streams). A missing,
    empty or non-video file fails before any work."""
    info = probe(video)
    total = info.frame_count if max_frames is None else min(info.frame_count, max_frames)
    model = load_face_model()
    tc = config.tracker
    regressor = load_or_train(model, settings_from_config(tc))
    started = time.perf_counter()
    with tqdm(total=total, desc="landmarks", unit="frame", leave=False,
              disable=not progress) as bar:
        found = video_landmarks(video, config, device, total, max_frames, bar.update)
    landmarks, times = found.landmarks, found.timestamps
    if not landmarks:
        raise VideoError(f"{video} has no video frames")
    fitted = time.perf_counter()
    with tqdm(total=len(landmarks), desc="fit", unit="frame", leave=False,
              disable=not progress) as bar:
        params, frames = track_streams(landmarks, times, model, tc, device, regressor,
                                       starts=found.chunks, focal=focal, progress=bar.update)
    seconds = {"landmarks": fitted - started, "fit": time.perf_counter() - fitted}
    log.info("tracked %d frames: landmarks %.1f s (%d worker(s)), fit %.1f s",
             len(landmarks), seconds["landmarks"], found.workers, seconds["fit"])
    return TrackedVideo(info, model, params, frames, landmarks, found.workers, seconds)
