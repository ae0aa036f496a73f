"""`dvp prepare`'s crop+write stage on real footage, threaded against one frame at a time, as
JSON.

    python bench/prepare_frames.py [--seconds 60] [--res 256] [--threads 0]

Decodes the first `--seconds` of `franck_talking_200s.webm` (`bench.media.find_media`),
crops a fixed square around the face and writes the S x S frames as PNG into a target's
staging folder (`generator.prepare.write_crops`, what `dvp prepare` runs), twice in the same
run: the baseline on one thread (one frame after another, as `dvp prepare` did before),
then on `--threads` threads (0: auto, as `dvp prepare` now). Prints `device` (the host's
CPU), `frames`, `baseline` and `threaded` (seconds, frames_per_second), `speedup`, and
whether the two wrote the same bytes (`identical`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.media import find_media

#: A fixed crop of franck's 360 x 288 frames around head and shoulders (x, y, size).
CROP = (60, 0, 288)


def run(video: Path, seconds: float, res: int, threads: int,
        root: Path) -> tuple[float, int, dict[str, bytes]]:
    """Seconds to decode, crop and write the frames of `video`'s first `seconds` into a
    staging folder of a target at `root` (generator.prepare.write_crops on `threads`), the
    frames written and their bytes by name."""
    from generator.prepare import write_crops
    from generator.target import TargetWriter
    from streamer.video.io import read_frames

    with TargetWriter(root) as writer:
        start = time.perf_counter()
        write_crops(writer, (rgb for rgb, t in read_frames(video) if t < seconds), CROP, res,
                    threads)
        spent = time.perf_counter() - start
        written = {p.name: p.read_bytes() for p in (writer.staging / "frames").iterdir()}
    return spent, len(written), written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--res", type=int, default=256, choices=[256, 512])
    ap.add_argument("--threads", type=int, default=0, help="0: auto (generator.target)")
    args = ap.parse_args()
    from generator.parallel import threads_for
    from tracker.device import usable_cores

    video = find_media("franck_talking_200s.webm")
    if not video.is_file():
        raise SystemExit(f"{video} is missing (set DVP_MEDIA)")
    threads = threads_for(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        base_s, n, base = run(video, args.seconds, args.res, 1, Path(tmp) / "serial")
        fast_s, _, fast = run(video, args.seconds, args.res, threads, Path(tmp) / "threads")
    print(json.dumps({
        "device": f"CPU {platform.processor() or platform.machine()}, "
                  f"{usable_cores()} usable cores",
        "host": platform.node(), "video": str(video), "frames": n, "resolution": args.res,
        "baseline": {"path": "write_crops, 1 thread", "seconds": round(base_s, 2),
                     "frames_per_second": round(n / base_s, 1)},
        "threaded": {"path": f"write_crops, {threads} threads", "seconds": round(fast_s, 2),
                     "frames_per_second": round(n / fast_s, 1)},
        "speedup": round(base_s / fast_s, 2),
        "identical": base == fast,
    }, indent=2))


if __name__ == "__main__":
    main()
