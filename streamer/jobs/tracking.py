"""Track a whole video file: landmarks on every frame (`tracker.landmarks`, over worker
processes: `streamer.jobs.landmarks`), then the offline fit (`tracker.streams`: the same
chunks, each from its own start, stepped together as one batch), then (`renderer.refine`:
on CUDA by default) the analysis-by-synthesis refinement.

Shared by `dvp track` and `dvp prepare` (both read the video here, in `streamer`, since
library functions take arrays, never videos).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from renderer.refine import refine_video, refine_wanted
from streamer.cli.config import Config
from streamer.jobs.landmarks import video_landmarks
from streamer.video.io import VideoError, VideoInfo, probe, read_frames
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
    the seconds per stage: `setup` (probe, face model, regressor), `landmarks`, `fit` and,
    with the refinement, `refine`."""

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
    landmark chunks fitted together as one batch per step (tracker.streams), then, with
    `renderer.refine`, the photometric refinement (a second pass over the frames; the
    smoothing comes after it). A missing, empty or non-video file fails before any work."""
    entered = time.perf_counter()
    info = probe(video)
    refine = refine_wanted(config.renderer.refine, device)
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
        params, frames = track_streams(landmarks, times, model,
                                       replace(tc, smoothing=False) if refine else tc, device,
                                       regressor, starts=found.chunks, focal=focal,
                                       progress=bar.update)
    seconds = {"setup": started - entered, "landmarks": fitted - started,
               "fit": time.perf_counter() - fitted}
    if refine:
        refined = time.perf_counter()
        params = refine_tracking(video, params, landmarks, model, config, device, max_frames,
                                 fit_focal=focal is None, progress=progress)
        seconds["refine"] = time.perf_counter() - refined
    log.info("tracked %d frames: landmarks %.1f s (%d worker(s)), fit %.1f s",
             len(landmarks), seconds["landmarks"], found.workers, seconds["fit"])
    return TrackedVideo(info, model, params, frames, landmarks, found.workers, seconds)


def refine_tracking(video: Path, params: FaceParams, landmarks: list[Landmarks],
                    model: FaceModel, config: Config, device: torch.device,
                    max_frames: int | None = None, fit_focal: bool = True,
                    progress: bool = True) -> FaceParams:
    """The landmark fit `params` of `video` refined against its frames (renderer.refine;
    progress bars per stage)."""
    bars: dict[str, tqdm] = {}
    totals = {"crops": params.frames, "keyframes": config.renderer.refine_keyframe_steps,
              "refine": int(params.valid.sum())}

    def note(stage: str, n: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=totals.get(stage), desc=stage, unit="step", leave=False,
                               disable=not progress)
        bars[stage].update(n)

    observed = np.stack([lm.points for lm in landmarks])
    try:
        result = refine_video(model, params, (f for f, _ in read_frames(video, max_frames)),
                              observed, config.tracker, config.renderer, device, fit_focal,
                              note)
    finally:
        for bar in bars.values():
            bar.close()
    log.info("refinement: colour RMS %.4f -> %.4f; %s", float(np.nanmean(result.rmse_before)),
             float(np.nanmean(result.rmse_after)),
             ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    return result.params
