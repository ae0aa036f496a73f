"""Does the photometric refinement help the picture? One target trained twice.

The first `--seconds` of a real video (default: ../shared/media/franck_talking_200s.webm)
are prepared twice with `dvp prepare`, once with landmark-only tracking
(`--set renderer.refine=false`) and once refined (`renderer.refine=true`); each target is
trained with `dvp train` for the same `--steps` and preset, and `dvp eval` measures both on
their held-out frames (the last 10 %, the same frames for both: the crop is chosen from the
tracking, so it may differ by a few pixels). Every step is the CLI itself, run as a
subprocess, in `--workdir` (kept; a step whose output is there is not run again, so an
interrupted run resumes).

Prints JSON: `landmark_only` and `refined` ({psnr, ssim, l1} of the model and the
baseline, as `dvp eval` prints them), `psnr_gain_db` (refined minus landmark-only), the
wall time of each step and the machine.

    python bench/refine_target.py --device cuda --seconds 60 --steps 3000 --preset paper
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.commands import dvp
from bench.media import find_media

DEFAULT_VIDEO = find_media("franck_talking_200s.webm")
CONSENT = "public test footage of the project (franck_talking_200s.webm), research use"


def cut(video: Path, seconds: float, out: Path) -> int:
    """The first `seconds` of `video` written to `out` (frames re-encoded); frame count."""
    from streamer.video.io import VideoWriter, probe, read_frames

    info = probe(video)
    n = round(seconds * info.fps)
    written = 0
    tmp = out.with_name(out.stem + ".part" + out.suffix)
    with VideoWriter(tmp, info.fps, metadata={"comment": f"first {seconds} s of {video.name}"}
                     ) as writer:
        for frame, t in read_frames(video, n):
            writer.write(frame, t)
            written += 1
    tmp.replace(out)
    return written


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    ap.add_argument("--seconds", type=float, default=60.0, help="first N seconds of the video")
    ap.add_argument("--steps", type=int, default=3000, help="training steps, both targets")
    ap.add_argument("--preset", default="paper", choices=["tiny", "paper"])
    ap.add_argument("--res", default="256", choices=["256", "512"])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    ap.add_argument("--workdir", type=Path, default=ROOT / "bench-refine-target")
    args = ap.parse_args()
    if not args.video.is_file():
        raise SystemExit(f"{args.video}: no such video")
    args.workdir.mkdir(parents=True, exist_ok=True)
    clip = args.workdir / "clip.mp4"
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    if not clip.is_file():
        cut(args.video, args.seconds, clip)
    seconds["cut"] = time.perf_counter() - t0
    results: dict[str, object] = {}
    for name, refine in (("landmark_only", "false"), ("refined", "true")):
        target = args.workdir / name
        sets = ["--set", f"renderer.refine={refine}"]
        t0 = time.perf_counter()
        if not (target / "target.yaml").is_file():
            dvp("prepare", str(clip), "-o", str(target), "--consent", CONSENT, "--res",
                args.res, "--preset", args.preset, "--device", args.device, *sets)
        seconds[f"{name}_prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        dvp("train", str(target), "--steps", str(args.steps), "--preset", args.preset,
            "--device", args.device)
        seconds[f"{name}_train"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results[name] = json.loads(dvp("eval", str(target), "--device", args.device))
        seconds[f"{name}_eval"] = time.perf_counter() - t0
    gain = results["refined"]["model"]["psnr"] - results["landmark_only"]["model"]["psnr"]
    report = {
        "machine": {"host": platform.node(), "python": platform.python_version(),
                    "torch": str(torch.__version__),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "video": str(args.video), "seconds": args.seconds, "steps": args.steps,
        "preset": args.preset, "resolution": int(args.res),
        **results,
        "psnr_gain_db": round(float(gain), 3),
        "wall_s": {k: round(v, 1) for k, v in seconds.items()},
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
