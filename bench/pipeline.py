"""The whole live path, stage by stage, baseline against overlapped (issue 7), as JSON.

    python bench/pipeline.py [--sizes 256 512] [--frames N] [--device auto|cpu|cuda]
                             [--codec vp8|h264] [--preset paper|tiny] [--set KEY=VALUE ...]

Stages of one source frame (the objects of the live pipeline, streamer.live.stages and
streamer.live.pipeline, made as `dvp serve` makes them): `landmarks` (MediaPipe, CPU), `fit`
(tracker.tracker.FaceTracker.step), `transfer` (TransferStage and the face-loss easing),
`render` (the target's conditioning images), `window` (LiveWindow, 11 frames),
`generator`, `colour` (the synthetic mark and RGB -> yuv420p, with the download to the
host), `encode` (aiortc's VP8 or H.264 encoder, as a live session sends).

Two configurations of the same stages, in the same run:

- **baseline**: one stage after another in one thread, no overlap; no CUDA graphs (the fit
  and the render launch their kernels one by one), the generator in fp32 eager mode, the
  RGB output downloaded to pageable memory, marked and converted to yuv420p on the CPU
  (libswscale via PyAV, streamer.webrtc.media.video_frame).
- **optimised**: the fit's CUDA graph (tracker.cuda_graphs), the render replayed from a
  CUDA graph (renderer.conditioning.GraphedRenderer), the generator as the `torch` runtime
  (fp16, channels_last, CUDA graph); data stays on the GPU from the render to the colour
  conversion (mark and yuv420p computed on the GPU, a 1.5-byte-per-pixel download into
  pinned memory, asynchronous, on a stream of its own); and the stages overlap in three
  threads: landmarks of frame t+1 on a CPU thread while the GPU thread fits, transfers and
  renders frame t, and an encoder thread encodes frame t-1. On the CPU only the overlap
  applies (no graphs, fp32, colour on the CPU).

Figures per size and configuration: `stage_ms` (median and p95 of each stage, each stage
synchronised so that its time is its own); `frame_ms` (their sum: one frame through every
stage); for the baseline `fps` = 1000 / mean frame_ms (what one-after-another gives); for
the optimised configuration `throughput_fps` (frames fed as fast as they are taken,
overlapped), `latency_ms` (one frame in flight at a time: source frame in -> encoded
packets out) and `loaded_latency_ms` (the same, while running at full throughput);
`speedup` = throughput_fps / baseline fps. `checks` compare the optimised stages with the
baseline's outputs (graphed render, GPU colour conversion, fp16 generator) on one frame.

Target: a synthetic actor (seed 1) prepared on the fly at each size from a few frames
(streamer.jobs.demo's synth and prepare); generator: a `paper` network with random weights
(timing does not depend on weights); source: another synthetic actor (seed 7), decoded
from its video and played forward and back, so MediaPipe finds a face in every frame.

Imports beyond torch and numpy: mediapipe (landmarks), av (PyAV: video I/O, colour, and
the encoders), aiortc (its VP8 / H.264 encoders), scipy, opencv (cv2), pyyaml, tqdm,
pillow, scikit-image; cupy for the CUDA rasterizer and the graphed render (without it the
render is the eager reference rasterizer, and `setup` says so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.samples import to_uint8_image
from generator.unet import UNet
from streamer.cli.config import Config, load_config

STAGES = ("landmarks", "fit", "transfer", "render", "window", "generator", "colour", "encode")
TARGET_SEED, SOURCE_SEED = 1, 7
FPS = 25.0
#: Pinned download buffers in flight between the GPU thread and the encoder thread.
RING = 4


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"median": round(float(np.median(a)), 3), "p95": round(float(np.percentile(a, 95)), 3)}


# ---- stage objects the live pipeline does not have ------------------------------------------
class EagerFp32:
    """The baseline generator: the network in fp32, eager, BatchNorm unfolded, no graph."""

    backend = "eager-fp32"

    def __init__(self, model: UNet, device: torch.device) -> None:
        self.device = device
        self.model = model.to(device).eval()

    @torch.inference_mode()
    def __call__(self, window: torch.Tensor) -> torch.Tensor:
        return to_uint8_image(self.model(window))  # B,S,S,3 uint8


class DeviceOutput:
    """The synthetic mark and RGB -> yuv420p on the device (what pipeline.py could adopt).

    The mark is streamer.video.mark's (its layout, text and box darkening, checked against
    `draw_synthetic_mark` in `checks`); the conversion is BT.601 limited range with 2 x 2
    chroma averaging (libswscale's default for rgb24 -> yuv420p has the same matrix, Y agrees
    to one level; its chroma filter differs a little). `__call__(rgb [S, S, 3]
    uint8)` -> `[S*3/2, S]` uint8 (Y, then U, then V planes): PyAV's yuv420p ndarray layout.
    """

    def __init__(self, size: int, device: torch.device, mark: bool) -> None:
        from streamer.video.mark import _BOX_KEEP, mark_layout

        if size % 4:
            raise ValueError(f"size must be a multiple of 4, got {size}")
        self.size, self.mark = size, mark
        (self.rows, self.cols), text = mark_layout(size, size)
        self.text = torch.from_numpy(np.array(text)).to(device)[..., None]
        self.keep = int(_BOX_KEEP * 256)

    @torch.inference_mode()
    def __call__(self, rgb: torch.Tensor) -> torch.Tensor:
        s = self.size
        if self.mark:
            region = rgb[self.rows, self.cols]
            dark = ((region.to(torch.int32) * self.keep) >> 8).to(torch.uint8)
            rgb = rgb.clone()
            rgb[self.rows, self.cols] = torch.where(self.text, torch.full_like(dark, 255), dark)
        x = rgb.to(torch.int32)  # integer arithmetic, elementwise (no integer matmul on CUDA)
        r, g, b = x[..., 0], x[..., 1], x[..., 2]
        y = ((66 * r + 129 * g + 25 * b + 128) >> 8) + 16  # S,S
        q = x.reshape(s // 2, 2, s // 2, 2, 3).sum((1, 3), dtype=torch.int32)  # 4 x the mean
        r, g, b = q[..., 0], q[..., 1], q[..., 2]
        u = ((-38 * r - 74 * g + 112 * b + 512) >> 10) + 128  # S/2,S/2
        v = ((112 * r - 94 * g - 18 * b + 512) >> 10) + 128
        planes = [y.reshape(-1), u.reshape(-1), v.reshape(-1)]
        return torch.cat(planes).clamp(0, 255).to(torch.uint8).reshape(s * 3 // 2, s)


def make_encoder(codec: str) -> Any:
    """aiortc's encoder of `codec` (the one a live session negotiates)."""
    if codec == "vp8":
        from aiortc.codecs.vpx import Vp8Encoder

        return Vp8Encoder()
    from aiortc.codecs.h264 import H264Encoder

    return H264Encoder()


def yuv_frame(yuv: np.ndarray, seconds: float) -> Any:
    """An encoder-ready av.VideoFrame of yuv420p planes `[S*3/2, S]`, stamped as
    streamer.webrtc.media.video_frame stamps."""
    import av

    from streamer.webrtc.media import VIDEO_CLOCK, VIDEO_TIME_BASE

    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    frame.pts = round(seconds * VIDEO_CLOCK)
    frame.time_base = VIDEO_TIME_BASE
    return frame


# ---- one session's live path -----------------------------------------------------------------
class LivePath:
    """One session's stages on a target (baseline or optimised; see the module doc)."""

    def __init__(self, root: Path, config: Config, device: torch.device, model: UNet,
                 optimised: bool, codec: str, face_model: Any) -> None:
        from generator.runtime import make_runtime
        from renderer.conditioning import Camera, GraphedRenderer, LiveWindow
        from streamer.live.pipeline import FaceLossEasing
        from streamer.live.stages import LoadedTarget, TrackerStage, TransferStage

        cuda = device.type == "cuda"
        self.device, self.optimised, self.cuda = device, optimised, cuda
        tracker_config = replace(config.tracker, cuda_graphs=optimised)
        self.config = replace(config, tracker=tracker_config)
        runtime = make_runtime(model, "torch" if cuda else "cpu", device) if optimised \
            else EagerFp32(model, device)
        self.target = LoadedTarget(root, self.config, device, runtime=runtime,
                                   face_model=face_model)
        self.size = self.target.size
        self.tracker = TrackerStage(self.target, self.config)
        self.transfer = TransferStage(self.target, self.config, self.tracker)
        self.easing = FaceLossEasing(config.streamer.ease_seconds, self.target.eyelook,
                                     self.target.eyelook_index)
        self.window = LiveWindow(self.target.fps, self.target.n_w)
        self.encoder = make_encoder(codec)
        self.mark = config.streamer.synthetic_mark
        self.graphed: Any = None
        self.render_note = "eager (kernel by kernel)"
        if optimised and cuda:
            try:
                self.graphed = GraphedRenderer(self.target.conditioner,
                                               self.target.params.identity,
                                               Camera.of(self.target.params))
                self.render_note = "CUDA graph (GraphedRenderer)"
            except Exception as err:  # noqa: BLE001 - say why, time the eager render
                self.render_note = f"eager: no CUDA graph ({err})"
        self.output = DeviceOutput(self.size, device, self.mark) if optimised and cuda else None
        # the fit and the render-to-download chain each on a stream of their own (not the
        # legacy default stream, which would serialise them), so that the fit of frame t+1
        # runs while frame t's generator still runs
        self.stream = torch.cuda.Stream(device) if optimised and cuda else None
        self.fit_stream = torch.cuda.Stream(device, priority=-1) if optimised and cuda \
            else None  # high priority: the fit is small and on the critical path
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        if self.output is not None:
            for _ in range(RING):
                self.free.put(torch.empty((self.size * 3 // 2, self.size), dtype=torch.uint8,
                                          pin_memory=True))
        from streamer.live.controls import Controls

        self.controls = Controls()

    def setup(self) -> dict[str, Any]:
        return {
            "overlap": self.optimised,
            "fit": "CUDA graph" if self.optimised and self.cuda else "eager",
            "rasterizer": self.target.conditioner.backend,
            "render": self.render_note,
            "generator": f"{self.target.runtime.backend}"
                         + (" (fp16, CUDA graph)" if self.optimised and self.cuda else
                            " (fp32)"),
            "colour": ("device: mark + yuv420p, pinned async download" if self.output
                       is not None else "cpu: download, mark, libswscale (PyAV)"),
            "encoder": type(self.encoder).__name__,
            "synthetic_mark": self.mark,
        }

    # -- the stages --
    def landmarks(self, rgb: np.ndarray) -> Any:
        return self.tracker.detector(rgb)

    def fit(self, landmarks: Any, t: float) -> Any:
        frame = self.tracker.tracker.step(landmarks, t)
        return self.tracker.tracker.to_params([frame]) if frame.valid else None

    def transferred(self, source: Any, t: float) -> Any:
        tracked = self.transfer(source, self.controls) if source is not None else None
        return self.easing(tracked, self.transfer.rest(self.controls), t)

    def render(self, params: Any) -> torch.Tensor:
        if self.graphed is None:
            return self.target.render(params)  # 9,S,S
        out = self.graphed(params.expression, params.rotation, params.translation, params.sh,
                           params.gaze)
        return out.frames[0].clone()  # the graph's output is overwritten by the next call

    def windowed(self, t: float, cond: torch.Tensor) -> torch.Tensor:
        return self.window.push(t, cond)  # 9*n_w,S,S

    def generate(self, window: torch.Tensor) -> torch.Tensor:
        return self.target.runtime(window[None])  # 1,S,S,3 uint8 on the device

    def colour(self, rgb: torch.Tensor, t: float) -> Any:
        """Start the colour conversion: an av.VideoFrame (CPU path), or (event, pinned
        buffer) whose download is under way (device path)."""
        if self.output is None:
            from streamer.video.mark import draw_synthetic_mark
            from streamer.webrtc.media import video_frame

            image = rgb[0].cpu().numpy()
            if self.mark:
                draw_synthetic_mark(image)
            return video_frame(image, t)
        buffer = self.free.get()
        buffer.copy_(self.output(rgb[0]), non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return event, buffer

    def finish_colour(self, handle: Any, t: float) -> Any:
        """The av.VideoFrame of a `colour` handle (waits for its download)."""
        if self.output is None:
            return handle
        event, buffer = handle
        event.synchronize()
        frame = yuv_frame(buffer.numpy(), t)  # copies the planes into the frame
        self.free.put(buffer)
        return frame

    def encode(self, frame: Any) -> int:
        payloads, _ = self.encoder.encode(frame)
        return sum(len(p) for p in payloads)

    def device_context(self) -> Any:
        """Where the render, window, generator and colour stages run."""
        return torch.cuda.stream(self.stream) if self.stream is not None else _Null()

    def fit_context(self) -> Any:
        """Where the fit runs."""
        return torch.cuda.stream(self.fit_stream) if self.fit_stream is not None else _Null()

    def close(self) -> None:
        self.tracker.close()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class Source:
    """Source frames played forward and back forever, with timestamps at FPS."""

    def __init__(self, frames: np.ndarray) -> None:
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


# ---- the runs --------------------------------------------------------------------------------
def run_staged(path: LivePath, source: Source, frames: int, progress: str | None = None
               ) -> dict[str, list[float]]:
    """`frames` frames one after another, each stage synchronised: ms per stage."""
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    dev = path.device
    bar = _bar(frames, progress)
    for _ in range(frames):
        rgb, t = source.next()
        marks = [time.perf_counter()]

        def tick(marks: list[float] = marks) -> None:
            _sync(dev)
            marks.append(time.perf_counter())

        lm = path.landmarks(rgb)
        tick()
        with path.fit_context():
            params = path.fit(lm, t)
        tick()
        target_params = path.transferred(params, t)
        tick()
        with path.device_context():
            cond = path.render(target_params)
            tick()
            window = path.windowed(t, cond)
            tick()
            out = path.generate(window)
            tick()
            handle = path.colour(out, t)
            frame = path.finish_colour(handle, t)
            tick()
        path.encode(frame)
        tick()
        for name, a, b in zip(STAGES, marks, marks[1:]):
            times[name].append((b - a) * 1e3)
        bar.update(1)
    bar.close()
    return times


def run_overlapped(path: LivePath, source: Source, frames: int, paced: bool,
                   progress: str | None = None) -> dict[str, Any]:
    """`frames` frames through three threads (landmarks | fit ... colour | encode).

    paced: the next frame enters only when the previous one is encoded (latency of one frame
    in flight); else frames enter as fast as the landmarks thread takes them (throughput).
    The landmarks thread starts frame t+1 once the device thread has taken frame t, just in
    time: when the device thread's remaining time on frame t (moving averages) equals the
    landmarks' time, as a live session would take the newest camera frame then. So the
    landmarks of t+1 overlap frame t's fit, render and generator, and frames never wait in
    a queue (the live pipeline's latest-frame-wins slot drops them instead); the queues
    between the threads hold one frame each.
    """
    q_fit: queue.Queue[Any] = queue.Queue(maxsize=1)
    q_enc: queue.Queue[Any] = queue.Queue(maxsize=1)
    entered = np.zeros(frames)
    finished = np.zeros(frames)
    busy: dict[str, list[float]] = {"landmarks thread": [], "device thread": [],
                                    "encoder thread": []}
    ready = threading.Semaphore(1)  # paced: the previous frame is encoded
    taken = threading.Semaphore(1)  # the device thread has taken the previous frame
    clock = {"device_start": 0.0, "device_ms": 0.0, "landmarks_ms": 0.0}  # moving averages
    stop = threading.Event()
    errors: list[BaseException] = []
    bar = _bar(frames, progress)

    def put(q: queue.Queue[Any], item: Any) -> None:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def get(q: queue.Queue[Any]) -> Any:
        while not stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def guarded(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - re-raised in the main thread
                errors.append(err)
                stop.set()
        return run

    def landmarks() -> None:
        for i in range(frames):
            for gate in ((ready, taken) if paced else (taken,)):
                while not gate.acquire(timeout=0.1):
                    if stop.is_set():
                        return
            if not paced and i > 0:  # just in time for the device thread
                wake = clock["device_start"] + (clock["device_ms"] - clock["landmarks_ms"]) / 1e3
                time.sleep(max(0.0, wake - time.perf_counter()))
            rgb, t = source.next()
            start = time.perf_counter()
            entered[i] = start
            lm = path.landmarks(rgb)
            ms = (time.perf_counter() - start) * 1e3
            busy["landmarks thread"].append(ms)
            clock["landmarks_ms"] = ms if i == 0 else 0.8 * clock["landmarks_ms"] + 0.2 * ms
            put(q_fit, (i, t, lm))
        put(q_fit, None)

    def device() -> None:
        while (item := get(q_fit)) is not None:
            start = time.perf_counter()
            clock["device_start"] = start
            taken.release()
            i, t, lm = item
            with path.fit_context():
                params = path.fit(lm, t)
            target_params = path.transferred(params, t)
            with path.device_context():
                window = path.windowed(t, path.render(target_params))
                handle = path.colour(path.generate(window), t)
            ms = (time.perf_counter() - start) * 1e3
            busy["device thread"].append(ms)
            clock["device_ms"] = ms if i == 0 else 0.8 * clock["device_ms"] + 0.2 * ms
            put(q_enc, (i, t, handle))
        put(q_enc, None)

    def encoder() -> None:
        while (item := get(q_enc)) is not None:
            i, t, handle = item
            start = time.perf_counter()
            path.encode(path.finish_colour(handle, t))
            finished[i] = time.perf_counter()
            busy["encoder thread"].append((finished[i] - start) * 1e3)
            bar.update(1)
            if paced:
                ready.release()

    threads = [threading.Thread(target=guarded(fn), name=f"bench-{fn.__name__}")
               for fn in (landmarks, device, encoder)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    bar.close()
    if errors:
        raise errors[0]
    latency = ((finished - entered) * 1e3).tolist()
    return {"fps": round((frames - 1) / (finished[-1] - finished[0]), 2),
            "latency_ms": _stats(latency),
            "thread_busy_ms": {k: _stats(v) for k, v in busy.items()}}


def _bar(total: int, desc: str | None) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="frame", leave=False, disable=desc is None,
                file=sys.stderr)


def warm_up(path: LivePath, source: Source, frames: int) -> None:
    """Calibrate the tracker (identity and focal over its first seconds), capture the graphs,
    let cuDNN choose its kernels; then a few frames more."""
    run_staged(path, source, frames, progress="warm-up")
    path.tracker.tracker.wait_for_calibration(timeout=120)
    run_staged(path, source, 5)


def checks(base: LivePath, opt: LivePath, source: Source) -> dict[str, Any]:
    """The optimised stages against the baseline's, on one frame (`source` continues the
    baseline's stream)."""
    from streamer.video.mark import draw_synthetic_mark
    from streamer.webrtc.media import video_frame

    out: dict[str, Any] = {}
    rgb, t = source.next()
    params = base.transferred(base.fit(base.landmarks(rgb), t), t)
    cond = base.target.render(params)
    _sync(base.device)
    if opt.graphed is not None:
        with opt.device_context():
            graphed = opt.render(params)
        _sync(opt.device)
        out["render_graph_max_abs"] = float((graphed - cond).abs().max())
    window = torch.cat([cond] * base.target.n_w)
    with opt.device_context():
        fast = opt.generate(window)
    _sync(opt.device)
    slow = base.generate(window)
    out["generator_max_abs_levels"] = int((fast.int() - slow.int()).abs().max())
    out["generator_mean_abs_levels"] = round(float((fast.float() - slow.float()).abs().mean()),
                                             3)
    # the device colour conversion (also computed on the CPU, to check it there)
    image = slow[0].cpu().numpy().copy()  # on the CPU .numpy() shares the tensor's memory
    if base.mark:
        draw_synthetic_mark(image)
    reference = video_frame(image, 0.0).to_ndarray()  # S*3/2,S: yuv420p planes
    yuv = DeviceOutput(base.size, base.device, base.mark)(slow[0]).cpu().numpy()
    s = base.size
    diff = np.abs(yuv.astype(np.int32) - reference.astype(np.int32))
    out["colour_y_max_abs_levels"] = int(diff[:s].max())
    out["colour_uv_max_abs_levels"] = int(diff[s:].max())
    out["colour_mean_abs_levels"] = round(float(diff.mean()), 3)
    return out


def prepare(workdir: Path, size: int, target_frames: int, source_frames: int,
            source_size: int, config: Config, device: torch.device) -> tuple[Path, np.ndarray]:
    """The target directory at `size` and the decoded source frames."""
    from streamer.jobs.demo import prepare_demo_target, write_synth_actor
    from streamer.video.io import read_video

    actor = write_synth_actor(workdir / f"target-actor-{size}", TARGET_SEED, target_frames,
                              size, FPS, device, desc="synth target")
    root = workdir / f"target-{size}"
    prepare_demo_target(root, actor / "video.mp4", TARGET_SEED, size, "paper", config, device)
    src = workdir / f"source-{source_size}"
    if not (src / "video.mp4").is_file():
        write_synth_actor(src, SOURCE_SEED, source_frames, source_size, FPS, device,
                          desc="synth source")
    frames, _, _ = read_video(src / "video.mp4")
    return root, frames


def bench_size(size: int, args: argparse.Namespace, config: Config, device: torch.device,
               workdir: Path, face_model: Any) -> dict[str, Any]:
    from generator.config import PRESETS

    started = time.perf_counter()
    root, frames = prepare(workdir, size, args.target_frames, args.source_frames,
                           args.source_size, config, device)
    torch.manual_seed(0)
    model = UNet(size, config.renderer.window, PRESETS[args.preset].ngf).eval()
    warm = int(np.ceil(config.tracker.calibration_seconds * FPS)) + 10
    result: dict[str, Any] = {"prepare_s": round(time.perf_counter() - started, 1)}

    base = LivePath(root, config, device, model, False, args.codec, face_model)
    opt = LivePath(root, config, device, model, True, args.codec, face_model)
    try:
        base_source = Source(frames)
        warm_up(base, base_source, warm)
        staged = run_staged(base, base_source, args.frames, progress=f"baseline {size}")
        frame_ms = np.sum([staged[s] for s in STAGES], axis=0)
        result["baseline"] = {
            "setup": base.setup(),
            "stage_ms": {s: _stats(staged[s]) for s in STAGES},
            "frame_ms": _stats(frame_ms.tolist()),
            "fps": round(1000.0 / float(np.mean(frame_ms)), 2),
        }
        source = Source(frames)
        warm_up(opt, source, warm)
        staged = run_staged(opt, source, args.frames, progress=f"optimised staged {size}")
        frame_ms = np.sum([staged[s] for s in STAGES], axis=0)
        single = run_overlapped(opt, source, max(10, args.frames // 2), paced=True,
                                progress=f"optimised latency {size}")
        loaded = run_overlapped(opt, source, args.frames, paced=False,
                                progress=f"optimised throughput {size}")
        result["optimised"] = {
            "setup": opt.setup(),
            "stage_ms": {s: _stats(staged[s]) for s in STAGES},
            "frame_ms": _stats(frame_ms.tolist()),
            "throughput_fps": loaded["fps"],
            "latency_ms": single["latency_ms"],
            "loaded_latency_ms": loaded["latency_ms"],
            "thread_busy_ms": loaded["thread_busy_ms"],
        }
        result["speedup"] = round(loaded["fps"] / result["baseline"]["fps"], 2)
        result["checks"] = checks(base, opt, base_source)
    finally:
        base.close()
        opt.close()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--frames", type=int, default=200,
                        help="measured frames per run (default 200)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--codec", default="vp8", choices=["vp8", "h264"],
                        help="the encoder of a live session (default vp8, what browsers "
                             "offer first)")
    parser.add_argument("--preset", default="paper", choices=["paper", "tiny"],
                        help="generator network (random weights; default paper)")
    parser.add_argument("--source-size", type=int, default=480,
                        help="side of the square source frames, px (default 480)")
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

    config = load_config(None, ["renderer.photometric_steps=30", *args.overrides])
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
                 f"from {args.target_frames} frames at each size; source: synthetic actor "
                 f"(seed 7), {args.source_frames} frames at {args.source_size} px, played "
                 "forward and back; stage_ms synchronised per stage; baseline and optimised "
                 "measured in this run"),
        "frames": args.frames,
        "codec": args.codec,
        "sizes": {},
    }
    with tempfile.TemporaryDirectory(prefix="dvp-bench-pipeline-") as tmp:
        for size in args.sizes:
            report["sizes"][str(size)] = bench_size(size, args, config, device, Path(tmp),
                                                    face_model)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
