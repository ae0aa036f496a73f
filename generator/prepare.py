"""`dvp prepare`: a target video -> a target directory (DESIGN.md).

Track every frame (identity and focal length over the whole video), choose one fixed square
crop around head and shoulders, resize to S, move the camera into the crop, fit albedo and
lighting on the cropped frames, estimate the neutral and the pose ranges, and write the target directory aside
then rename it into place.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch

from generator.errors import TargetError
from generator.parallel import ordered_map, threads_for
from generator.target import (
    TargetDir,
    TargetInfo,
    TargetWriter,
    frame_name,
    holdout_start_for,
    read_png,
    software_versions,
    training_ranges,
)
from renderer.photometric import fit_photometric
from tracker.face_model import FaceModel
from tracker.fitting import LandmarkModel, params_landmarks
from tracker.params import FaceParams
from tracker.transfer import Neutral

#: Side of the square crop as a multiple of the face's landmark box (head and shoulders).
CROP_SCALE = 2.4
#: The face's centre sits this fraction of the crop above the crop's centre.
CROP_RAISE = 0.1


def face_boxes(params: FaceParams, model: FaceModel) -> np.ndarray:
    """Landmark bounding boxes [T, 4] (x0, y0, x1, y1) in pixels of the valid frames."""
    valid = params.select(np.nonzero(params.valid)[0])
    uv = params_landmarks(LandmarkModel(model), valid, "cpu")[:, :468]
    return np.concatenate([uv.min(1), uv.max(1)], 1)


def choose_crop(params: FaceParams, model: FaceModel) -> tuple[int, int, int]:
    """One fixed square crop (x, y, size) in source pixels around head and shoulders.

    The size is CROP_SCALE times the largest face box of the video, the centre the median
    face centre (raised a little, so shoulders fit below); the box is moved inside the frame
    where it fits, and shrunk to the frame when larger.
    """
    if not params.valid.any():
        raise TargetError("no face found in any frame of the video: cannot choose a crop")
    boxes = face_boxes(params, model)
    h, w = (int(v) for v in params.image_size)
    side = float(np.max(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
    size = int(min(round(side * CROP_SCALE), h, w))
    cx = float(np.median((boxes[:, 0] + boxes[:, 2]) / 2))
    cy = float(np.median((boxes[:, 1] + boxes[:, 3]) / 2)) + CROP_RAISE * size
    x = int(np.clip(round(cx - size / 2), 0, w - size))
    y = int(np.clip(round(cy - size / 2), 0, h - size))
    return x, y, size


def crop_params(params: FaceParams, crop: tuple[int, int, int], resolution: int) -> FaceParams:
    """The same parameters seen through the S x S crop's camera (focal and principal point
    scaled and shifted; image_size (S, S))."""
    x, y, size = crop
    scale = resolution / size
    return replace(
        params,
        focal=params.focal * scale,
        principal_point=(params.principal_point - np.asarray([x, y], np.float32)) * scale,
        image_size=np.asarray([resolution, resolution]),
    )


def crop_frame(frame: np.ndarray, crop: tuple[int, int, int], resolution: int) -> np.ndarray:
    """Cut the square crop out of an RGB frame [H, W, 3] uint8 and resize it to [S, S, 3]."""
    x, y, size = crop
    patch = frame[y : y + size, x : x + size]
    if patch.shape[:2] != (size, size):
        raise TargetError(f"frame of shape {frame.shape} does not hold the crop {crop}")
    interp = cv2.INTER_AREA if size > resolution else cv2.INTER_LINEAR
    return cv2.resize(patch, (resolution, resolution), interpolation=interp)


class _StagedFrames(Sequence[np.ndarray]):
    """The cropped frames written so far, read back from the staging folder on demand; when
    read in order (frame i, then i + 1), the next `ahead` frames are decoded beforehand on
    `pool`'s threads (Pillow's PNG decoder releases the GIL)."""

    def __init__(self, writer: TargetWriter, pool: ThreadPoolExecutor, ahead: int) -> None:
        self.writer = writer
        self.pool = pool
        self.ahead = ahead
        self.last = -2
        self.reads: dict[int, Future[np.ndarray]] = {}

    def __len__(self) -> int:
        return self.writer.n_frames

    def _path(self, index: int) -> Path:
        return self.writer.staging / "frames" / frame_name(index)

    def __getitem__(self, index):  # type: ignore[no-untyped-def, override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = int(index)
        in_order, self.last = index == self.last + 1, index
        for old in [i for i in self.reads if i < index]:
            self.reads.pop(old).cancel()
        if in_order:
            for i in range(index + 1, min(index + 1 + self.ahead, len(self))):
                if i not in self.reads:
                    self.reads[i] = self.pool.submit(read_png, self._path(i))
        read = self.reads.pop(index, None)
        return read.result() if read is not None else read_png(self._path(index))


class _Timed(Iterator[np.ndarray]):
    """`frames` with the seconds spent getting them (decoding) summed in `seconds`."""

    def __init__(self, frames: Iterable[np.ndarray]) -> None:
        self.frames = iter(frames)
        self.seconds = 0.0

    def __next__(self) -> np.ndarray:
        start = time.perf_counter()
        try:
            return next(self.frames)
        finally:
            self.seconds += time.perf_counter() - start


def write_crops(writer: TargetWriter, frames: Iterable[np.ndarray], crop: tuple[int, int, int],
                resolution: int, threads: int = 0,
                progress: Callable[[int], None] | None = None) -> float:
    """Add the S x S crops of `frames` (RGB [H, W, 3] uint8, in order) to `writer`: `frames`
    consumed in this thread, cropped and resized on `threads` threads, their PNGs written on
    as many (0: auto, 1: all one after another in this thread). Returns the seconds spent
    waiting for `frames` (decoding, when they come from a video)."""
    decoded = _Timed(frames)
    crops = ordered_map(lambda frame: crop_frame(frame, crop, resolution), decoded, threads)
    writer.add_frames(crops, threads, progress)
    return decoded.seconds


@dataclass(frozen=True)
class PrepareSettings:
    """What `prepare_target` needs besides the frames: see `dvp prepare --help`."""

    consent: str
    source_video: str
    source_sha256: str
    fps: float
    resolution: int = 256
    window: int = 11
    preset: str = "tiny"
    albedo_size: int = 256
    photometric_steps: int = 200


def prepare_target(
    root: str | Path,
    params: FaceParams,
    frames: Iterable[np.ndarray],
    model: FaceModel,
    settings: PrepareSettings,
    device: torch.device | str = "cpu",
    progress: Callable[[str, int], None] | None = None,
    seconds: dict[str, float] | None = None,
    threads: int = 0,
) -> TargetDir:
    """Write the target directory `root` from a tracked video.

    params: the whole video's FaceParams in the source camera; frames: the same video's RGB
    frames [H, W, 3] uint8, in order. The crop is chosen from the parameters; `frames` is
    consumed in this thread while the frames are cropped and resized to S on `threads`
    threads and written as PNG on as many (generator.parallel.ordered_map, TargetWriter.
    add_frames; 0: auto, 1: one after another in this thread), albedo and per-frame lighting are fitted on the crop (the frames read back
    ahead on the same threads), and the neutral is estimated; everything is written aside
    and renamed into place. `seconds`, when given, receives the seconds of each stage:
    `crop_write` (choosing the crop, decoding, cropping and writing the frames), `decode` (the part of it spent
    waiting for `frames`), `albedo` (the photometric fit; its parts `albedo_keys`,
    `albedo_steps`, `albedo_lighting`: renderer.photometric.PhotometricFit.seconds) and
    `commit` (params, neutral, ranges, target.yaml, the rename).
    """
    if not settings.consent.strip():
        raise TargetError("--consent must record the consent of the person shown in the video")
    if params.frames < settings.window:
        raise TargetError(f"the video has {params.frames} frames, fewer than the window of "
                          f"{settings.window}: a target needs at least {settings.window}")
    note = progress or (lambda stage, n: None)
    times = seconds if seconds is not None else {}
    threads = threads_for(threads)
    start = time.perf_counter()
    crop = choose_crop(params, model)
    cropped = crop_params(params, crop, settings.resolution)
    with TargetWriter(root) as writer, ThreadPoolExecutor(threads) as pool:
        times["decode"] = write_crops(writer, frames, crop, settings.resolution, threads,
                                      lambda n: note("crop", n))
        times["crop_write"] = time.perf_counter() - start
        if writer.n_frames != params.frames:
            raise TargetError(f"the video gave {writer.n_frames} frames on the second read, "
                              f"{params.frames} on the first")
        start = time.perf_counter()
        fit = fit_photometric(model, cropped, _StagedFrames(writer, pool, 2 * threads),
                              settings.albedo_size, settings.photometric_steps, device=device,
                              progress=lambda i, n: note("albedo", 1))
        times["albedo"] = time.perf_counter() - start
        times.update({f"albedo_{key}": value for key, value in fit.seconds.items()})
        start = time.perf_counter()
        cropped = replace(cropped, sh=fit.sh.astype(np.float32))
        writer.write_params(cropped)
        writer.write_albedo(fit.albedo_uint8())
        neutral = Neutral.from_params(cropped)
        neutral.save(writer.staging / "neutral.npz")
        holdout_start = holdout_start_for(params.frames)
        ranges = training_ranges(cropped, neutral, holdout_start)
        if ranges is not None:
            ranges.save(writer.staging / "ranges.npz")
        info = TargetInfo(
            source_video=settings.source_video, source_sha256=settings.source_sha256,
            crop=crop, resolution=settings.resolution, window=settings.window,
            preset=settings.preset, holdout_start=holdout_start,
            frames=params.frames, fps=settings.fps, consent=settings.consent,
            software=software_versions())
        target = writer.commit(info)
        times["commit"] = time.perf_counter() - start
        return target
