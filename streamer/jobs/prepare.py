"""`dvp prepare` as a function: a target video -> a target directory (generator.prepare),
with the video read here (track every frame, then the frames again for the crop)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from generator.prepare import PrepareSettings, prepare_target
from generator.target import TargetDir, file_sha256
from streamer.cli.config import Config
from streamer.jobs.coverage import Coverage, check_coverage
from streamer.jobs.tracking import TrackedVideo, track_video
from streamer.video.io import read_frames

log = logging.getLogger(__name__)


#: The stages of `PreparedTarget.seconds`, in order, as `summary` names them.
STAGES = {"setup": "setup", "landmarks": "landmarks", "fit": "fit", "refine": "refine",
          "crop_write": "crop+write", "albedo": "albedo", "commit": "commit"}
#: Parts of a stage that `summary` shows in brackets after it.
PARTS = {"crop_write": {"decode": "decode"},
         "albedo": {"albedo_keys": "keys", "albedo_steps": "steps",
                    "albedo_lighting": "lighting"}}


@dataclass(frozen=True)
class PreparedTarget:
    """A prepared target, its tracking, and the seconds per stage: `setup` (probe, face
    model, regressor), `landmarks`, `fit`, `refine` (when on), `crop_write` (decoding the
    video a second time, cropping and writing the frames), `decode` (the part of crop_write
    spent decoding), `albedo` (the albedo and lighting fit; its parts `albedo_keys`,
    `albedo_steps`, `albedo_lighting`), `commit` (params, neutral,
    ranges, target.yaml, the rename) and `total` (from the start of `prepare_video`)."""

    target: TargetDir
    tracked: TrackedVideo
    seconds: dict[str, float]

    def summary(self, process_seconds: float | None = None) -> str:
        """One line: `prepared T frames in X s (setup .., landmarks .., fit .., crop+write ..
        [decode ..], albedo .. [keys .., steps .., lighting ..], commit .., other ..)`; with `process_seconds` (the whole
        process's age) X is that, and `other` counts imports and start-up too."""
        s = self.seconds
        total = process_seconds if process_seconds is not None else s["total"]
        parts = []
        for key, name in STAGES.items():
            if key in s:
                inner = ", ".join(f"{part} {s[k]:.1f}"
                                  for k, part in PARTS.get(key, {}).items() if k in s)
                parts.append(f"{name} {s[key]:.1f}" + (f" [{inner}]" if inner else ""))
        other = total - sum(s[key] for key in STAGES if key in s)
        return (f"prepared {self.tracked.params.frames} frames in {total:.1f} s "
                f"({', '.join(parts)}, other {other:.1f})")


def prepare_video(video: Path, out: Path, consent: str, config: Config, device: torch.device,
                  resolution: int | None = None, preset: str | None = None,
                  focal: float | None = None, progress: bool = True, strict: bool = False,
                  warn: Callable[[str], None] | None = None) -> PreparedTarget:
    """Track `video`, then write the target directory `out` (generator.prepare.
    prepare_target). resolution, preset: default renderer.resolution, generator.preset.
    A partial result (frames not decoded, or without a face: streamer.jobs.coverage) is
    passed to `warn` before the target is written, or with `strict` raises
    PartialResultError and nothing is written."""
    entered = time.perf_counter()
    tracked = track_video(video, config, device, focal=focal, progress=progress)
    warning = check_coverage(
        Coverage.of(tracked.info, tracked.params.frames, int(tracked.params.valid.sum())),
        strict, "marked invalid in params.npz")
    if warning and warn is not None:
        warn(warning)
    settings = PrepareSettings(
        consent=consent, source_video=str(video.resolve()),
        source_sha256=file_sha256(video), fps=tracked.info.fps,
        resolution=resolution or config.renderer.resolution, window=config.renderer.window,
        preset=preset or config.generator.preset,
        albedo_size=config.renderer.albedo_size,
        photometric_steps=config.renderer.photometric_steps)
    bars: dict[str, tqdm] = {}

    def note(stage: str, n: int) -> None:
        if stage not in bars:
            total = (tracked.params.frames if stage == "crop"
                     else settings.photometric_steps)
            bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=False,
                               disable=not progress)
        bars[stage].update(n)

    seconds = dict(tracked.seconds)
    try:
        target = prepare_target(out, tracked.params,
                                (frame for frame, _ in read_frames(video)), tracked.model,
                                settings, device, note, seconds)
    finally:
        for bar in bars.values():
            bar.close()
    seconds["total"] = time.perf_counter() - entered
    prepared = PreparedTarget(target, tracked, seconds)
    log.info("%s", prepared.summary())
    return prepared
