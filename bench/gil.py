"""Does MediaPipe's landmark call release Python's interpreter lock? As JSON.

    python bench/gil.py [--source VIDEO] [--frames N]

The live engine runs each session's landmarks in a thread of its own (streamer.live.session)
and relies on MediaPipe's `process()` letting other Python threads run meanwhile. Two
measurements, each against baselines of the same run:

- **watcher**: a Python thread sleeps 0.5 ms in a loop and records how late it wakes (it
  needs the lock to wake). While the main thread runs MediaPipe on the frames, compared
  with the main thread sleeping (`idle`) and with a pure-Python loop (`python_loop`, holds
  the lock, handing it over every `sys.getswitchinterval()`). Late wakes near `idle`'s:
  the lock is free while MediaPipe works; near `python_loop`'s: it is held.
- **two threads**: the same frames through two detectors, one after the other and in two
  threads at once (wall time; a ratio near 0.5 on a host with two free cores or more: they
  ran in parallel).

Source: the franck clip of ../shared/media (a real face) by default.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.media import find_media

DEFAULT_SOURCE = find_media("franck_talking_200s.webm")


def watcher_lateness(run: Callable[[], None]) -> dict[str, float]:
    """How late (ms) a 0.5 ms sleeper thread wakes while `run()` runs in this thread."""
    stop = threading.Event()
    late: list[float] = []

    def watch() -> None:
        while not stop.is_set():
            start = time.perf_counter()
            time.sleep(0.0005)
            late.append((time.perf_counter() - start - 0.0005) * 1e3)

    thread = threading.Thread(target=watch)
    thread.start()
    time.sleep(0.05)
    late.clear()
    start = time.perf_counter()
    run()
    wall = time.perf_counter() - start
    stop.set()
    thread.join()
    a = np.asarray(late)
    return {"wall_s": round(wall, 3), "wakes": int(a.size),
            "late_ms_p50": round(float(np.percentile(a, 50)), 3),
            "late_ms_p95": round(float(np.percentile(a, 95)), 3),
            "late_ms_max": round(float(a.max()), 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--frames", type=int, default=100)
    args = parser.parse_args()

    from streamer.video.io import read_frames
    from tracker.landmarks import LandmarkDetector

    frames = [np.ascontiguousarray(rgb) for rgb, _ in
              read_frames(Path(args.source), max_frames=args.frames)]
    detectors = [LandmarkDetector(), LandmarkDetector()]
    for det in detectors:  # MediaPipe's graph and caches made
        for rgb in frames[:5]:
            det(rgb)

    def mediapipe(det: Any = detectors[0]) -> None:
        for rgb in frames:
            det(rgb)

    per_frame = watcher_lateness(mediapipe)["wall_s"] / len(frames)

    def python_loop() -> None:
        end = time.perf_counter() + per_frame * len(frames)
        n = 0
        while time.perf_counter() < end:
            n += 1

    result: dict[str, Any] = {
        "bench": "gil",
        "machine": {"host": platform.node(), "cpu_cores": os.cpu_count(),
                    "python": platform.python_version(),
                    "switch_interval_ms": sys.getswitchinterval() * 1e3,
                    "mediapipe": __import__("mediapipe").__version__},
        "source": {"video": Path(args.source).name, "frames": len(frames),
                   "size": list(frames[0].shape[:2])},
        "watcher": {
            "idle": watcher_lateness(lambda: time.sleep(per_frame * len(frames))),
            "mediapipe": watcher_lateness(mediapipe),
            "python_loop": watcher_lateness(python_loop),
        },
    }
    start = time.perf_counter()
    for det in detectors:
        mediapipe(det)
    serial = time.perf_counter() - start
    threads = [threading.Thread(target=mediapipe, args=(det,)) for det in detectors]
    start = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    parallel = time.perf_counter() - start
    result["two_threads"] = {"serial_s": round(serial, 3), "parallel_s": round(parallel, 3),
                             "ratio": round(parallel / serial, 3)}
    w = result["watcher"]
    result["releases_the_lock"] = bool(
        w["mediapipe"]["late_ms_p95"] < 0.5 * w["python_loop"]["late_ms_p95"])
    for det in detectors:
        det.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
