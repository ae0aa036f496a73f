"""Loopback latency of the live server: a source frame sent -> its reenacted frame received.

    python bench/latency.py [--seconds N] [--size S] [--preset paper|tiny] [--sessions N]
                            [--target TDIR] [--source VIDEO] [--fps F] [--loss P]
                            [--set KEY=VALUE ...]

A `dvp serve` server (the product's DvpServer and live engine, streamer.live.engine) runs in
a child process on 127.0.0.1 (with `streamer.echo_stamp` on, so each reenacted frame carries
the id stamped in the pixels of the source frame it was made from); aiortc clients
(streamer.webrtc.client), each in a process of its own, send the source video's frames
(looped, at --fps) with their ids stamped, and time each reenacted frame from the moment its
source frame went to the encoder to the moment it came out of the decoder.

Runs, in this order, against the same server:

1. `reenact`: one session for --seconds;
2. `sessions` (with --sessions N > 1): N sessions at once for --seconds, each sending at
   --fps: the frames per second each receives and its p95 latency against the single
   session's p95 of step 1 (`p95_vs_single`);
3. `baseline`: the same frames through `dvp serve`'s echo configuration (`streamer.echo`:
   no model work; the project's receivers, tracks and encoders, the transport as the
   product has it) for min(15, N/4) seconds (not with --no-baseline).

Prints JSON: the machine and device; per session latency p50/p95/max (ms), sustained fps
(reenacted frames received per second), drift (p50 of the last window minus the first; a
minute each when the run has two, else a third of the run each); `server_ms` (server side,
from the session's stats: a decoded frame handed to the engine -> its output frame handed
to aiortc's sender, p50/p95) with `encoder_ms_per_frame` beside it (VP8 or H.264 as
negotiated, timed in the server); the server's per-stage ms; `server_loop_lag_ms`: how
late a 10 ms sleep of the server's asyncio loop woke (p50/p95), which grows when the
server process's interpreter lock or cores are saturated; `longest_gap_ms` between frames
whose stamp read back (a freeze); `budget_ms`, one frame's trip per hop (bench/hops.py:
client encode, server assemble, decode, model (`server_ms`), encode back, client assemble,
decode, and the rest: sending, the network, hand-overs); `client_transport` and
`server_transport` (encode/decode ms, the frame assemblers' counts). `--loss P` drops that
fraction of RTP/RTCP packets in and out of the server (streamer.webrtc.loss) in every run.

Without --target a throwaway target is built (`--size`, an untrained `--preset` network:
the timing of a network does not depend on its weights). `--tracking sway` replaces the
source tracking and transfer by a synthetic head sway: it measures everything else
(rendering, window, generator, transport) while those stages are not available.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.media import find_media

#: A real person talking (the default source), else the cartoon.
DEFAULT_SOURCE = find_media("franck_talking_200s.webm", "megamind.avi")


# ---- the server process --------------------------------------------------------------------
class SwayTracker:
    """`--tracking sway`: no landmarks, no fit; the source "face" is the target at rest
    turning its head slowly (yaw 0.25 sin(2 pi t / 4) rad), so every frame is rendered and
    generated anew (bench only)."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def landmarks(self, rgb: Any) -> None:
        return None

    def fit(self, landmarks: Any, timestamp: float, stage_ms: dict[str, float]) -> Any:
        from dataclasses import replace

        stage_ms["fit"] = 0.0
        rest = self.target.rest
        rotation = rest.rotation.copy()
        rotation[0, 1] += 0.25 * np.sin(2 * np.pi * timestamp / 4.0)
        return replace(rest, rotation=rotation)

    def __call__(self, rgb: Any, timestamp: float, stage_ms: dict[str, float]) -> Any:
        stage_ms["landmarks"] = 0.0
        return self.fit(self.landmarks(rgb), timestamp, stage_ms)

    def close(self) -> None:
        pass


class PassRetarget:
    """`--tracking sway`: the swaying pose as it is."""

    def __init__(self, target: Any) -> None:
        self.target = target

    def __call__(self, source: Any, controls: Any) -> Any:
        return source

    def rest(self, controls: Any) -> Any:
        return self.target.rest

    def set_neutral(self) -> None:
        pass


def sway_stages(target: Any, config: Any) -> Any:
    from streamer.live.pipeline import SessionStages

    return SessionStages(SwayTracker(target), PassRetarget(target))


def build_target(root: Path, size: int, preset: str = "paper") -> Path:
    """A target directory with an untrained `preset` generator and a frontal face."""
    import torch

    from generator.checkpoint import save_checkpoint
    from generator.config import PRESETS
    from generator.target import TargetInfo, TargetWriter, software_versions
    from generator.unet import UNet
    from tracker.assets import load_face_model
    from tracker.params import FaceParams

    names = load_face_model().expression_names
    frames = 4
    params = FaceParams.empty(frames, names, (size, size), focal=2.2 * size)
    rng = np.random.default_rng(0)
    with TargetWriter(root) as writer:
        for _ in range(frames):
            writer.add_frame(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        writer.write_params(params)
        writer.write_albedo(np.full((64, 128, 3), 180, np.uint8))
        writer.write_neutral({"rotation": np.zeros(3, np.float32),
                              "translation": np.array([0, 0, 50], np.float32)})
        writer.commit(TargetInfo(
            source_video="none", source_sha256="0" * 64, crop=(0, 0, size), resolution=size,
            window=11, preset=preset, holdout_start=frames - 1, frames=frames, fps=30.0,
            consent="benchmark fixture: no real person", software=software_versions()))
    torch.manual_seed(0)
    model = UNet(size=size, n_w=11, ngf=PRESETS[preset].ngf,
                 upsample=PRESETS[preset].upsample, input_skip=PRESETS[preset].input_skip)
    save_checkpoint(root / "checkpoints", {"step": 0, "generator": {
        "shape": model.shape(), "state": model.state_dict()}})
    return root


def server_main(conn: Any, target: str, device: str, tracking: str, echo: bool,
                sessions: int, loss: float = 0.0, overrides: tuple[str, ...] = ()) -> None:
    """Child process: serve `target` (or its echo configuration) until told to stop.
    Messages from the parent: "encoder" (reply: the encode ms, the loop lags and the
    per-hop figures of bench/hops.py since the last ask), "stop". The loop lag is how late
    a 10 ms sleep of the server's asyncio loop wakes: it grows when the process's
    interpreter lock or its cores are saturated. `loss`: the fraction of RTP/RTCP packets
    dropped in and out; `overrides`: config settings (`--set`) of the server."""
    import logging

    from bench.hops import instrument, lossy

    os.dup2(2, 1)  # the parent's stdout carries its JSON only: the child writes to stderr
    logging.basicConfig(level=logging.WARNING)
    loop_lag_ms: list[float] = []
    hops = instrument()
    dropped = lossy(loss, seed=1) if loss > 0 else None

    async def lag() -> None:
        while True:
            start = time.perf_counter()
            await asyncio.sleep(0.01)
            loop_lag_ms.append((time.perf_counter() - start - 0.01) * 1e3)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        lag_task = asyncio.ensure_future(lag())
        if echo:  # dvp serve's echo configuration: no stage, no engine
            from streamer.cli.config import load_config
            from streamer.live.stages import LoadedTarget
            from streamer.webrtc.server import DvpServer, ServeOptions
            from tracker.device import pick_device

            config = load_config(None, ["streamer.echo=true"])
            loaded = LoadedTarget(target, config, pick_device(device))
            server = DvpServer(loaded, config, ServeOptions(port=0, max_sessions=1))
            url = await server.start()
            closer = server.close
            conn.send({"device": str(loaded.device), "echo": True})
        else:
            import torch

            from streamer.cli.config import load_config
            from streamer.live.engine import LiveEngine
            from streamer.live.process import apply_process_settings
            from streamer.live.stages import LoadedTarget, make_session_stages
            from streamer.webrtc.server import DvpServer, ServeOptions
            from tracker.device import pick_device

            config = load_config(None, ["streamer.echo_stamp=true", *overrides])
            apply_process_settings(config)  # as `dvp serve` does
            loaded = LoadedTarget(target, config, pick_device(device))
            factory = sway_stages if tracking == "sway" else make_session_stages
            probe = factory(loaded, config)  # fails here when a stage is missing
            engine = LiveEngine(loaded, config, sessions, stage_factory=factory)
            choices = {k: {"chosen": c.chosen, "why": c.why}
                       for k, c in engine.choices(probe).items()}
            probe.close()
            server = DvpServer(loaded, config, ServeOptions(port=0, max_sessions=sessions),
                               stage_factory=factory, engine=engine)
            url = await server.start()
            closer = server.close
            conn.send({"device": str(loaded.device),
                       "device_name": torch.cuda.get_device_name(loaded.device)
                       if loaded.device.type == "cuda" else "cpu",
                       "backend": loaded.backend, "size": loaded.size,
                       "torch_threads": torch.get_num_threads(), "engine": choices})
        conn.send({"url": url})
        while True:
            message = await loop.run_in_executor(None, conn.recv)
            if message == "encoder":
                conn.send({"encoder_ms": list(hops.encode_ms), "loop_lag_ms": list(loop_lag_ms),
                           "hops": hops.summary(),
                           "loss": dropped.as_dict() if dropped else None})
                hops.reset()
                loop_lag_ms.clear()
            else:
                break
        lag_task.cancel()
        await closer()

    try:
        asyncio.run(run())
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        conn.send({"error": f"{type(err).__name__}: {err}"})


# ---- the client (this process) -------------------------------------------------------------
def load_source(path: Path, max_frames: int, width: int) -> list[np.ndarray]:
    import cv2

    from streamer.video.io import read_frames

    frames = []
    for rgb, _ in read_frames(path, max_frames=max_frames):
        h, w = rgb.shape[:2]
        height = round(h * width / w / 2) * 2
        frames.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
    return frames


async def measure(url: str, frames: list[np.ndarray], fps: float, seconds: float,
                  offset: int = 0) -> dict[str, Any]:
    """Send stamped frames for `seconds`; return the per-frame latencies and timings."""
    from bench.hops import instrument
    from streamer.video.convert import frame_to_rgb
    from streamer.video.stamp import ID_MODULO, read_stamp, write_stamp
    from streamer.webrtc.client import DvpClient, FrameSourceTrack

    hops = instrument()

    def make(i: int) -> np.ndarray:
        return write_stamp(frames[(i + offset) % len(frames)].copy(), i)

    source = FrameSourceTrack(make, fps=fps)
    ws_url = url.split("?")[0].replace("http://", "ws://") + "ws"
    latencies: list[tuple[float, float]] = []  # (receive time, latency ms)
    unmatched = 0
    async with DvpClient(ws_url, source, max_frames=10_000) as client:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            try:
                received, frame = await client.next_frame(timeout=max(1.0, seconds))
            except TimeoutError:
                break
            stamp = read_stamp(frame_to_rgb(frame))
            if stamp is None:
                unmatched += 1
                continue
            # the newest frame sent with this id (ids wrap at ID_MODULO)
            candidates = [i for i in range(len(source.sent) - 1, -1, -1)
                          if i % ID_MODULO == stamp]
            sent = source.sent.get(candidates[0]) if candidates else None
            if sent is None or sent > received:
                unmatched += 1
                continue
            latencies.append((received - start, (received - sent) * 1e3))
        stats = next((m for m in reversed(client.messages) if m.get("type") == "stats"), {})
        sent_count = len(source.sent)
    return {"latencies": latencies, "unmatched": unmatched, "sent": sent_count,
            "elapsed": time.monotonic() - start, "stats": stats, "hops": hops.summary(),
            "placement_s": client.placement_s}


def client_main(conn: Any, barrier: Any, url: str, source: str, width: int, fps: float,
                seconds: float, warmup: float, offset: int) -> None:
    """Child process: one aiortc client; sends its summary (or an error) to the parent."""
    try:
        frames = load_source(Path(source), 120, width)
        barrier.wait(600)  # all clients start together
        run = asyncio.run(measure(url, frames, fps, seconds, offset))
        out = summarise(run, seconds, warmup)
        out["client_transport"] = run["hops"]
        out["placement_ms"] = round(run["placement_s"] * 1e3, 1) \
            if run["placement_s"] is not None else None
        stats = run["stats"]
        if stats:
            out["server"] = {"server_ms": stats.get("server_ms"),
                             "stage_ms": stats.get("stage_ms"),
                             "dropped": stats.get("dropped"),
                             "processed": stats.get("processed")}
        conn.send(out)
    except BaseException as err:  # noqa: BLE001  (reported to the parent)
        conn.send({"error": f"{type(err).__name__}: {err}"})


def run_clients(url: str, args: argparse.Namespace, count: int, seconds: float
                ) -> list[dict[str, Any]]:
    """`count` clients at once, a process each; their summaries."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(count)
    pipes, procs = [], []
    for k in range(count):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=client_main, args=(
            child, barrier, url, args.source, args.width, args.fps, seconds, args.warmup,
            17 * k), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    out = []
    try:
        for parent in pipes:
            if not parent.poll(seconds + 900):
                raise TimeoutError("a client gave no result")
            result = parent.recv()
            if "error" in result:
                raise SystemExit(f"latency bench: a client failed: {result['error']}")
            out.append(result)
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.terminate()
    return out


def summarise(run: dict[str, Any], seconds: float, warmup: float) -> dict[str, Any]:
    pairs = [(t, ms) for t, ms in run["latencies"] if t >= warmup]
    if not pairs:
        return {"frames_received": 0, "note": "no reenacted frame came back in time"}
    times = np.array([t for t, _ in pairs])
    ms = np.array([m for _, m in pairs])
    span = max(times[-1] - times[0], 1e-9)
    window = 60.0 if seconds - warmup >= 120.0 else (seconds - warmup) / 3.0
    first = ms[times <= times[0] + window]
    last = ms[times >= times[-1] - window]
    return {
        "frames_sent": run["sent"],
        "frames_received": len(ms),
        "unreadable_stamps": run["unmatched"],
        "latency_ms": {"p50": round(float(np.percentile(ms, 50)), 1),
                       "p95": round(float(np.percentile(ms, 95)), 1),
                       "max": round(float(ms.max()), 1)},
        "sustained_fps": round(float((len(ms) - 1) / span), 2) if len(ms) > 1 else 0.0,
        "drift_ms": round(float(np.median(last) - np.median(first)), 1),
        "drift_window_s": round(window, 1),
        "longest_gap_ms": round(float(np.diff(times).max()) * 1e3, 1) if len(ms) > 1 else None,
    }


class Server:
    """The server child process (`server_main`)."""

    def __init__(self, args: argparse.Namespace, target: str, echo: bool,
                 sessions: int) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=server_main, args=(
            child, target, args.device, args.tracking, echo, sessions,
            getattr(args, "loss", 0.0), tuple(getattr(args, "set", ()))), daemon=True)
        self.proc.start()
        self.info: dict[str, Any] = {}
        while "url" not in self.info:
            message = self._next(900.0)
            if "error" in message:
                raise SystemExit(f"latency bench: the server failed: {message['error']}")
            self.info.update(message)
        self.url = self.info.pop("url")

    def _next(self, timeout: float) -> dict[str, Any]:
        """The child's next message (TimeoutError after `timeout` s, SystemExit when the
        child ends without one)."""
        deadline = time.monotonic() + timeout
        while not self.conn.poll(1.0):
            if not self.proc.is_alive():
                raise SystemExit(f"latency bench: the server process ended (exit code "
                                 f"{self.proc.exitcode}) before it answered")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not answer within {timeout:g} s")
        return self.conn.recv()

    def figures(self) -> dict[str, Any]:
        """The server's encode times, loop lags and per-hop figures since the last call."""
        self.conn.send("encoder")
        return self.conn.recv() if self.conn.poll(60) else {}

    def close(self) -> None:
        try:
            self.conn.send("stop")
        finally:
            self.proc.join(30)
            if self.proc.is_alive():
                self.proc.terminate()


def with_encoder(summary: dict[str, Any], figures: dict[str, Any],
                 echo: bool = False) -> dict[str, Any]:
    """`summary` with the server's encode ms per frame (median), loop lag (p50, p95), its
    per-hop figures and one frame's budget (bench/hops.py; the model's share is the
    session's `server_ms` p50, none in the echo configuration)."""
    from bench.hops import budget

    encoder, lags = figures.get("encoder_ms", []), figures.get("loop_lag_ms", [])
    summary["encoder_ms_per_frame"] = round(float(np.median(encoder)), 2) if encoder else None
    summary["server_loop_lag_ms"] = {
        "p50": round(float(np.percentile(lags, 50)), 2),
        "p95": round(float(np.percentile(lags, 95)), 2)} if lags else None
    far = figures.get("hops") or {}
    model = 0.0 if echo else \
        ((summary.get("server") or {}).get("server_ms") or {}).get("p50")
    summary["budget_ms"] = budget((summary.get("latency_ms") or {}).get("p50"),
                                  summary.get("client_transport") or {}, far, model)
    summary["server_transport"] = far
    if figures.get("loss"):
        summary["loss"] = figures["loss"]
    return summary


def session_runs(args: argparse.Namespace, target: str) -> dict[str, Any]:
    """One session, then --sessions at once, against one server."""
    server = Server(args, target, False, max(1, args.sessions))
    try:
        server.figures()
        single = run_clients(server.url, args, 1, args.seconds)[0]
        out: dict[str, Any] = {"server": server.info,
                               "reenact": with_encoder(single, server.figures())}
        if args.sessions > 1:
            each = run_clients(server.url, args, args.sessions, args.seconds)
            p95 = single.get("latency_ms", {}).get("p95")
            fps = [e.get("sustained_fps", 0.0) for e in each]
            ratios = [round(e["latency_ms"]["p95"] / p95, 3) if p95 and "latency_ms" in e
                      else None for e in each]
            out["sessions"] = with_encoder({
                "count": args.sessions,
                "fps_received": fps,
                "p95_ms": [e.get("latency_ms", {}).get("p95") for e in each],
                "single_session_p95_ms": p95,
                "p95_vs_single": ratios,
                "min_fps": min(fps),
                "max_p95_vs_single": max((r for r in ratios if r is not None), default=None),
                "each": each,
            }, server.figures())
        return out
    finally:
        server.close()


def echo_run(args: argparse.Namespace, target: str, seconds: float) -> dict[str, Any]:
    server = Server(args, target, True, 1)
    try:
        server.figures()
        return with_encoder(run_clients(server.url, args, 1, seconds)[0], server.figures(),
                            echo=True)
    finally:
        server.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--target", help="target directory (default: a throwaway one)")
    parser.add_argument("--size", type=int, default=256, help="throwaway target's S")
    parser.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                        help="throwaway target's network (untrained; default paper)")
    parser.add_argument("--sessions", type=int, default=1,
                        help="after the single session, this many at once (default 1: none)")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE), help="source video")
    parser.add_argument("--width", type=int, default=480, help="source frame width sent")
    parser.add_argument("--fps", type=float, default=30.0, help="source frames per second")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tracking", choices=("real", "sway"), default="real",
                        help="real: the session's tracker and transfer; sway: a synthetic "
                             "head sway instead (no landmarks, no fit)")
    parser.add_argument("--warmup", type=float, default=None,
                        help="seconds ignored at the start (default: min(5, N/10))")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config setting of the server (as dvp's --set), e.g. "
                             "tracker.landmarks=mediapipe; repeatable")
    parser.add_argument("--loss", type=float, default=0.0, metavar="P",
                        help="fraction of RTP/RTCP packets the server drops in and out "
                             "(default 0)")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = min(5.0, args.seconds / 10.0)
    frames = load_source(Path(args.source), 1, args.width)
    with tempfile.TemporaryDirectory() as tmp:
        target = args.target or str(build_target(Path(tmp) / "target", args.size,
                                                 args.preset))
        runs = session_runs(args, target)
        result: dict[str, Any] = {
            "benchmark": "latency",
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "python": platform.python_version(),
                        "device": runs["server"].get("device_name")},
            "path": "dvp serve: streamer.webrtc.server.DvpServer on the live engine "
                    "(streamer.live.engine)",
            "seconds": args.seconds,
            "loss": args.loss,
            "settings": args.set,
            "source": {"video": Path(args.source).name, "width": frames[0].shape[1],
                       "height": frames[0].shape[0], "fps": args.fps},
            "target": args.target or f"throwaway untrained {args.preset} target at "
                                     f"{args.size} px",
            "tracking": args.tracking if args.tracking == "real" else
            "sway (landmarks, fit and transfer skipped: a synthetic head sway drives the "
            "target; rendering, window, generator and transport are measured)",
            **runs,
        }
        if not args.no_baseline:
            base_seconds = min(15.0, args.seconds / 4.0)
            baseline = echo_run(args, target, base_seconds)
            baseline["what"] = ("the same frames through dvp serve's echo configuration "
                                f"(streamer.echo: no model work), {base_seconds:g} s")
            result["baseline"] = baseline
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
