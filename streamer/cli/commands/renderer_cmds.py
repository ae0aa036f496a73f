"""`dvp synth` (a synthetic actor with ground truth) and `dvp render` (conditioning images).

`dvp synth -o DIR [--frames N] [--res S] [--seed K] [--fps F] [--still SECONDS]` writes
`DIR/video.mp4` and `DIR/params.npz` (ground truth: valid, timestamps at F fps, the S x S
camera; each actor has its own focal length, 0.9-2.2 S, and lighting). `--still` holds the
actor still for that long in the middle of the clip (for jitter at rest).

`dvp render PARAMS.npz -o COND.mp4 [--target TDIR] [--res S]` writes the colour,
correspondence and gaze images side by side (3S x S) at the params' timestamps; the albedo is
the target's (`--target`), else plain grey.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from tqdm import tqdm

from streamer.cli.config import Config
from streamer.cli.messages import command_device
from streamer.video.io import VideoWriter
from tracker.errors import DvpError

log = logging.getLogger(__name__)


def _add_synth(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory (created): video.mp4 and params.npz")
    p.add_argument("--frames", type=int, default=100, metavar="N",
                   help="number of frames (default: 100)")
    p.add_argument("--res", type=int, default=256, metavar="S",
                   help="frame size S x S in pixels (default: 256)")
    p.add_argument("--seed", type=int, default=0, metavar="K",
                   help="seed of the actor's identity, look and motion (default: 0)")
    p.add_argument("--fps", type=float, default=25.0, metavar="F",
                   help="frame rate (default: 25)")
    p.add_argument("--still", type=float, default=0.0, metavar="SECONDS",
                   help="hold head, face and eyes still this long mid-clip (default: 0)")


def _synth(args: argparse.Namespace, config: Config) -> int:
    from renderer.synth import SynthActor
    from tracker.assets import load_face_model

    if args.frames <= 0:
        raise DvpError(f"--frames must be positive, got {args.frames}")
    if args.res < 16:
        raise DvpError(f"--res must be at least 16, got {args.res}")
    if not args.fps > 0:
        raise DvpError(f"--fps must be positive, got {args.fps}")
    if not 0.0 <= args.still < args.frames / args.fps:
        raise DvpError(f"--still must be at least 0 and shorter than the clip "
                       f"({args.frames / args.fps:.2f} s), got {args.still}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device = command_device(args.device)
    model = load_face_model()
    actor = SynthActor(model, seed=args.seed, size=args.res, device=device)
    params = actor.motion(args.frames, args.fps, still_seconds=args.still)
    meta = {"comment": f"dvp synth: synthetic actor, seed {args.seed} (ground truth)"}
    batch = 8
    with VideoWriter(out / "video.mp4", args.fps, metadata=meta) as writer, \
            tqdm(total=params.frames, desc="synth", unit="frame", leave=False) as bar:
        for start in range(0, params.frames, batch):
            sel = np.arange(start, min(start + batch, params.frames))
            frames = actor.render(params.select(sel), batch=batch)
            for k, i in enumerate(sel):
                writer.write(frames[k], float(i) / args.fps)
            bar.update(len(sel))
    params.save(out / "params.npz")
    print(out)
    return 0


def _add_render(p: argparse.ArgumentParser) -> None:
    p.add_argument("params", metavar="PARAMS.npz", help="face parameters (dvp track, synth)")
    p.add_argument("-o", "--output", required=True, metavar="COND.mp4",
                   help="output video: colour | correspondence | gaze side by side")
    p.add_argument("--target", metavar="TDIR",
                   help="target directory whose albedo to use (default: plain grey)")
    p.add_argument("--res", type=int, metavar="S",
                   help="size S of each image (default: the target's, else "
                        "renderer.resolution)")


def _fps_of(timestamps: np.ndarray) -> float:
    if len(timestamps) < 2:
        return 25.0
    step = float(np.median(np.diff(timestamps.astype(np.float64))))
    return 1.0 / step if step > 0 else 25.0


def _render(args: argparse.Namespace, config: Config) -> int:
    from renderer.conditioning import ConditioningRenderer
    from tracker.assets import load_face_model
    from tracker.params import FaceParams

    params = FaceParams.load(args.params)
    albedo = None
    size = args.res
    fps = _fps_of(params.timestamps)
    if args.target:
        from generator.target import TargetDir

        target = TargetDir(args.target)
        albedo = target.albedo()
        size = size or int(target.info.resolution)
        fps = float(target.info.fps)
    size = int(size or config.renderer.resolution)
    if size < 16:
        raise DvpError(f"--res must be at least 16, got {size}")
    if params.frames == 0:
        raise DvpError(f"{args.params}: no frames to render")
    device = command_device(args.device)
    renderer = ConditioningRenderer(load_face_model(), albedo, size, device,
                                    rasterizer=config.renderer.rasterizer)
    out = Path(args.output)
    if not out.parent.is_dir():
        raise DvpError(f"cannot write {out}: directory {out.parent} does not exist")
    times = params.timestamps.astype(np.float64)
    times = times - times[0]
    batch = renderer.batch
    last = -1.0
    with VideoWriter(out, fps) as writer, \
            tqdm(total=params.frames, desc="render", unit="frame", leave=False) as bar:
        for start in range(0, params.frames, batch):
            sel = np.arange(start, min(start + batch, params.frames))
            cond = renderer.frames(params, sel)  # B,9,S,S
            row = cond.reshape(len(sel), 3, 3, size, size).permute(0, 3, 1, 4, 2)
            row = row.reshape(len(sel), size, 3 * size, 3)
            images = (row.clamp(0, 1) * 255.0 + 0.5).byte().cpu().numpy()
            for k, i in enumerate(sel):
                t = max(float(times[i]), last + 1e-3)
                writer.write(images[k], t)
                last = t
            bar.update(len(sel))
    print(out)
    return 0


COMMANDS = {
    "synth": ("render a synthetic actor with ground-truth parameters", True, _add_synth,
              _synth),
    "render": ("render the conditioning images (colour | correspondence | gaze) side by side",
               True, _add_render, _render),
}
