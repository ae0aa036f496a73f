"""Landmarks of every frame of a video file, spread over CPU worker processes.

MediaPipe runs on the CPU, one frame after another within a stream, at about 10 ms a frame:
a whole video goes faster cut into chunks, each tracked from its own start (MediaPipe's
streaming mode within a chunk: detection on its first frame, then tracking) in a worker
process of its own, which decodes its chunk itself (`streamer.video.io.split_video` /
`read_chunk`: seeking to the keyframe before it, so the frames are exactly those of
`read_frames`). Results come back in order.

Workers: `streamer.landmark_workers` (0 = auto: one per usable core, at most one per
`MIN_CHUNK_FRAMES` frames, none below `MIN_SPLIT_FRAMES`; a number: that many, at most one
per frame); with one worker, or a video
that cannot be split exactly (timestamps missing or out of order: some AVIs), one
in-process stream reads the whole video as before. The torch backend (`auto` on CUDA)
runs in process, batched over chunks of `tracker.landmarks_chunk` frames, each from its
own start (tracker.landmarks_torch.landmarks_in_chunks). What
was chosen, and why, is reported once (tracker.choices). The same video and worker count
give the same landmarks (chunk boundaries depend on nothing else); another worker count
moves the boundaries, where the new chunk's first frames come from a fresh detection.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import multiprocessing as mp
import queue as queue_module
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamer.cli.config import Config
from streamer.video.io import (
    ChunkError,
    VideoChunk,
    VideoError,
    read_chunk,
    read_frames,
    split_video,
)
from tracker.choices import report_choice
from tracker.config import TrackerConfig
from tracker.device import usable_cores
from tracker.landmarks import N_POINTS, Landmarks, landmark_backend, make_landmark_detector

log = logging.getLogger(__name__)

#: Fewest frames per worker that `auto` gives, and fewest frames that `auto` splits at all:
#: a worker costs a process start, its imports and a MediaPipe graph (1-3 s, in parallel),
#: worth about 100-300 frames of MediaPipe's work.
MIN_CHUNK_FRAMES = 50
MIN_SPLIT_FRAMES = 500
#: Progress is reported every this many frames by each worker.
_REPORT_EVERY = 8


@dataclass(frozen=True)
class VideoLandmarks:
    """Landmarks of the frames of a video, in order: `landmarks` (T Landmarks) and
    `timestamps` (T,) seconds as `read_frames` gives them; `workers`: the processes used
    (1: in process); `chunks`: the first frame index of each chunk (each tracked from its
    own start)."""

    landmarks: list[Landmarks]
    timestamps: list[float]
    workers: int
    chunks: list[int]


def worker_count(setting: int, frames: int, cores: int | None = None) -> tuple[int, str]:
    """(worker processes, why) for `streamer.landmark_workers` = `setting` over `frames`."""
    cores = usable_cores() if cores is None else cores
    if setting < 0:
        raise VideoError(f"streamer.landmark_workers must be 0 (auto) or more, got {setting}")
    if setting > 0:
        n = max(1, min(setting, frames))
        return n, f"streamer.landmark_workers={setting}"
    n = max(1, min(cores, frames // MIN_CHUNK_FRAMES))
    if n == 1 or frames < MIN_SPLIT_FRAMES:
        why = ("1 usable core" if cores == 1 else
               f"{frames} frames, fewer than the {MIN_SPLIT_FRAMES} that pay for worker "
               "processes")
        return 1, f"auto: {why}"
    return n, f"auto: {cores} usable cores, at least {MIN_CHUNK_FRAMES} frames each"


def video_landmarks(video: Path, config: Config, device: Any, frames: int,
                    max_frames: int | None = None,
                    progress: Callable[[int], None] | None = None) -> VideoLandmarks:
    """Landmarks of every frame of `video` (its first `max_frames`; `frames` how many that
    is by its headers) with the `tracker.landmarks` backend, over worker processes where
    that pays (see the module doc). `progress(n)` after every few frames. Raises VideoError
    as `read_frames`."""
    tc = config.tracker
    workers, why = worker_count(config.streamer.landmark_workers, frames)
    backend = landmark_backend(tc, device)
    if workers > 1 and backend != "mediapipe":
        workers, why = 1, (f"the {backend} backend runs in process, batched over chunks of "
                           f"{tc.landmarks_chunk} frames")
    chunks: list[VideoChunk] = []
    if workers > 1:
        chunks, problem = split_video(video, workers, max_frames)
        if not chunks:
            workers, why = 1, problem
    if workers > 1:
        report_choice("landmark workers", f"{workers} processes", why)
        try:
            return _in_workers(chunks, tc, progress)
        except ChunkError as err:
            log.warning("%s: reading the video in one piece instead", err)
            report_choice("landmark workers", "1 process", str(err))
    else:
        report_choice("landmark workers", "1 process", why)
    return _in_process(video, tc, device, max_frames, progress)


def _in_process(video: Path, tc: TrackerConfig, device: Any, max_frames: int | None,
                progress: Callable[[int], None] | None) -> VideoLandmarks:
    """One process: MediaPipe frame by frame, or the torch backend batched over chunks of
    `tracker.landmarks_chunk` frames, each from its own start (tracker.landmarks_torch.
    landmarks_in_chunks)."""
    from tracker.landmarks_torch import TorchLandmarkSource, landmarks_in_chunks

    landmarks: list[Landmarks] = []
    times: list[float] = []
    starts = [0]
    with contextlib.closing(make_landmark_detector(tc, device)) as detector:
        if isinstance(detector, TorchLandmarkSource) and tc.landmarks_chunk > 0:
            def frames() -> Iterator[np.ndarray]:
                for frame, t in read_frames(video, max_frames):
                    times.append(t)
                    yield frame

            landmarks = landmarks_in_chunks(frames(), detector.landmarks, tc.landmarks_chunk,
                                            tc.landmarks_streams,
                                            tc.landmarks_buffer_mb << 20, progress)
            starts = list(range(0, len(landmarks), tc.landmarks_chunk))
        else:
            for frame, t in read_frames(video, max_frames):
                landmarks.append(detector(frame))
                times.append(t)
                if progress is not None:
                    progress(1)
    if not landmarks:
        raise VideoError(f"{video} has no video frames")
    return VideoLandmarks(landmarks, times, 1, starts or [0])


# ---- the worker processes ------------------------------------------------------------------
@contextlib.contextmanager
def _workers_start_here() -> Iterator[None]:
    """Spawned workers run this light module as their main, not the program's main script
    (`dvp`'s imports torch and every command: seconds per worker). multiprocessing's spawn
    takes the main module by its `__spec__` name when it has one; it is set to this
    module's while the workers start."""
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    had = "__spec__" in vars(main)
    spec = getattr(main, "__spec__", None)
    main.__spec__ = importlib.util.find_spec(__name__)
    try:
        yield
    finally:
        if had:
            main.__spec__ = spec
        else:
            del main.__spec__


_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    import cv2

    cv2.setNumThreads(1)


def _chunk_landmarks(chunk: VideoChunk, tc: TrackerConfig
                     ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """One chunk in a worker: points (n, 478, 2) float32, presence (n,) float32, (h, w)."""
    points = np.zeros((len(chunk), N_POINTS, 2), np.float32)
    presence = np.zeros(len(chunk), np.float32)
    size = (0, 0)
    done = 0
    with contextlib.closing(make_landmark_detector(tc, "cpu")) as detector:
        for i, (frame, _) in enumerate(read_chunk(chunk)):
            found = detector(frame)
            points[i], presence[i], size = found.points, found.presence, found.image_size
            done += 1
            if _progress_queue is not None and done % _REPORT_EVERY == 0:
                _progress_queue.put(_REPORT_EVERY)
    if _progress_queue is not None and done % _REPORT_EVERY:
        _progress_queue.put(done % _REPORT_EVERY)
    return points, presence, size


def _in_workers(chunks: list[VideoChunk], tc: TrackerConfig,
                progress: Callable[[int], None] | None) -> VideoLandmarks:
    ctx = mp.get_context("spawn")  # no fork of a process with torch / CUDA threads
    progress_queue = ctx.Queue()
    with ProcessPoolExecutor(max_workers=len(chunks), mp_context=ctx,
                             initializer=_init_worker, initargs=(progress_queue,)) as pool:
        with _workers_start_here():
            futures: list[Future[Any]] = [pool.submit(_chunk_landmarks, c, tc)
                                          for c in chunks]
        pending = set(futures)
        try:
            while pending:
                _, pending = wait(pending, timeout=0.1, return_when=FIRST_EXCEPTION)
                _drain(progress_queue, progress)
                if any(f.done() and f.exception() is not None for f in futures):
                    break
            results = [f.result() for f in futures]  # raises the first worker error
        finally:
            for f in futures:
                f.cancel()
        _drain(progress_queue, progress)
    progress_queue.close()
    landmarks: list[Landmarks] = []
    times: list[float] = []
    for chunk, (points, presence, size) in zip(chunks, results):
        for i in range(len(chunk)):
            landmarks.append(Landmarks(points[i], float(presence[i]), size))
        times.extend(chunk.times)
    return VideoLandmarks(landmarks, times, len(chunks), [c.start for c in chunks])


def _drain(progress_queue: Any, progress: Callable[[int], None] | None) -> None:
    while True:
        try:
            n = progress_queue.get_nowait()
        except queue_module.Empty:
            return
        if progress is not None:
            progress(int(n))
