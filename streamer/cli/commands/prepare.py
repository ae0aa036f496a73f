"""`dvp prepare VIDEO -o TDIR --consent TEXT [--res S]`: a target directory from a video."""

from __future__ import annotations

import argparse
from pathlib import Path

from tqdm import tqdm

from streamer.cli.config import Config
from streamer.cli.messages import add_strict, warn
from tracker.errors import DvpError


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", metavar="VIDEO", help="video of the target actor (1-10 minutes)")
    p.add_argument("-o", "--output", required=True, metavar="TDIR",
                   help="target directory to create (must not exist)")
    p.add_argument("--consent", required=True, metavar="TEXT",
                   help="the consent of the person shown, recorded in target.yaml")
    p.add_argument("--res", type=int, default=None, choices=[256, 512], metavar="S",
                   help="portrait size S in pixels: 256 or 512 (default: renderer.resolution)")
    p.add_argument("--preset", choices=["tiny", "paper"], default=None,
                   help="generator preset recorded for training (default: generator.preset)")
    p.add_argument("--focal", type=float, metavar="PX",
                   help="the camera's focal length in pixels, when known (default: fitted)")
    add_strict(p)


def _prepare(args: argparse.Namespace, config: Config) -> int:
    from generator.prepare import PrepareSettings, prepare_target
    from generator.target import file_sha256
    from streamer.jobs.coverage import Coverage, check_coverage
    from streamer.jobs.tracking import track_video
    from streamer.video.io import read_frames
    from tracker.device import pick_device

    try:
        device = pick_device(args.device)
    except (RuntimeError, ValueError) as err:
        raise DvpError(str(err)) from err
    video, out = Path(args.video), Path(args.output)
    if out.exists():
        raise DvpError(f"{out} already exists: choose a new target directory")
    if not args.consent.strip():
        raise DvpError("--consent must record the consent of the person shown in the video")
    tracked = track_video(video, config, device, focal=args.focal)
    warning = check_coverage(
        Coverage.of(tracked.info, tracked.params.frames, int(tracked.params.valid.sum())),
        args.strict, "marked invalid in params.npz")
    if warning:
        warn(warning)
    settings = PrepareSettings(
        consent=args.consent, source_video=str(video.resolve()),
        source_sha256=file_sha256(video), fps=tracked.info.fps,
        resolution=args.res or config.renderer.resolution, window=config.renderer.window,
        preset=args.preset or config.generator.preset,
        albedo_size=config.renderer.albedo_size,
        photometric_steps=config.renderer.photometric_steps)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            total = (tracked.params.frames if stage == "crop"
                     else settings.photometric_steps)
            bars[stage] = tqdm(total=total, desc=stage, unit="step", leave=False)
        bars[stage].update(n)

    try:
        target = prepare_target(out, tracked.params,
                                (frame for frame, _ in read_frames(video)), tracked.model,
                                settings, device, progress)
    finally:
        for bar in bars.values():
            bar.close()
    print(target.root)
    return 0


COMMANDS = {
    "prepare": (("make a target directory from a video of the target actor: track every "
                 "frame, crop head and shoulders, fit albedo and lighting"), True, _add, _prepare),
}
