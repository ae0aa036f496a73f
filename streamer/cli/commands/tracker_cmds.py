"""`dvp track VIDEO -o PARAMS.npz [--overlay OUT.mp4]`: face parameters of every frame."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from streamer.cli.config import Config
from streamer.cli.messages import add_strict, command_device, warn
from streamer.video.io import VideoWriter, read_frames
from tracker.errors import DvpError

log = logging.getLogger(__name__)


def _add_track(p: argparse.ArgumentParser) -> None:
    p.add_argument("video", metavar="VIDEO", help="video file with a face")
    p.add_argument("-o", "--output", required=True, metavar="PARAMS.npz",
                   help="face parameters (DESIGN.md's .npz; valid=False where no face)")
    p.add_argument("--overlay", metavar="OUT.mp4",
                   help="also write the video with the fitted mesh drawn over it")
    p.add_argument("--focal", type=float, metavar="PX",
                   help="the camera's focal length in pixels, when known (default: fitted)")
    p.add_argument("--max-frames", type=int, metavar="N", help="only the first N frames")
    add_strict(p)


def _track(args: argparse.Namespace, config: Config) -> int:
    from streamer.jobs.coverage import Coverage, check_coverage
    from streamer.jobs.tracking import track_video
    from tracker.fitting import LandmarkModel, params_landmarks
    from tracker.overlay import draw_fit

    device = command_device(args.device)
    if args.max_frames is not None and args.max_frames < 1:
        raise DvpError(f"--max-frames must be at least 1, got {args.max_frames}")
    if args.focal is not None and not args.focal > 0:
        raise DvpError(f"--focal must be a positive number of pixels, got {args.focal}")
    video, output = Path(args.video), Path(args.output)
    overlay = Path(args.overlay) if args.overlay else None
    if overlay is not None and not overlay.parent.is_dir():
        raise DvpError(f"cannot write {overlay}: directory {overlay.parent} does not exist")
    tracked = track_video(video, config, device, args.max_frames, args.focal)
    info, model, params = tracked.info, tracked.model, tracked.params
    landmarks, frames = tracked.landmarks, tracked.frames
    found = int(np.sum(params.valid))
    warning = check_coverage(Coverage.of(info, params.frames, found, args.max_frames),
                             args.strict, "saved with valid = False")
    params.save(output)
    if warning:
        warn(warning)
    log.info("%d of %d frames with a face; focal %.1f px", found, params.frames,
             float(params.focal[0]))
    if overlay is not None:
        fitted = params_landmarks(LandmarkModel(model), params, device)
        with VideoWriter(overlay, fps=info.fps, metadata={"comment": "dvp track overlay"}) \
                as writer, tqdm(total=len(frames), desc="overlay", unit="frame",
                                leave=False) as bar:
            for (image, t), lm, fit, pts in zip(read_frames(video, len(frames)), landmarks,
                                                frames, fitted):
                res = f"{fit.residual_px:.2f} px" if fit.valid else ""
                writer.write(draw_fit(image, pts, lm.points, fit.valid, f"t={t:.2f}s {res}"), t)
                bar.update(1)
    print(output)
    if overlay is not None:
        print(overlay)
    return 0


_HELP = ("fit the face model to every frame of a video: face parameters (.npz) and an "
         "optional overlay video")

COMMANDS = {
    "track": (_HELP, True, _add_track, _track),
}
