"""The whole live path through the product's engine, against the serial reference, as JSON.

    python bench/pipeline.py [--sizes 256 512] [--frames N] [--sessions N] [--device D]
                             [--codec vp8|h264] [--preset paper|tiny] [--source VIDEO]
                             [--set KEY=VALUE ...]

Two paths over the same stages (streamer.live.stages, made as `dvp serve` makes them) and
the same frames, in the same run:

- **baseline**: the serial reference, `streamer.live.pipeline.LivePipeline.process` (what
  `dvp serve` ran before the engine): one stage after another in one thread, the eager
  render, the generator's output downloaded to pageable memory, marked on the CPU, then
  converted to yuv420p by libswscale (streamer.webrtc.media.video_frame) and encoded.
- **engine**: the product's live engine, `streamer.live.engine.LiveEngine` (what
  `dvp serve` runs now; this script holds no engine code of its own): landmarks, fit,
  device stage and output overlapped in threads, CUDA graphs for fit, render and generator,
  the mark and yuv420p on the GPU, the pinned asynchronous download. Its frames go, as in
  the server, into an encoder-ready av.VideoFrame of the planes (no colour conversion) and
  to an encoder thread standing in for aiortc's sender (`SenderStandIn`: encodes the newest
  frame, as aiortc does in its executor).

Figures per size:

- `baseline`: `stage_ms` (median, p95) of the reference's stages plus `colour` (libswscale)
  and `encode`; `frame_ms`: their sum; `fps` = 1000 / mean frame_ms.
- `engine.latency_ms`: one frame in flight at a time (the next one is handed over when the
  previous one came out): from the decoded frame handed to the engine (`submit`) to its
  encoder-ready frame handed to the sender, p50 / p95; `encode_ms` beside it;
  `engine.stage_ms`: each stage's own time (`OutputFrame.stage_ms`; the device stages in
  GPU time, from CUDA events).
- `engine.throughput`: one session fed as fast as it takes frames (a new frame whenever its
  landmarks thread took the last): frames/s out of the engine, latency under that load;
  with `--sessions N` (N > 1) also N sessions fed so at once: frames/s of each and in all.
- `speedup` = engine frames/s (one session) / baseline fps.
- `checks`: the engine's frames against the reference's on the same frames (max and mean
  levels of the RGB), the GPU yuv420p against libswscale's.

Target: a synthetic actor (seed 1) prepared on the fly at each size from a few frames
(streamer.jobs.demo's synth and prepare); generator: a `paper` network with random weights
(timing does not depend on weights); source: another synthetic actor (seed 7), decoded and
played forward and back, or `--source VIDEO`. The tracker calibrates in the fit's own
thread during the warm-up (`tracker.calibrate_in_background=false`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.unet import UNet
from streamer.cli.config import Config, load_config

TARGET_SEED, SOURCE_SEED = 1, 7
FPS = 25.0
BASE_STAGES = ("convert", "landmarks", "fit", "transfer", "render", "window", "generator",
               "output", "colour", "encode")
ENGINE_STAGES = ("convert", "landmarks", "fit", "transfer", "queue", "render", "window",
                 "generator", "output", "download")


def machine(device: torch.device) -> dict[str, Any]:
    """The machine and device this run measured."""
    info: dict[str, Any] = {"host": platform.node(), "cpu": platform.processor() or
                            platform.machine(), "cpu_cores": os.cpu_count(),
                            "torch_threads": torch.get_num_threads(),
                            "python": platform.python_version(), "torch": torch.__version__}
    info["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"cpu ({os.cpu_count()} cores)")
    for name in ("mediapipe", "av", "aiortc", "cupy"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken: say so
            info[name] = None
    return info


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    if not a.size:
        return {"median": float("nan"), "p95": float("nan")}
    return {"median": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3)}


def make_encoder(codec: str) -> Any:
    """aiortc's encoder of `codec` (the one a live session negotiates)."""
    if codec == "vp8":
        from aiortc.codecs.vpx import Vp8Encoder

        return Vp8Encoder()
    from aiortc.codecs.h264 import H264Encoder

    return H264Encoder()


class SenderStandIn:
    """What aiortc's sender does with a session's frames: the newest one is encoded in a
    thread of its own (aiortc: its loop's executor); a frame arriving while one waits
    replaces it. Records each encode's ms and the frames encoded."""

    def __init__(self, codec: str) -> None:
        from streamer.live.pipeline import LatestSlot

        self.encoder = make_encoder(codec)
        self.slot = LatestSlot()
        self.encode_ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sender", daemon=True)
        self._thread.start()

    def put(self, frame: Any) -> None:
        self.slot.put(frame)

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self.slot.get(timeout=0.2)
            if frame is None:
                continue
            tick = time.perf_counter()
            self.encoder.encode(frame)
            self.encode_ms.append((time.perf_counter() - tick) * 1e3)

    def close(self) -> None:
        self._stop.set()
        self.slot.close()
        self._thread.join(10)


class Source:
    """Source frames played forward and back forever, with timestamps at FPS."""

    def __init__(self, frames: np.ndarray | list[np.ndarray]) -> None:
        self.frames = frames
        self.index = 0

    def next(self) -> tuple[np.ndarray, float]:
        n = len(self.frames)
        period = max(1, 2 * n - 2)
        k = self.index % period
        rgb = self.frames[k if k < n else period - k]
        t = self.index / FPS
        self.index += 1
        return rgb, t


# ---- the baseline: the serial reference ------------------------------------------------
def run_baseline(target: Any, config: Config, source: Source, frames: int, warm: int,
                 codec: str, progress: str) -> dict[str, Any]:
    """LivePipeline.process per frame, then libswscale's yuv420p and the encoder."""
    from streamer.live.pipeline import LivePipeline
    from streamer.live.stages import make_session_stages
    from streamer.webrtc.media import video_frame

    pipeline = LivePipeline(target, make_session_stages(target, config), config,
                            eyelook=target.eyelook, eyelook_index=target.eyelook_index)
    encoder = make_encoder(codec)
    times: dict[str, list[float]] = {s: [] for s in BASE_STAGES}
    bar = _bar(warm + frames, progress)
    try:
        for i in range(warm + frames):
            rgb, t = source.next()
            out = pipeline.process(rgb, t)
            tick = time.perf_counter()
            frame = video_frame(out.image, t)
            tock = time.perf_counter()
            encoder.encode(frame)
            if i >= warm:
                for key in BASE_STAGES[:-2]:
                    times[key].append(out.stage_ms.get(key, 0.0))
                times["colour"].append((tock - tick) * 1e3)
                times["encode"].append((time.perf_counter() - tock) * 1e3)
            bar.update(1)
    finally:
        bar.close()
        pipeline.close()
    frame_ms = np.sum([times[s] for s in BASE_STAGES], axis=0)
    return {"path": "LivePipeline.process (serial reference) + libswscale + encoder",
            "stage_ms": {s: _stats(times[s]) for s in BASE_STAGES},
            "frame_ms": _stats(frame_ms.tolist()),
            "fps": round(1000.0 / float(np.mean(frame_ms)), 2)}


# ---- the engine --------------------------------------------------------------------------
class EngineFeed:
    """One engine session as the server drives it: frames submitted, each output made an
    encoder-ready av.VideoFrame (streamer.webrtc.media.yuv_video_frame, as the server's
    `PeerSession.on_output`) and handed to a SenderStandIn; the hand-over times recorded."""

    def __init__(self, engine: Any, source: Source, codec: str, name: str) -> None:
        self.source = source
        self.sender = SenderStandIn(codec)
        self.cond = threading.Condition()
        self.outputs = 0
        self.handoff: list[tuple[float, float]] = []  # (time.monotonic(), ms)
        self.stage_ms: list[dict[str, float]] = []
        self.batches: list[int] = []
        self.session = engine.open_session(self._on_output, name=name, output="yuv420p")
        self.session.start()
        if not self.session.wait_ready(120) or self.session.setup_error is not None:
            raise RuntimeError(f"the engine session did not start: {self.session.setup_error}")

    def _on_output(self, out: Any) -> None:
        from streamer.webrtc.media import yuv_video_frame

        frame = yuv_video_frame(out.yuv, out.timestamp)
        self.sender.put(frame)
        now = time.monotonic()
        with self.cond:
            self.outputs += 1
            self.handoff.append((now, (now - out.received) * 1e3))
            self.stage_ms.append(dict(out.stage_ms))
            self.batches.append(out.batch)
            self.cond.notify_all()

    def paced(self, frames: int, bar: Any = None) -> None:
        """`frames` frames, each handed over once the previous one came out."""
        for _ in range(frames):
            with self.cond:
                target = self.outputs + 1
            self.session.submit(*self.source.next())
            with self.cond:
                if not self.cond.wait_for(lambda t=target: self.outputs >= t, 60):
                    raise TimeoutError("the engine gave no frame within 60 s")
            if bar is not None:
                bar.update(1)

    def flood(self, seconds: float, stop: threading.Event) -> None:
        """A new frame whenever the session's landmarks thread took the last one."""
        end = time.monotonic() + seconds
        while time.monotonic() < end and not stop.is_set():
            if self.session.wait_input_taken(0.1):
                self.session.submit(*self.source.next())

    def reset(self) -> None:
        with self.cond:
            self.handoff.clear()
            self.stage_ms.clear()
            self.batches.clear()
            self.sender.encode_ms.clear()

    def close(self) -> None:
        self.session.close()
        self.sender.close()


def _fps(handoff: list[tuple[float, float]]) -> float:
    if len(handoff) < 2:
        return 0.0
    return round((len(handoff) - 1) / (handoff[-1][0] - handoff[0][0]), 2)


def run_engine(engine: Any, frames_src: Any, frames: int, warm: int, sessions: int,
               seconds: float, codec: str, size: int) -> dict[str, Any]:
    feeds = [EngineFeed(engine, Source(frames_src), codec, f"bench-{k}")
             for k in range(sessions)]
    try:
        bar = _bar(warm * sessions + frames, f"engine {size}: warm-up, latency")
        for feed in feeds:  # calibration (in the fit thread), graphs warm, cuDNN settled
            feed.paced(warm, bar)
        one = feeds[0]
        one.reset()
        one.paced(frames, bar)
        bar.close()
        result: dict[str, Any] = {
            "latency_ms": _stats([ms for _, ms in one.handoff]),
            "encode_ms": _stats(one.sender.encode_ms),
            "stage_ms": {s: _stats([m.get(s, 0.0) for m in one.stage_ms])
                         for s in ENGINE_STAGES},
        }
        one.reset()
        one.flood(seconds, threading.Event())
        time.sleep(0.3)
        result["throughput"] = {
            "sessions": 1, "seconds": seconds, "fps": _fps(one.handoff),
            "latency_ms": _stats([ms for _, ms in one.handoff]),
            "encoded_fps": round(len(one.sender.encode_ms) / seconds, 2),
            "dropped": one.session.dropped}
        if sessions > 1:
            for feed in feeds:
                feed.reset()
            stop = threading.Event()
            threads = [threading.Thread(target=f.flood, args=(seconds, stop)) for f in feeds]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            time.sleep(0.3)
            each = [_fps(f.handoff) for f in feeds]
            result["throughput_sessions"] = {
                "sessions": sessions, "seconds": seconds, "fps_each": each,
                "fps_total": round(sum(each), 2),
                "latency_ms_each": [_stats([ms for _, ms in f.handoff]) for f in feeds],
                "batch_mean": round(float(np.mean(
                    [b for f in feeds for b in f.batches] or [1])), 2)}
        return result
    finally:
        for feed in feeds:
            feed.close()


def checks(target: Any, config: Config, frames_src: Any, count: int = 12) -> dict[str, Any]:
    """The engine's RGB frames against the reference's on the same frames; the device's
    yuv420p against libswscale's on the last of them."""
    import av

    from streamer.live.engine import LiveEngine
    from streamer.live.output import rgb_to_yuv420p
    from streamer.live.pipeline import LivePipeline
    from streamer.live.stages import make_session_stages

    source = Source(frames_src)
    frames = [source.next() for _ in range(count)]
    pipeline = LivePipeline(target, make_session_stages(target, config), config,
                            eyelook=target.eyelook, eyelook_index=target.eyelook_index)
    ref = [pipeline.process(rgb, t).image for rgb, t in frames]
    pipeline.close()
    engine = LiveEngine(target, config, max_sessions=1)
    got: list[Any] = []
    cond = threading.Condition()

    def keep(out: Any) -> None:
        with cond:
            got.append(out.image)
            cond.notify_all()

    session = engine.open_session(keep, output="rgb")
    session.start()
    try:
        session.wait_ready(120)
        for k, (rgb, t) in enumerate(frames):
            session.submit(rgb, t)
            with cond:
                cond.wait_for(lambda k=k: len(got) > k, 60)
    finally:
        session.close()
        engine.close()
    diff = np.abs(np.stack(got).astype(np.int16) - np.stack(ref).astype(np.int16))
    rgb = np.ascontiguousarray(got[-1])
    ours = rgb_to_yuv420p(torch.from_numpy(rgb).to(target.device)).cpu().numpy()
    theirs = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p").to_ndarray()
    s = rgb.shape[0]
    cdiff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    return {"engine_vs_reference_max_levels": int(diff.max()),
            "engine_vs_reference_mean_levels": round(float(diff.mean()), 4),
            "colour_y_max_abs_levels": int(cdiff[:s].max()),
            "colour_uv_max_abs_levels": int(cdiff[s:].max()),
            "colour_uv_mean_abs_levels": round(float(cdiff[s:].mean()), 3)}


def _bar(total: int, desc: str | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False, disable=desc is None,
                file=sys.stderr)


def prepare(workdir: Path, size: int, target_frames: int, source_frames: int,
            source_size: int, config: Config, device: torch.device) -> Path:
    """The target directory at `size`."""
    from streamer.jobs.demo import prepare_demo_target, write_synth_actor

    actor = write_synth_actor(workdir / f"target-actor-{size}", TARGET_SEED, target_frames,
                              size, FPS, device, desc="synth target")
    root = workdir / f"target-{size}"
    prepare_demo_target(root, actor / "video.mp4", TARGET_SEED, size, "paper", config, device)
    return root


def source_frames(args: argparse.Namespace, workdir: Path, device: torch.device) -> Any:
    from streamer.jobs.demo import write_synth_actor
    from streamer.video.io import read_video

    if args.source:
        from streamer.video.io import read_frames

        return [np.ascontiguousarray(rgb) for rgb, _ in
                read_frames(Path(args.source), max_frames=args.source_frames)]
    src = workdir / f"source-{args.source_size}"
    if not (src / "video.mp4").is_file():
        write_synth_actor(src, SOURCE_SEED, args.source_frames, args.source_size, FPS, device,
                          desc="synth source")
    frames, _, _ = read_video(src / "video.mp4")
    return frames


def bench_size(size: int, args: argparse.Namespace, config: Config, device: torch.device,
               workdir: Path, face_model: Any, frames_src: Any) -> dict[str, Any]:
    from generator.config import PRESETS
    from generator.runtime import make_runtime
    from streamer.live.engine import LiveEngine
    from streamer.live.stages import LoadedTarget

    started = time.perf_counter()
    root = prepare(workdir, size, args.target_frames, args.source_frames, args.source_size,
                   config, device)
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    model = UNet(size, config.renderer.window, preset.ngf, preset.upsample,
                 preset.input_skip).eval()
    runtime = make_runtime(model, config.generator.backend, device)
    target = LoadedTarget(root, config, device, runtime=runtime, face_model=face_model)
    warm = int(np.ceil(config.tracker.calibration_seconds * FPS)) + 10
    result: dict[str, Any] = {"prepare_s": round(time.perf_counter() - started, 1)}
    result["baseline"] = run_baseline(target, config, Source(frames_src), args.frames, warm,
                                      args.codec, f"baseline {size}")
    engine = LiveEngine(target, config, max_sessions=max(1, args.sessions))
    try:
        result["engine"] = {"path": "streamer.live.engine.LiveEngine (what dvp serve runs)",
                            "choices": {k: {"chosen": c.chosen, "why": c.why}
                                        for k, c in engine.choices().items()}}
        result["engine"].update(run_engine(engine, frames_src, args.frames, warm,
                                           args.sessions, args.seconds, args.codec, size))
    finally:
        engine.close()
    result["speedup"] = round(result["engine"]["throughput"]["fps"]
                              / result["baseline"]["fps"], 2)
    result["checks"] = checks(target, config, frames_src)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--frames", type=int, default=200,
                        help="measured frames per paced run (default 200)")
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="seconds of each fed-as-fast-as-taken run (default 10)")
    parser.add_argument("--sessions", type=int, default=1,
                        help="also feed N sessions at once as fast as they take frames")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--codec", default="vp8", choices=["vp8", "h264"],
                        help="the encoder of a live session (default vp8, what browsers "
                             "offer first)")
    parser.add_argument("--preset", default="paper", choices=["paper", "tiny"],
                        help="generator network (random weights; default paper)")
    parser.add_argument("--source", help="source video (default: a synthetic actor)")
    parser.add_argument("--source-size", type=int, default=480,
                        help="side of the square synthetic source frames, px (default 480)")
    parser.add_argument("--source-frames", type=int, default=60,
                        help="frames of the source clip, played forward and back (60)")
    parser.add_argument("--target-frames", type=int, default=16,
                        help="frames of the throwaway target (default 16)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default 0: streamer.cpu_threads)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="config override, as dvp's --set")
    args = parser.parse_args(argv)

    from tracker.assets import load_face_model
    from tracker.device import pick_device

    config = load_config(None, ["renderer.photometric_steps=30",
                                "tracker.calibrate_in_background=false", *args.overrides])
    device = pick_device(args.device)
    torch.set_num_threads(args.threads or config.streamer.cpu_threads or torch.get_num_threads())
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    face_model = load_face_model()
    report: dict[str, Any] = {
        "bench": "pipeline",
        "machine": machine(device),
        "note": (f"generator: '{args.preset}' network with random weights (timing does not "
                 "depend on weights); target: synthetic actor (seed 1) prepared on the fly "
                 f"from {args.target_frames} frames at each size; source: "
                 + (Path(args.source).name if args.source else
                    f"synthetic actor (seed 7), {args.source_frames} frames at "
                    f"{args.source_size} px")
                 + ", played forward and back; baseline (serial reference) and engine "
                 "measured in this run"),
        "frames": args.frames,
        "codec": args.codec,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="dvp-bench-pipeline-") as tmp:
        frames_src = source_frames(args, Path(tmp), device)
        for size in args.sizes:
            report["sizes"][str(size)] = bench_size(size, args, config, device, Path(tmp),
                                                    face_model, frames_src)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
