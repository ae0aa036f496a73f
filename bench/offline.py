"""Offline benchmarks: `dvp prepare` and `dvp reenact` through their product code paths,
printed as JSON (never a timed test), with the frame-at-a-time baselines of the same run.

1. **prepare**: the first `--target-frames` frames of `--target-video` (written to a
   temporary mp4 first) through `streamer.jobs.prepare.prepare_video` (what `dvp prepare`
   runs: landmarks, the offline fit of the chunks batched, crop, albedo and lighting) with
   `--prepare-landmarks` (default mediapipe: over CPU worker processes), frames per second
   and seconds per stage; baseline: the same video's landmarks in one process
   (`streamer.landmark_workers=1`), as before.
2. **reenact**: the prepared target with an untrained `--preset` generator (speed does not
   depend on the weights) at `--res`, driven by the first `--source-frames` frames of
   `--source-video`, through `streamer.jobs.reenact.reenact_video` (what `dvp reenact`
   runs: batched; landmarks as the config says, `auto`: the torch backend on CUDA), twice (the second run warm, and checked to give the same frames);
   baseline: `reenact_serial` (every frame through the live `LivePipeline.process`, batch 1,
   as `dvp reenact` ran before) on the first `--serial-frames` frames.

Usage: python bench/offline.py [--device auto|cpu|cuda] [--res 256] [--preset paper]
       [--target-frames 1510] [--source-frames 1337] [--serial-frames 300]
       [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.media import find_media
from streamer.cli.config import Config, load_config
from streamer.live.process import apply_process_settings
from streamer.video.io import VideoWriter, probe, read_frames


def machine(device: torch.device) -> dict[str, Any]:
    from streamer.jobs.landmarks import usable_cores

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "usable_cores": usable_cores(),
            "load_average_1min": round(load[0], 2), "python": platform.python_version(),
            "torch": str(torch.__version__), "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def clip(video: Path, frames: int, out: Path) -> Path:
    """The first `frames` frames of `video` as an mp4 (timing kept)."""
    info = probe(video)
    with VideoWriter(out, fps=info.fps, crf=12, preset="veryfast") as writer:
        for frame, t in read_frames(video, frames):
            writer.write(frame, t)
    return out


def add_generator(root: Path, size: int, n_w: int, preset: str) -> None:
    """An untrained generator checkpoint of `preset` in the target directory."""
    from generator.checkpoint import save_checkpoint
    from generator.config import PRESETS
    from generator.unet import UNet

    torch.manual_seed(0)
    model = UNet(size=size, n_w=n_w, ngf=PRESETS[preset].ngf)
    save_checkpoint(root / "checkpoints", {"step": 0, "generator": {
        "shape": model.shape(), "state": model.state_dict()}})


def frames_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for frame, _ in read_frames(path):
        digest.update(frame.tobytes())
    return digest.hexdigest()[:16]


def bench_prepare(video: Path, work: Path, config: Config, device: torch.device,
                  res: int) -> tuple[dict[str, Any], Path]:
    from streamer.jobs.landmarks import video_landmarks
    from streamer.jobs.prepare import prepare_video

    frames = probe(video).frame_count
    start = time.perf_counter()
    prepared = prepare_video(video, work / "target", "benchmark: public test clip", config,
                             device, resolution=res, progress=False)
    landmarks_backend = config.tracker.landmarks
    wall = time.perf_counter() - start
    one = load_config(None, ["streamer.landmark_workers=1"])
    one.tracker = config.tracker
    start = time.perf_counter()
    video_landmarks(video, one, device, frames)
    single = time.perf_counter() - start
    seconds = prepared.seconds
    return {
        "frames": prepared.tracked.params.frames,
        "seconds": round(wall, 2),
        "frames_per_second": round(prepared.tracked.params.frames / wall, 1),
        "seconds_per_stage": {k: round(v, 2) for k, v in seconds.items()},
        "landmarks": landmarks_backend,
        "landmark_workers": prepared.tracked.workers,
        "landmarks_frames_per_second": round(frames / seconds["landmarks"], 1),
        "fit_frames_per_second": round(frames / seconds["fit"], 1),
        "baseline_landmarks_one_process": {"seconds": round(single, 2),
                                           "frames_per_second": round(frames / single, 1)},
        "target_frames_per_second": 100,
    }, prepared.target.root


def bench_reenact(root: Path, source: Path, work: Path, config: Config, device: torch.device,
                  serial_frames: int) -> dict[str, Any]:
    from streamer.jobs.reenact import reenact_serial, reenact_video
    from streamer.live.stages import LoadedTarget, make_session_stages

    target = LoadedTarget(root, config, device)
    runs = []
    for k in range(2):
        out = work / f"reenact-{k}.mp4"
        runs.append(reenact_video(target, source, out, config, progress=False))
    same = frames_digest(work / "reenact-0.mp4") == frames_digest(work / "reenact-1.mp4")
    serial = reenact_serial(target, source, work / "serial.mp4", config,
                            stages=lambda: make_session_stages(target, config),
                            progress=False, max_frames=serial_frames)
    return {
        "backend": target.backend, "size": target.size,
        "first_run": runs[0], "second_run": runs[1], "same_frames_both_runs": same,
        "baseline_frame_at_a_time": serial,
        "speedup": round(runs[1]["frames_per_second"] / serial["frames_per_second"], 2),
        "target_frames_per_second": 300,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--res", type=int, default=256)
    parser.add_argument("--preset", default="paper")
    parser.add_argument("--target-video", type=Path, default=find_media("franck_talking_200s.webm"))
    parser.add_argument("--target-frames", type=int, default=1510)
    parser.add_argument("--source-video", type=Path, default=find_media("webcam_driver_53s.mp4"))
    parser.add_argument("--source-frames", type=int, default=1337)
    parser.add_argument("--serial-frames", type=int, default=300)
    parser.add_argument("--prepare-landmarks", default="mediapipe",
                        choices=["auto", "mediapipe", "torch"],
                        help="landmark backend of the prepare run (default mediapipe, the "
                             "issue's figure; the reenact runs use the config's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    from tracker.device import pick_device

    device = pick_device(args.device)
    config = load_config(None, [f"generator.preset={args.preset}", *args.overrides])
    from tracker.assets import load_face_model
    from tracker.regressor import load_or_train, settings_from_config

    # as `dvp assets install` does: the regressor is trained (once) before anything is timed
    load_or_train(load_face_model(), settings_from_config(config.tracker))
    with tempfile.TemporaryDirectory(prefix="dvp-bench-offline-") as tmp:
        work = Path(tmp)
        target_video = clip(args.target_video, args.target_frames, work / "target.mp4")
        source_video = clip(args.source_video, args.source_frames, work / "source.mp4")
        # the figure: MediaPipe's landmarks spread over the host's cores
        mediapipe = replace(config, tracker=replace(config.tracker,
                                                    landmarks=args.prepare_landmarks))
        prepare, root = bench_prepare(target_video, work, mediapipe, device, args.res)
        add_generator(root, args.res, config.renderer.window, args.preset)
        apply_process_settings(config)  # as `dvp reenact` does (`dvp prepare` does not)
        reenact = bench_reenact(root, source_video, work, config, device, args.serial_frames)
    print(json.dumps({"bench": "offline", "machine": machine(device), "preset": args.preset,
                      "resolution": args.res, "reenact_batch": config.streamer.reenact_batch,
                      "prepare": prepare, "reenact": reenact}, indent=2))


if __name__ == "__main__":
    main()
