"""`dvp prepare VIDEO -o TDIR --consent TEXT [--res S]`: a target directory from a video."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from streamer.cli.config import Config
from streamer.cli.messages import add_strict, command_device, warn
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
    from streamer.jobs.prepare import prepare_video

    device = command_device(args.device)
    video, out = Path(args.video), Path(args.output)
    if out.exists():
        raise DvpError(f"{out} already exists: choose a new target directory")
    if not args.consent.strip():
        raise DvpError("--consent must record the consent of the person shown in the video")
    prepared = prepare_video(video, out, args.consent, config, device, args.res, args.preset,
                             args.focal, strict=args.strict, warn=warn)
    print(prepared.summary(process_seconds()), file=sys.stderr, flush=True)
    print(prepared.target.root)
    return 0


def process_seconds() -> float | None:
    """Seconds since this process started (Linux: /proc), so that a command's summary counts
    the interpreter's start and imports too; None where that cannot be read."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


COMMANDS = {
    "prepare": (("make a target directory from a video of the target actor: track every "
                 "frame, crop head and shoulders, fit albedo and lighting"), True, _add, _prepare),
}
