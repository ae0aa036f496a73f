"""Offline reenactment (`dvp reenact`): a source video drives a target, in batches.

`reenact_video` (what `dvp reenact` runs) works on the whole video, stage by stage:

1. **track** the source as `dvp prepare` tracks a target (`streamer.jobs.tracking.
   track_video`: landmarks over CPU worker processes, identity and focal length calibrated
   over keyframes of the whole video, then the per-frame fit), so two runs give the same
   output;
2. **transfer** onto the target frame by frame with the session stages of an offline
   source (`make_session_stages(source=...)`: the live `TransferStage` with the source's
   neutral and spread taken from the whole video, the target's frames played along, its
   ranges, the mode), and the live path's easing where the source has no face;
3. **render, window, generator** in batches of `streamer.reenact_batch` frames on the
   device (`ConditioningRenderer.frames`, the DESIGN window rule by timestamp through
   `window_indices` + `stack_window`, the runtime's batch axis), keeping only the
   conditioning the next windows need (memory stays bounded on long videos);
4. **output** (mark, layout, H.264 encoding) in a writer thread beside the GPU work.

`reenact_serial` is the frame-at-a-time reference: every frame through the live
`LivePipeline.process` (live tracking and calibration, batch 1), kept as the baseline of
bench/offline.py. Both keep the source's timing and audio and tag the file as synthetic;
with a `RetrackReport` (streamer.jobs.retrack) every generated frame is tracked again and
compared with what was asked for (`dvp reenact --report`).

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
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from tqdm import tqdm

from renderer.conditioning import stack_window, window_indices
from streamer.cli.config import Config
from streamer.jobs.coverage import Coverage, check_coverage
from streamer.jobs.tracking import track_video
from streamer.live.controls import MODES, Controls
from streamer.live.pipeline import FaceLossEasing, LivePipeline, SessionStages
from streamer.video.io import VideoWriter, probe, read_frames
from streamer.video.mark import SYNTHETIC_METADATA, draw_synthetic_mark
from tracker.errors import DvpError
from tracker.params import FaceParams

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


class Layout:
    """The output frame of one reenacted portrait: the layout and the "synthetic" mark (see
    the module doc); shared by the batched and the frame-at-a-time paths."""

    def __init__(self, target: Any, config: Config, side_by_side: bool = False,
                 full_frame: bool = False) -> None:
        self.side_by_side, self.full_frame = side_by_side, full_frame
        self.mark = config.streamer.synthetic_mark
        self.crop = tuple(target.info.crop) if full_frame else None
        self.background = LoopingVideo(resolve_source_video(target)) if full_frame else None
        self.mask = feather_mask(int(target.info.crop[2])) if full_frame else None

    def __call__(self, image: np.ndarray, t: float, source: np.ndarray | None = None,
                 colour: np.ndarray | None = None) -> np.ndarray:
        """image: the portrait (S, S, 3) uint8 (not marked); t: its time, s; source: the
        source frame (side by side); colour: the colour conditioning (S, S, 3) uint8."""
        if self.background is not None and self.mask is not None and self.crop is not None:
            frame = paste(self.background.frame_at(t), image, self.crop, self.mask)  # type: ignore[arg-type]
            if self.mark:
                draw_synthetic_mark(frame)
        elif self.side_by_side:
            assert source is not None and colour is not None
            left = scale_to_height(source, image.shape[0])
            frame = np.concatenate([left, colour, image], axis=1)
            if self.mark:
                draw_synthetic_mark(frame[:, -image.shape[1]:])
        else:
            frame = image
            if self.mark:
                draw_synthetic_mark(frame)
        return np.ascontiguousarray(frame)


def _check(mode: str, side_by_side: bool, full_frame: bool) -> None:
    if mode not in MODES:
        raise ReenactError(f"unknown mode '{mode}': use one of {', '.join(MODES)}")
    if side_by_side and full_frame:
        raise ReenactError("--side-by-side and --full-frame exclude each other: pick one")


# ---- the batched path ----------------------------------------------------------------------
def retarget_video(target: Any, source: FaceParams, timestamps: list[float], config: Config,
                   controls: Controls, progress: Callable[[int], None] | None = None
                   ) -> FaceParams:
    """The target's parameters (T frames) driven by the tracked source (T frames; `valid`
    False where it has no face) at `timestamps` (seconds, float64): the session stages of
    an offline source (streamer.live.stages.make_session_stages(source=...): the live
    TransferStage with the source's neutral and spread from the whole video) frame by
    frame, and the live easing where the face is lost. Raises TransferError when no frame
    has a face."""
    from streamer.live.stages import make_session_stages

    stages = make_session_stages(target, config, source=source, monitor=False)
    try:
        retarget = stages.retarget
        easing = FaceLossEasing(config.streamer.ease_seconds,
                                getattr(target, "eyelook", None),
                                getattr(target, "eyelook_index", None))
        valid = np.asarray(source.valid, bool)
        out = []
        for i, t in enumerate(timestamps):
            tracked = retarget(source.select([i]), controls) if valid[i] else None
            out.append(easing(tracked, retarget.rest(controls), float(t)))
            if progress is not None:
                progress(1)
    finally:
        stages.close()
    return FaceParams.concat(out)


@dataclass(frozen=True)
class Batch:
    """Reenacted frames `[start, start + n)`: images (n, S, S, 3) uint8 RGB (not marked);
    colour: the colour conditioning (n, S, S, 3) uint8 when asked for, else None."""

    start: int
    images: np.ndarray
    colour: np.ndarray | None


def generate_frames(target: Any, params: FaceParams, timestamps: list[float], batch: int,
                    keep_conditioning: bool = False, seconds: dict[str, float] | None = None
                    ) -> Iterator[Batch]:
    """Render, window and generate the target's frames in batches of `batch` on the
    target's device (module doc, step 3). `params` (T frames, the target's camera) at
    `timestamps` (T,) seconds; `seconds` (if given) gathers the time per stage ('render',
    'window', 'generator')."""
    if batch < 1:
        raise ReenactError(f"streamer.reenact_batch must be at least 1, got {batch}")
    times = np.asarray(timestamps, np.float64)
    total = len(times)
    device = target.device
    runtime = target.runtime
    spent = seconds if seconds is not None else {}
    history: torch.Tensor | None = None  # conditioning of frames [base, start)
    base = 0
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        n = stop - start
        tick = time.perf_counter()
        cond = target.conditioner.frames(params.select(np.arange(start, stop)))
        cond = cond.to(device, torch.float32)  # n,9,S,S
        _sync(device)
        tock = time.perf_counter()
        spent["render"] = spent.get("render", 0.0) + tock - tick
        frames = cond if history is None else torch.cat([history, cond])  # base..stop
        index = np.stack([window_indices(times, i, target.fps, target.n_w)
                          for i in range(start, stop)]) - base  # n,n_w
        if n < batch:  # one batch size: the runtime's graph is captured once
            index = np.concatenate([index, np.repeat(index[-1:], batch - n, 0)])
        windows = stack_window(frames, index.reshape(-1)).reshape(
            batch, -1, *frames.shape[2:])  # B,9*n_w,S,S
        keep = int(window_indices(times, stop, target.fps, target.n_w)[0]) \
            if stop < total else stop
        history, base = frames[keep - base:], keep
        _sync(device)
        tick = time.perf_counter()
        spent["window"] = spent.get("window", 0.0) + tick - tock
        images = runtime(windows.to(runtime.device, torch.float32))[:n].cpu().numpy()
        del windows
        colour = None
        if keep_conditioning:
            colour = np.stack([target.colour_image(c) for c in cond])
        spent["generator"] = spent.get("generator", 0.0) + time.perf_counter() - tick
        yield Batch(start, images, colour)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reenact_video(target: Any, source: Path, output: Path, config: Config, mode: str = "full",
                  side_by_side: bool = False, full_frame: bool = False,
                  progress: bool = True, report: Any = None,
                  strict: bool = False) -> dict[str, Any]:
    """Reenact `target` (a streamer.live.stages.LoadedTarget) with the face of `source` into
    `output`, in batches (module doc); returns a summary: frames, frames with a face,
    ms per frame of each stage, seconds per stage, frames per second, size, workers, and
    with `report` (a streamer.jobs.retrack.RetrackReport that re-tracks every generated
    frame) its figures as `retrack`; `warning`: the partial-result sentence of
    streamer.jobs.coverage (frames not decoded, or without a face), or None.

    Raises ReenactError, VideoError, TransferError (no face in the source),
    PartialResultError (`strict` and a partial result); nothing is written on an error.
    """
    _check(mode, side_by_side, full_frame)
    if config.streamer.reenact_batch < 1:
        raise ReenactError(f"streamer.reenact_batch must be at least 1, got "
                           f"{config.streamer.reenact_batch}")
    started = time.perf_counter()
    info = probe(source)
    layout = Layout(target, config, side_by_side, full_frame)  # checks the full-frame video
    tracked = track_video(source, config, target.device, progress=progress)
    times = [f.timestamp for f in tracked.frames]
    warning = check_coverage(Coverage.of(info, len(times), int(np.sum(tracked.params.valid))),
                             strict, "they show the target at rest")
    seconds = dict(tracked.seconds)
    tick = time.perf_counter()
    with tqdm(total=len(times), desc="transfer", unit="frame", leave=False,
              disable=not progress) as bar:
        params = retarget_video(target, tracked.params, times, config, Controls(mode=mode),
                                bar.update)
    seconds["transfer"] = time.perf_counter() - tick
    tick = time.perf_counter()
    frames, shape = _write(target, params, times, source, output, info, layout, config,
                           side_by_side, seconds, progress, report)
    seconds["generate_and_write"] = time.perf_counter() - tick
    wall = time.perf_counter() - started
    faces = int(np.sum(tracked.params.valid))
    log.info("reenacted %d frames (%d with a face) into %s in %.1f s", frames, faces, output,
             wall)
    summary = {"frames": frames, "faces": faces,
            "stage_ms": {k: round(1e3 * v / max(frames, 1), 2) for k, v in seconds.items()
                         if k != "generate_and_write"},
            "seconds": {k: round(v, 3) for k, v in seconds.items()},
            "wall_seconds": round(wall, 3),
            "frames_per_second": round(frames / wall, 2) if wall > 0 else None,
            "landmark_workers": tracked.workers,
            "batch": config.streamer.reenact_batch,
            "size": list(shape[:2]) if shape else None,
            "output": str(output), "warning": warning}
    if report is not None and frames:
        summary["retrack"] = report.result()
    return summary


_DONE = object()


class _Stopped(Exception):
    """The writer stops without a file: the generating thread failed."""


def _write(target: Any, params: FaceParams, times: list[float], source: Path, output: Path,
           info: Any, layout: Layout, config: Config, side_by_side: bool,
           seconds: dict[str, float], progress: bool, report: Any = None
           ) -> tuple[int, tuple[int, ...] | None]:
    """Generate in batches (this thread, the device) and write (a writer thread: layout,
    mark, encoding; the source's frames decoded there for side by side)."""
    batches: queue.Queue[Any] = queue.Queue(maxsize=4)  # bounded: memory stays flat
    failed: list[BaseException] = []
    stop = threading.Event()
    written: list[Any] = [0, None]
    write_bar = tqdm(total=len(times), desc="write", unit="frame", leave=False, position=1,
                     disable=not progress)

    def writer_thread() -> None:
        done = False
        try:
            spent = 0.0
            sources = read_frames(source) if side_by_side else None
            audio = source if info.has_audio else None
            with VideoWriter(output, fps=info.fps, audio_from=audio,
                             metadata=SYNTHETIC_METADATA) as writer:
                while True:
                    item = batches.get()
                    if item is _DONE:
                        done = True
                        break
                    if stop.is_set():
                        continue  # the generating thread failed: drain
                    tick = time.perf_counter()
                    for k in range(len(item.images)):
                        i = item.start + k
                        rgb = next(sources)[0] if sources is not None else None
                        colour = item.colour[k] if item.colour is not None else None
                        if report is not None:  # the output as generated, before any mark
                            report.add(item.images[k], params.select([i]))
                        frame = layout(item.images[k], times[i], rgb, colour)
                        written[1] = frame.shape
                        writer.write(frame, times[i])
                        write_bar.update(1)
                    spent += time.perf_counter() - tick
                if stop.is_set():
                    raise _Stopped  # leaves no file behind
                written[0] = writer.frames_written
            seconds["output"] = spent
        except _Stopped:
            pass
        except BaseException as err:  # noqa: BLE001 - reported by the generating thread
            failed.append(err)
            stop.set()
        finally:
            while not done:  # let the generating thread finish
                done = batches.get() is _DONE

    thread = threading.Thread(target=writer_thread, name="dvp-reenact-writer", daemon=True)
    thread.start()
    gen_bar = tqdm(total=len(times), desc="generate", unit="frame", leave=False, position=0,
                   disable=not progress)
    try:
        for item in generate_frames(target, params, times, config.streamer.reenact_batch,
                                    keep_conditioning=side_by_side, seconds=seconds):
            if stop.is_set():
                break
            batches.put(item)
            gen_bar.update(len(item.images))
    except BaseException:
        stop.set()
        raise
    finally:
        batches.put(_DONE)
        thread.join()
        gen_bar.close()
        write_bar.close()
    if failed:
        raise failed[0]
    return written[0], written[1]


# ---- the frame-at-a-time reference ---------------------------------------------------------
def reenact_serial(target: Any, source: Path, output: Path, config: Config,
                   stages: SessionStages | Any, mode: str = "full", side_by_side: bool = False,
                   full_frame: bool = False, progress: bool = True,
                   max_frames: int | None = None, report: Any = None,
                   strict: bool = False) -> dict[str, Any]:
    """Reenact frame by frame through the live `LivePipeline.process` (live tracking and
    calibration, batch 1): the reference `reenact_video` is measured against. `stages`: a
    SessionStages, or a callable making one. Returns a summary (frames, frames with a face,
    mean ms per stage, frames per second, size, `warning` as `reenact_video`). Raises
    ReenactError, VideoError, PartialResultError (`strict`).
    """
    _check(mode, side_by_side, full_frame)
    started = time.perf_counter()
    info = probe(source)
    layout = Layout(target, config, side_by_side, full_frame)
    # the pipeline leaves marking to the layout (the mark goes on the output)
    inner = replace(config, streamer=replace(config.streamer, synthetic_mark=False))
    pipeline = LivePipeline(target, stages, inner, name="reenact",
                            eyelook=getattr(target, "eyelook", None),
                            eyelook_index=getattr(target, "eyelook_index", None),
                            keep_conditioning=side_by_side)
    pipeline.set_controls(Controls(mode=mode))
    faces = 0
    totals: dict[str, float] = {}
    total = info.frame_count if max_frames is None else min(max_frames, info.frame_count)
    bar = tqdm(total=total, desc="reenact", unit="frame", leave=False, disable=not progress)
    shape = None
    try:
        audio = source if info.has_audio else None
        with VideoWriter(output, fps=info.fps, audio_from=audio,
                         metadata=SYNTHETIC_METADATA) as writer:
            for rgb, t in read_frames(source, max_frames):
                out = pipeline.process(rgb, t)
                faces += out.face
                if report is not None:  # the output as generated, before any mark
                    report.add(out.image, out.params)
                for key, value in out.stage_ms.items():
                    totals[key] = totals.get(key, 0.0) + value
                frame = layout(out.image, t, rgb, out.conditioning)
                shape = frame.shape
                del rgb
                writer.write(frame, t)
                bar.update(1)
            frames = writer.frames_written
            warning = check_coverage(Coverage.of(info, frames, faces, max_frames), strict,
                                     "they show the target at rest")
    finally:
        bar.close()
        pipeline.close()
    wall = time.perf_counter() - started
    log.info("reenacted %d frames (%d with a face) into %s", frames, faces, output)
    summary = {"frames": frames, "faces": faces,
               "stage_ms": {k: round(v / max(frames, 1), 2) for k, v in totals.items()},
               "wall_seconds": round(wall, 3),
               "frames_per_second": round(frames / wall, 2) if wall > 0 else None,
               "size": list(shape[:2]) if shape else None, "output": str(output),
               "warning": warning}
    if report is not None and frames:
        summary["retrack"] = report.result()
    return summary
