"""Sessions across the GPUs of one host through `dvp serve --ray local`.

    python bench/cluster.py [--gpus 1,2] [--per-gpu N] [--seconds 30] [--size 256]
                            [--preset paper|tiny] [--target TDIR] [--source VIDEO]
                            [--fps 30] [--min-fps 29] [--no-kill]
                            [--workers-per-gpu K] [--out FILE]

For each count k of `--gpus` (default: 1, then every GPU of the host), in this order:
`dvp serve TARGET --ray local --port 0` runs in a child process that sees the first k GPUs
(`CUDA_VISIBLE_DEVICES`) and k / G of the host's cores (its CPU affinity; G = the host's
GPUs: the cores split evenly per GPU, so one GPU gets in the first phase what each gets in
the last). Once its k workers are ready, N = `--per-gpu` x k aiortc clients (those of
bench/latency.py, a process each, sending the clip with each frame's id stamped in its
pixels, at `--fps`) run for `--seconds`: the frames per second each receives, its
latency p50/p95 (source frame sent -> reenacted frame received), its placement (offer sent
-> answer received); mid-run, each worker's sessions and fps from the front's `/metrics`.
`--per-gpu` defaults to the capacity the first phase's workers sized themselves to
(streamer.max_sessions = 0: what its GPU, memory and cores hold, streamer.live.capacity);
a given value sets each worker's capacity to its part of it (ceil(N / K)).
`--workers-per-gpu K` is passed to `dvp serve` (K worker processes share each GPU, each
1/K of it and its share of the cores; with `--gpus 0`: K CPU workers). The one-GPU phase
is the baseline of the same run: `scaling.ratio` is the sessions at >= `--min-fps` on k
GPUs over those on one.

Then (not with `--no-kill`), on the last phase's server: two clients per worker connect,
the process of the worker holding the first client is killed (SIGKILL), and the time from
the kill to each of its clients' `error` message is reported (target: <= 2 s), with a
reconnect's placement and the worker it landed on. A kill phase that fails is reported as
`{"error": ...}`; the phases before it are kept.

The report is written after every phase (and the kill run) to `--out FILE` when given
(aside, then renamed: a late failure or a kill of the bench keeps the phases done); the
final report also goes to stdout.

Prints JSON: the machine (cores, GPUs), per phase the workers (device, cores, capacity,
sessions and fps mid-run), per session fps / latency / placement, `min_fps`,
`sessions_at_min_fps`, the front's placement quantiles (`dvp_placement_ms`: offer at the
front -> answer out); `scaling`; `kill`. The clients run on the same host as the server
(all its cores, in every phase): `load_avg` shows how busy the host was.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.latency import DEFAULT_SOURCE, build_target, load_source, run_clients

#: Seconds a phase's server may take until its workers are ready (CUDA graph captures).
READY_TIMEOUT = 900.0


def gpu_names() -> list[str]:
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text -> (name, labels, value) samples."""
    out = []
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line.strip())
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match[2] or ""))
            out.append((match[1], labels, float(match[3])))
    return out


class Front:
    """`dvp serve TARGET --ray local` in a child process on the first `gpus` GPUs and its
    share of the cores; its output goes to files (Ray's workers log a lot)."""

    def __init__(self, target: str, gpus: int, cores: list[int], per_gpu: int | None,
                 logs: Path, workers_per_gpu: int = 1) -> None:
        overrides = ["--set", "streamer.echo_stamp=true", "--set",
                     "streamer.metrics_log_seconds=10",
                     "--workers-per-gpu", str(workers_per_gpu)]
        if per_gpu:  # each worker's part of the GPU's sessions
            overrides += ["--set", f"streamer.max_sessions={-(-per_gpu // workers_per_gpu)}"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH"), str(ROOT)) if p),
            CUDA_VISIBLE_DEVICES=",".join(str(i) for i in range(gpus)))
        self.out = logs / f"front-{gpus}gpu.out"
        self.err = logs / f"front-{gpus}gpu.err"
        mine = os.sched_getaffinity(0)
        os.sched_setaffinity(0, cores)  # the child (and its cluster) inherit its cores
        try:
            with open(self.out, "w") as out, open(self.err, "w") as err:
                self.proc = subprocess.Popen(
                    [sys.executable, "-m", "streamer.cli.main", "serve", target, "-v",
                     "--ray", "local", "--device", "cuda" if gpus else "cpu", "--port", "0",
                     *overrides], cwd=ROOT, env=env, stdout=out, stderr=err)
        finally:
            os.sched_setaffinity(0, mine)
        self.url = self._url()

    def _url(self) -> str:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for line in self.out.read_text().splitlines():
                if re.fullmatch(r"https?://\S+/", line.strip()):
                    return line.strip()
            if self.proc.poll() is not None:
                raise SystemExit(f"cluster bench: dvp serve exited ({self.proc.returncode}):"
                                 f" {self.err.read_text()[-3000:]}")
            time.sleep(0.5)
        raise SystemExit("cluster bench: dvp serve printed no address")

    def get(self, path: str) -> str:
        with urllib.request.urlopen(self.url + path, timeout=30) as reply:
            return str(reply.read().decode())

    def wait_workers(self, count: int) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if json.loads(self.get("health"))["workers"] >= count:
                return
            if self.proc.poll() is not None:
                raise SystemExit(f"cluster bench: dvp serve exited: "
                                 f"{self.err.read_text()[-3000:]}")
            time.sleep(1.0)
        raise SystemExit(f"cluster bench: {count} worker(s) not ready within "
                         f"{READY_TIMEOUT:g} s: {self.err.read_text()[-3000:]}")

    def workers(self) -> dict[str, dict[str, Any]]:
        """Per worker: device, host, pid, capacity, sessions, fps, frames, latency."""
        out: dict[str, dict[str, Any]] = {}
        for name, labels, value in parse_metrics(self.get("metrics")):
            worker = labels.get("worker")
            if worker is None:
                continue
            entry = out.setdefault(worker, {})
            if name == "dvp_worker_info":
                entry.update(device=labels["device"], host=labels["host"],
                             pid=int(labels["pid"]))
            elif name == "dvp_latency_ms":
                entry.setdefault("latency_ms", {})[labels["quantile"]] = value
            else:
                entry[name.removeprefix("dvp_")] = value
        return out

    def placement(self) -> dict[str, float]:
        return {labels["quantile"]: value for name, labels, value in
                parse_metrics(self.get("metrics")) if name == "dvp_placement_ms"}

    def stop(self) -> int | None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return None


def run_phase(args: argparse.Namespace, target: str, gpus: int, cores: list[int],
              per_gpu: int | None, logs: Path, kill: bool,
              save: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """One phase on `gpus` GPUs; `save(phase)` is called with the phase once measured
    (before the kill run) and again after it."""
    started = time.monotonic()
    k = args.workers_per_gpu
    front = Front(target, gpus, cores, per_gpu, logs, k)
    try:
        front.wait_workers(max(1, gpus) * k)
        ready_s = time.monotonic() - started
        workers = front.workers()
        capacity = int(sum(w.get("capacity", 0) for w in workers.values()))
        count = per_gpu * max(1, gpus) if per_gpu else capacity
        mid: dict[str, Any] = {}
        done = threading.Event()

        def sample() -> None:
            """Every 2 s while the clients run: keep the sample with the most sessions
            (the later one of equals)."""
            while not done.wait(2.0):
                now = front.workers()
                held = sum(w.get("sessions", 0) for w in now.values())
                if held >= mid.get("held", 0):
                    mid.update(held=held, workers=now, load_avg=os.getloadavg())

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            each = run_clients(front.url, args, count, args.seconds)
        finally:
            done.set()
            sampler.join(30)
        fps = [e.get("sustained_fps", 0.0) for e in each]
        placement = [e["placement_ms"] for e in each if e.get("placement_ms") is not None]
        phase: dict[str, Any] = {
            "gpus": gpus, "workers_per_gpu": k, "cores": len(cores),
            "ready_s": round(ready_s, 1),
            "workers": {name: {k: w.get(k) for k in ("device", "capacity", "sessions", "fps",
                                                     "latency_ms")}
                        for name, w in mid.get("workers", workers).items()},
            "sessions": count,
            "fps_received": fps,
            "min_fps": min(fps) if fps else 0.0,
            "sessions_at_min_fps": sum(f >= args.min_fps for f in fps),
            "latency_p50_ms": [e.get("latency_ms", {}).get("p50") for e in each],
            "latency_p95_ms": [e.get("latency_ms", {}).get("p95") for e in each],
            "placement_ms": {"p50": round(float(np.median(placement)), 1),
                             "max": round(float(max(placement)), 1)} if placement else None,
            "front_placement_ms": front.placement(),
            "load_avg": mid.get("load_avg"),
            "each": each,
        }
        save(phase)
        if kill:
            try:
                clients = min(2 * max(1, gpus) * k, max(1, capacity))
                phase["kill"] = asyncio.run(kill_run(front, args, clients))
            except Exception as err:  # noqa: BLE001  (reported; the phases are kept)
                phase["kill"] = {"error": f"{type(err).__name__}: {err}"}
            save(phase)
        return phase
    finally:
        phase_rc = front.stop()
        if phase_rc not in (0, None):
            print(f"cluster bench: dvp serve exited with {phase_rc}", file=sys.stderr)


async def kill_run(front: Front, args: argparse.Namespace, count: int) -> dict[str, Any]:
    """`count` clients; the first one's worker is killed; time to each client's error."""
    from streamer.webrtc.client import ClientError, DvpClient, FrameSourceTrack

    frames = load_source(Path(args.source), 30, args.width)
    ws = front.url.split("?")[0].replace("http://", "ws://") + "ws"
    clients = [DvpClient(ws, FrameSourceTrack(lambda i: frames[i % len(frames)], args.fps))
               for _ in range(count)]
    try:
        for client in clients:
            await client.start()
        for client in clients:
            await client.next_frame(60)
        before = front.workers()
        victim = max(before, key=lambda w: before[w].get("sessions", 0))
        held = int(before[victim].get("sessions", 0))
        killed = time.monotonic()
        os.kill(before[victim]["pid"], signal.SIGKILL)
        deadline = killed + 10
        while sum(c.error_at is not None for c in clients) < held and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        told = sorted(round(c.error_at - killed, 3) for c in clients if c.error_at)
        errors = {m["message"] for c in clients for m in c.messages if m["type"] == "error"}
        others = [c for c in clients if c.error_at is None]
        for client in others:  # the other workers' sessions go on
            while not client.frames.empty():
                client.frames.get_nowait()
            await client.next_frame(30)
        again = DvpClient(ws, FrameSourceTrack(lambda i: frames[i % len(frames)], args.fps))
        try:
            await again.start()
            await again.next_frame(60)
            reconnect = f"placed in {(again.placement_s or 0.0) * 1e3:.1f} ms, frames back"
        except ClientError as err:
            reconnect = f"refused: {err}"
        after = front.workers()
        await again.close()
        return {"clients": count, "killed_worker": victim, "its_sessions": held,
                "told_s": told, "max_told_s": max(told) if told else None,
                "errors": sorted(errors), "others_still_served": len(others),
                "reconnect": reconnect,
                "workers_after": {w: a.get("sessions") for w, a in after.items()}}
    finally:
        for client in clients:
            await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default=None,
                        help="comma-separated GPU counts, one phase each (default: 1 and "
                             "every GPU of the host; 0: CPU workers, --workers-per-gpu of them)")
    parser.add_argument("--per-gpu", type=int, default=None,
                        help="sessions per GPU (default: the capacity the first phase's "
                             "workers size themselves to)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--target", help="target directory (default: a throwaway one)")
    parser.add_argument("--size", type=int, default=256, help="throwaway target's S")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="source video")
    parser.add_argument("--width", type=int, default=480, help="source frame width sent")
    parser.add_argument("--fps", type=float, default=30.0, help="source frames per second")
    parser.add_argument("--min-fps", type=float, default=29.0,
                        help="a session counts as held at this many received frames/s")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds ignored at the start (default: min(5, N/10))")
    parser.add_argument("--no-kill", action="store_true")
    parser.add_argument("--workers-per-gpu", type=int, default=1, metavar="K",
                        help="worker processes per GPU (dvp serve --workers-per-gpu; "
                             "with --gpus 0: CPU workers)")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="also write the report here, after every phase")
    args = parser.parse_args()
    if args.workers_per_gpu < 1:
        parser.error(f"--workers-per-gpu must be at least 1, got {args.workers_per_gpu}")
    if args.warmup is None:
        args.warmup = min(5.0, args.seconds / 10.0)
    names = gpu_names()
    counts = [int(k) for k in args.gpus.split(",")] if args.gpus else \
        sorted({1, len(names)}) if names else [0]
    if max(counts) > len(names):
        raise SystemExit(f"cluster bench: --gpus {args.gpus} but the host has "
                         f"{len(names)} GPU(s)")
    cores = sorted(os.sched_getaffinity(0))
    per_share = len(cores) // max(1, len(names))
    frames = load_source(Path(args.source), 1, args.width)
    head: dict[str, Any] = {
        "benchmark": "cluster",
        "machine": {"platform": platform.platform(), "cpus": len(cores),
                    "python": platform.python_version(), "gpus": names},
        "path": "dvp serve --ray local: the front (streamer.cluster.front) and "
                f"{args.workers_per_gpu} worker process(es) per GPU "
                "(streamer.cluster.worker), aiortc clients of bench/latency.py",
        "workers_per_gpu": args.workers_per_gpu,
        "seconds": args.seconds,
        "source": {"video": Path(args.source).name, "width": frames[0].shape[1],
                   "height": frames[0].shape[0], "fps": args.fps},
        "target": args.target or f"throwaway untrained {args.preset} target at {args.size} px",
        "min_fps": args.min_fps,
    }
    phases: list[dict[str, Any]] = []

    def save(phase: dict[str, Any]) -> None:
        if not any(p is phase for p in phases):
            phases.append(phase)
        if args.out is not None:
            write_atomically(args.out, report(head, phases, args.min_fps))

    with tempfile.TemporaryDirectory() as tmp:
        target = args.target or str(build_target(Path(tmp) / "target", args.size,
                                                 args.preset))
        per_gpu = args.per_gpu
        for i, k in enumerate(counts):
            mine = cores[:per_share * k] if k else cores
            phase = run_phase(args, target, k, mine, per_gpu, Path(tmp),
                              kill=not args.no_kill and i == len(counts) - 1, save=save)
            if per_gpu is None:  # the first phase's workers sized themselves: the same after
                per_gpu = max(1, phase["sessions"] // max(1, k))
    print(json.dumps(report(head, phases, args.min_fps), indent=2))
    return 0


def report(head: dict[str, Any], phases: list[dict[str, Any]],
           min_fps: float) -> dict[str, Any]:
    """The JSON report of the phases run so far."""
    base = phases[0]
    return {**head, "phases": phases, "scaling": {
        "baseline": f"{base['gpus']} GPU(s): {base['sessions_at_min_fps']} of "
                    f"{base['sessions']} sessions at >= {min_fps:g} fps",
        "sessions_at_min_fps": {str(p["gpus"]): p["sessions_at_min_fps"] for p in phases},
        "ratio": round(phases[-1]["sessions_at_min_fps"] /
                       max(1, base["sessions_at_min_fps"]), 2),
    }, "kill": phases[-1].get("kill")}


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    """`data` as JSON at `path`: written aside, then renamed over it."""
    aside = path.with_name(path.name + ".part")
    aside.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(aside, path)

if __name__ == "__main__":
    sys.exit(main())
