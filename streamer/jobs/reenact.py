"""Offline reenactment (`dvp reenact`): a source video drives a target, frame by frame.

Every source frame goes through the same `LivePipeline.process` as live frames (nothing is
dropped offline), at the source's own timestamps, so the window is sampled as it would be
live. The source is tracked as a whole first (`replay_stages`): its neutral and its spread
(for the range adaptation) come from all of it. With a `RetrackReport`
(streamer.jobs.retrack) every generated frame is tracked again and compared with what was
asked for (`dvp reenact --report`). The output keeps the source's timing and audio and is tagged as synthetic.

Layouts:
- default: the reenacted S x S portrait;
- `side_by_side`: source (scaled to S high) | colour conditioning | output;
- `full_frame`: the portrait pasted back into the target's own video (`source_video` of
  target.yaml, whose SHA-256 must match) at the crop box, with a feathered edge; the target
  video plays forward in a loop behind it, by timestamp.

The visible "synthetic" mark goes on the output panel (the whole frame in `full_frame`),
unless `streamer.synthetic_mark` is off.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from streamer.cli.config import Config
from streamer.jobs.coverage import Coverage, check_coverage
from streamer.live.controls import MODES, Controls
from streamer.live.pipeline import LivePipeline, SessionStages
from streamer.video.io import VideoWriter, probe, read_frames
from streamer.video.mark import SYNTHETIC_METADATA, draw_synthetic_mark
from tracker.errors import DvpError

log = logging.getLogger(__name__)

#: Width of the feathered edge of a pasted portrait, as a fraction of the crop's side.
FEATHER = 0.04


class ReenactError(DvpError):
    """A reenactment that cannot be made as asked (mode, full-frame video, sizes)."""


def resolve_source_video(target: Any) -> Path:
    """The target's own video (target.yaml `source_video`), checked against its SHA-256.

    A relative path is looked up from the working directory, then beside the target
    directory, then inside it. Raises ReenactError when it is missing or changed.
    """
    from generator.target import file_sha256

    recorded = Path(target.info.source_video)
    meta = target.root / "target.yaml"
    candidates = [recorded] if recorded.is_absolute() else \
        [recorded, target.root.parent / recorded, target.root / recorded]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ReenactError(f"--full-frame needs the target's source video, but "
                           f"{recorded} (source_video in {meta}) does not exist: put the "
                           "original video back at that path")
    digest = file_sha256(path)
    if digest != target.info.source_sha256:
        raise ReenactError(
            f"--full-frame: {path} has changed since 'dvp prepare' made {target.root} "
            f"(its sha256 is {digest[:16]}..., target.yaml records "
            f"{target.info.source_sha256[:16]}...): restore the original video")
    return path


class LoopingVideo:
    """Frames of a video by time, playing forward and starting over at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.info = probe(path)
        self.duration = max(self.info.duration, 1.0 / self.info.fps)
        self._frames: Iterator[tuple[np.ndarray, float]] = iter(())
        self._current: tuple[np.ndarray, float] | None = None
        self._next: tuple[np.ndarray, float] | None = None
        self._lap = -1

    def frame_at(self, t: float) -> np.ndarray:
        lap, local = divmod(max(0.0, t), self.duration)
        if lap != self._lap:
            self._lap = int(lap)
            self._frames = iter(read_frames(self.path))
            self._current = next(self._frames)
            self._next = next(self._frames, None)
        while self._next is not None and self._next[1] <= local:
            self._current, self._next = self._next, next(self._frames, None)
        assert self._current is not None
        return self._current[0]


def feather_mask(size: int) -> np.ndarray:
    """`(size, size, 1)` float32 weights: 1 inside, ramping to 0 over the edge."""
    ramp = max(1, round(FEATHER * size))
    d = np.minimum(np.arange(size), np.arange(size)[::-1]).astype(np.float32)
    edge = np.clip((d + 0.5) / ramp, 0.0, 1.0)
    return np.minimum(edge[:, None], edge[None, :])[..., None]


def paste(background: np.ndarray, portrait: np.ndarray, crop: tuple[int, int, int],
          mask: np.ndarray) -> np.ndarray:
    """`portrait` (S x S) scaled to the crop's side and blended into a copy of `background`
    at (x, y), clipped to the frame."""
    x, y, size = crop
    interp = cv2.INTER_AREA if portrait.shape[0] > size else cv2.INTER_LINEAR
    patch = cv2.resize(portrait, (size, size), interpolation=interp).astype(np.float32)
    out = background.copy()
    h, w = out.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + size, w), min(y + size, h)
    if x0 >= x1 or y0 >= y1:
        raise ReenactError(f"the crop box {crop} lies outside the target video's "
                           f"{w}x{h} frame")
    sub = (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))
    region = out[y0:y1, x0:x1].astype(np.float32)
    alpha = mask[sub]
    out[y0:y1, x0:x1] = np.round(alpha * patch[sub] + (1 - alpha) * region).astype(np.uint8)
    return out


def scale_to_height(rgb: np.ndarray, height: int) -> np.ndarray:
    """`rgb` resized to `height` rows, aspect kept, width rounded to even."""
    h, w = rgb.shape[:2]
    width = max(2, round(w * height / h / 2) * 2)
    interp = cv2.INTER_AREA if h > height else cv2.INTER_LINEAR
    return cv2.resize(rgb, (width, height), interpolation=interp)


def replay_stages(target: Any, source: Path, config: Config,
                  device: Any) -> Callable[[], SessionStages]:
    """Track the whole source video first (streamer.jobs.tracking.track_video, as `dvp
    prepare` tracks a target: identity and focal length over keyframes of all of it) and
    return a factory of session stages that replay those parameters frame by frame, with
    the source's neutral from its resting frames and its spread over the whole video
    (streamer.live.stages.make_session_stages(source=...)); no live re-tracking monitor."""
    from streamer.jobs.tracking import track_video
    from streamer.live.stages import make_session_stages

    params = track_video(source, config, device).params
    return lambda: make_session_stages(target, config, source=params, monitor=False)


def reenact_video(target: Any, source: Path, output: Path, config: Config,
                  stages: SessionStages | Any, mode: str = "full", side_by_side: bool = False,
                  full_frame: bool = False, progress: bool = True,
                  report: Any = None, strict: bool = False) -> dict[str, Any]:
    """Reenact `target` (a streamer.live.stages.LoadedTarget) with the face of `source` into
    `output`; returns a summary (frames, frames with a face, mean ms per stage, size,
    `warning`: the partial-result sentence of streamer.jobs.coverage, or None, and with
    `report` its figures as `retrack`).

    `stages`: a SessionStages, or a callable making one. `report`: a
    streamer.jobs.retrack.RetrackReport that re-tracks every generated frame, or None.
    `strict`: a source not decoded whole, or frames without a face, raise
    PartialResultError and nothing is written.
    Raises ReenactError, VideoError.
    """
    if mode not in MODES:
        raise ReenactError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")
    if side_by_side and full_frame:
        raise ReenactError("--side-by-side and --full-frame exclude each other: pick one")
    info = probe(source)
    background = LoopingVideo(resolve_source_video(target)) if full_frame else None
    mark = config.streamer.synthetic_mark
    # the pipeline leaves marking to the composition below (the mark goes on the output)
    inner = replace(config, streamer=replace(config.streamer, synthetic_mark=False))
    pipeline = LivePipeline(target, stages, inner, name="reenact",
                            eyelook=getattr(target, "eyelook", None),
                            eyelook_index=getattr(target, "eyelook_index", None),
                            keep_conditioning=side_by_side)
    pipeline.set_controls(Controls(mode=mode))
    mask = feather_mask(target.info.crop[2]) if full_frame else None
    faces = 0
    totals: dict[str, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=info.frame_count, desc="reenact", unit="frame", leave=False)
    try:
        audio = source if info.has_audio else None
        with VideoWriter(output, fps=info.fps, audio_from=audio,
                         metadata=SYNTHETIC_METADATA) as writer:
            for rgb, t in read_frames(source):
                out = pipeline.process(rgb, t)
                faces += out.face
                if report is not None:  # the output as generated, before any mark
                    report.add(out.image, out.params)
                for key, value in out.stage_ms.items():
                    totals[key] = totals.get(key, 0.0) + value
                if background is not None and mask is not None:
                    frame = paste(background.frame_at(t), out.image, target.info.crop, mask)
                    if mark:
                        draw_synthetic_mark(frame)
                elif side_by_side:
                    assert out.conditioning is not None
                    left = scale_to_height(rgb, out.image.shape[0])
                    frame = np.concatenate([left, out.conditioning, out.image], axis=1)
                    if mark:
                        draw_synthetic_mark(frame[:, -out.image.shape[1]:])
                else:
                    frame = out.image
                    if mark:
                        draw_synthetic_mark(frame)
                del rgb
                writer.write(np.ascontiguousarray(frame), t)
                if bar is not None:
                    bar.update(1)
            frames = writer.frames_written
            shape = frame.shape if frames else None
            warning = check_coverage(Coverage.of(info, frames, faces), strict,
                                     "they show the target at rest")
    finally:
        if bar is not None:
            bar.close()
        pipeline.close()
    log.info("reenacted %d frames (%d with a face) into %s", frames, faces, output)
    summary = {"frames": frames, "faces": faces,
               "stage_ms": {k: round(v / max(frames, 1), 2) for k, v in totals.items()},
               "size": list(shape[:2]) if shape else None, "output": str(output),
               "warning": warning}
    if report is not None and frames:
        summary["retrack"] = report.result()
    return summary
