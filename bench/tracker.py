"""Tracker benchmarks, printed as JSON (never a timed test).

Timing (per device: the CPU, and CUDA when present): ms per frame of MediaPipe landmarks
(image 640x480, streaming), the regressor, the warm-started fit (iterations_warm), the gaze
fit, the cold start (regressor + iterations_cold) and a whole tracker step, batch 1; on CUDA
also the batched fit (ms per frame at batch 64) and the CUDA-graph replay of the warm step.

Accuracy: a synthetic sequence (random identity, smooth head motion, expressions, blinks,
gaze; 640x480, focal 600 px, MediaPipe's 478 points projected with 1 px Gaussian noise)
tracked by the tracker (calibration of identity and focal length, regressor cold start,
warm-started fits; smoothing off and on) against the baseline of the issue, measured in the
same run: each frame fitted alone from the mean face (identity 0, no expression, frontal at
the guessed focal length's depth), no warm start, the cold iteration budget. Errors: head
rotation (degrees), translation (cm), face-region vertices (mm; in the model frame, i.e.
the shape, and in the camera frame), gaze (degrees), and the warm fit's iterations.

Landmarks (`tracker.landmarks` backends, both in one run): ms per frame of MediaPipe (CPU;
streaming and per image) and of the torch port of its models (tracker/landmarks_torch.py)
per device: live (batch 1, streaming, detection skipped while tracking holds), per image
(detection every frame), and --batch streams per call (frames/s); on CUDA in float16 and
float32, with and without CUDA graphs, frames as numpy arrays or a uint8 CUDA tensor. On
the first --landmark-frames frames of franck_talking_200s.webm (--media). Parity: the torch
backend against MediaPipe on the same frames of the three clips and a synthetic actor:
faces found, point distances over the inter-ocular distance (mean, p95, max) and the
tracker's fit from each (rotation deg, translation mm).

Video mode (`--video`): `dvp synth` actors (seeds 0.., each with its own focal length
0.9-2.2 S and lighting, and a still segment of `--still` seconds mid-clip) rendered to
video.mp4 by the CLI itself, then through the product's path: landmarks
(`tracker.landmarks`, streaming) on every decoded frame, the landmark fit
(`track_landmarks`, no known focal length), and the photometric refinement
(`renderer.refine.refine_video`), all in the same run so the two are compared on the same
landmarks. Errors against the ground truth, for landmark-only and refined tracking (both
smoothed by the tracker's One-Euro filter, as `dvp track` writes them): head rotation
(degrees, median and mean; the signed median pitch, yaw and roll), translation (cm,
median), face vertices (mm, ICT's narrow face: in the model frame, i.e. identity and
expression, and in the camera frame), jawOpen MAE and correlation, eyeBlink MAE, focal
length (percent), and the jitter at rest: over the still segment, the mean frame-to-frame
head rotation (degrees) and face-vertex motion (mm, camera frame). The same errors of the
landmark fit given the true focal length (`landmark_only_known_focal`), and the true focal
length and identity (`..._identity`), say how much of the error calibration leaves. Timing: frames per second
of the landmarks, the fit and the refinement (keyframe stage and per-frame stage).

Usage: python bench/tracker.py [--device cpu|cuda|all] [--frames N] [--seeds K] [--threads T]
                               [--landmarks-only] [--landmark-frames N] [--batch B]
                               [--media DIR] [--compile]
       python bench/tracker.py --video [--res 256] [--frames 1500] [--seeds 1] [--still 3]
                               [--device cpu|cuda] [--threads T]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.media import find_media
from tracker.assets import load_face_model
from tracker.config import TrackerConfig
from tracker.face_model import FaceModel
from tracker.fitting import Camera, FitState, LandmarkFitter, initial_translation
from tracker.params import FaceParams
from tracker.regressor import Regressor, load_or_train, settings_from_config
from tracker.rotation import angle_between_deg, axis_angle_to_matrix, matrix_to_axis_angle
from tracker.synthetic import SyntheticSequence, synthetic_sequence
from tracker.tracker import FaceTracker, track_landmarks


def machine() -> dict[str, object]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"host": platform.node(), "cpu": platform.processor() or platform.machine(),
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": str(torch.__version__),
            "load_average_1min": round(load[0], 2),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, iters: int, repeats: int = 5) -> float:
    """Best of `repeats` means over `iters` calls (ms); the best resists other load."""
    for _ in range(3):
        fn()
    _sync(device)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        _sync(device)
        best = min(best, (time.perf_counter() - t0) / iters * 1e3)
    return round(best, 4)


CLIPS = ("franck_talking_200s.webm", "webcam_driver_53s.mp4", "megamind.avi")
#: The folder of the clips (bench.media: $DVP_MEDIA, ../shared/media beside the repository or
#: shared/media inside it); --media overrides.
MEDIA = find_media(*CLIPS).parent


def landmark_frames(name: str, count: int) -> tuple[list[np.ndarray], list[float]]:
    """The first `count` frames of a clip of MEDIA (RGB) and their timestamps."""
    from streamer.video.io import read_frames

    frames, times = [], []
    for frame, t in read_frames(MEDIA / name, max_frames=count):
        frames.append(frame)
        times.append(t)
    return frames, times


class _Cycle:
    """Calls `fn(frame)` on the frames in order, round and round (streaming input)."""

    def __init__(self, frames: list, fn) -> None:  # type: ignore[no-untyped-def]
        self.frames, self.fn, self.k = frames, fn, 0

    def __call__(self) -> None:
        self.fn(self.frames[self.k % len(self.frames)])
        self.k += 1


class _Streams:
    """`batch` streams per detect_batch call, each at its own place in the frames."""

    def __init__(self, det, frames: list, batch: int) -> None:  # type: ignore[no-untyped-def]
        self.det, self.frames, self.ids, self.step = det, frames, list(range(batch)), 0

    def __call__(self) -> None:
        picks = [(s * 7 + self.step) % len(self.frames) for s in self.ids]
        self.step += 1
        if isinstance(self.frames, torch.Tensor):
            self.det.detect_batch(self.frames[picks], self.ids)
        else:
            self.det.detect_batch([self.frames[i] for i in picks], self.ids)


def _torch_landmark_times(frames: list[np.ndarray], iters: int, dev: torch.device,
                          half: bool, batch: int, compile: bool = False) -> dict[str, object]:
    from tracker.landmarks_torch import TorchLandmarks

    r: dict[str, object] = {"device": str(dev), "dtype": "float16" if half else "float32",
                            "compiled": compile}
    live = TorchLandmarks(dev, half=half, compile=compile)
    t0 = time.perf_counter()
    live.detect_batch([frames[0]], [0])  # detection and landmark stages: capture (compile)
    live.detect_batch([frames[1 % len(frames)]], [0])
    r["first_frames_s"] = round(time.perf_counter() - t0, 2)
    r["live_ms"] = time_ms(_Cycle(frames, lambda f: live.detect_batch([f], [0])), dev, iters)
    if dev.type == "cuda":
        on_dev = [torch.from_numpy(f).to(dev)[None] for f in frames]
        r["live_tensor_ms"] = time_ms(_Cycle(on_dev, lambda f: live.detect_batch(f, [0])),
                                      dev, iters)
        if not compile:
            eager = TorchLandmarks(dev, half=half, cuda_graphs=False)
            r["live_no_cuda_graphs_ms"] = time_ms(
                _Cycle(frames, lambda f: eager.detect_batch([f], [0])), dev, iters)
            unfused = TorchLandmarks(dev, half=half, fuse=False)
            r["live_unfused_ms"] = time_ms(
                _Cycle(frames, lambda f: unfused.detect_batch([f], [0])), dev, iters)
    image = TorchLandmarks(dev, half=half, stream=False, compile=compile)
    r["image_ms"] = time_ms(_Cycle(frames, lambda f: image.detect_batch([f], [0])), dev,
                            max(5, iters // 4))
    n = max(3, iters // (20 if dev.type == "cuda" else 100))
    many = TorchLandmarks(dev, half=half, compile=compile)
    r[f"batch{batch}_ms"] = time_ms(_Streams(many, frames, batch), dev, n)
    r[f"batch{batch}_frames_per_s"] = round(batch / float(r[f"batch{batch}_ms"]) * 1e3, 1)
    if dev.type == "cuda":
        stack = torch.from_numpy(np.stack(frames)).to(dev)
        r[f"batch{batch}_tensor_ms"] = time_ms(_Streams(many, stack, batch), dev, n)
        r[f"batch{batch}_tensor_frames_per_s"] = round(
            batch / float(r[f"batch{batch}_tensor_ms"]) * 1e3, 1)
    return r


def bench_landmarks(frames: list[np.ndarray], iters: int, devices: list[torch.device],
                    batch: int, compile: bool = False) -> dict[str, object]:
    """ms per frame of both landmark backends on the same frames (cycled, in order):
    MediaPipe (CPU) streaming and per image; the torch backend per device, live (batch 1,
    streaming: detection skipped while tracking holds), per image (detection every frame),
    and `batch` streams per call (frames per second); on CUDA in float16 and float32, the
    frames given as numpy arrays and as a uint8 CUDA tensor, live without CUDA graphs and
    without merged convolutions, and (`compile`) through torch.compile."""
    from tracker.landmarks import LandmarkDetector

    cpu = torch.device("cpu")
    h, w = frames[0].shape[:2]
    out: dict[str, object] = {"landmark_frames": f"{len(frames)} frames {w}x{h}"}
    with LandmarkDetector(stream=True) as det:
        out["mediapipe_live_ms"] = time_ms(_Cycle(frames, det), cpu, iters)
    with LandmarkDetector(stream=False) as det:
        out["mediapipe_image_ms"] = time_ms(_Cycle(frames, det), cpu, max(5, iters // 4))
    out["torch_landmarks"] = [_torch_landmark_times(frames, iters, dev, half, batch)
                              for dev in devices
                              for half in ([True, False] if dev.type == "cuda" else [False])]
    if compile:
        out["torch_landmarks"] += [_torch_landmark_times(frames, iters, dev, True, batch, True)
                                   for dev in devices if dev.type == "cuda"]
    return out


def fit_agreement(model: FaceModel, regressor: Regressor, config: TrackerConfig,
                  ref: list, cand: list, times: list[float]) -> dict[str, float]:
    """The tracker's fit from two landmark sequences: mean and max rotation (deg) and
    translation (mm) differences, with each calibrating identity and focal length itself
    (`own`) and with the candidate given the reference's (`shared`)."""
    pa, _ = track_landmarks(ref, times, model, config, regressor=regressor)
    out: dict[str, float] = {"focal_ratio": 0.0}
    for mode in ("own", "shared"):
        kw = {} if mode == "own" else {"focal": float(pa.focal[0]), "identity": pa.identity}
        pb, _ = track_landmarks(cand, times, model, config, regressor=regressor, **kw)
        if mode == "own":
            out["focal_ratio"] = round(float(pb.focal[0] / pa.focal[0]), 5)
        v = pa.valid & pb.valid
        deg = angle_between_deg(pa.rotation[v], pb.rotation[v])
        mm = np.linalg.norm(pa.translation[v] - pb.translation[v], axis=1) * 10.0
        out.update({f"{mode}_deg_mean": round(float(deg.mean()), 4),
                    f"{mode}_deg_max": round(float(deg.max()), 4),
                    f"{mode}_mm_mean": round(float(mm.mean()), 4),
                    f"{mode}_mm_max": round(float(mm.max()), 4)})
    return out


def landmark_parity(model: FaceModel, regressor: Regressor, config: TrackerConfig,
                    count: int, devices: list[torch.device]) -> dict[str, object]:
    """The torch backend against MediaPipe on the same frames (the clips of ../shared/media
    and a synthetic actor): faces found, point distances over the inter-ocular distance,
    and the tracker's fit from each (fit_agreement), per device."""
    from renderer.synth import synthesize
    from tracker.landmarks import LandmarkDetector, compare_landmarks
    from tracker.landmarks_torch import TorchLandmarks

    sources = {name: landmark_frames(name, count) for name in CLIPS
               if (MEDIA / name).is_file()}
    synth, truth = synthesize(model, frames=min(count, 60), size=256, seed=0)
    sources["synth_actor"] = (list(synth), [float(t) for t in truth.timestamps])
    out: dict[str, object] = {"frames_per_source": count}
    for name, (frames, times) in sources.items():
        with LandmarkDetector(stream=True) as mp:
            ref = [mp(f) for f in frames]
        per_device = {}
        for dev in devices:
            for half in ([True, False] if dev.type == "cuda" else [False]):
                det = TorchLandmarks(dev, half=half)
                cand = [det.detect_batch([f], [0])[0] for f in frames]
                row: dict[str, object] = {
                    k: (round(v, 6) if isinstance(v, float) else v)
                    for k, v in compare_landmarks(ref, cand).as_dict().items()}
                row["fit"] = fit_agreement(model, regressor, config, ref, cand, times)
                per_device[f"{dev} {'float16' if half else 'float32'}"] = row
        out[name] = per_device
    return out


def bench_device(model: FaceModel, regressor: Regressor, config: TrackerConfig,
                 device: torch.device, seq: SyntheticSequence, iters: int) -> dict[str, object]:
    fitter = LandmarkFitter(model, config, device)
    reg = regressor.to(device)
    ident = torch.as_tensor(seq.identity, device=device)
    obs = torch.as_tensor(seq.noisy[1:2], device=device)
    cam = Camera.make(seq.focal, np.asarray([seq.image_size[1] / 2, seq.image_size[0] / 2]),
                      1, device)
    truth = FitState(axis_angle_to_matrix(torch.as_tensor(seq.rotation[:1])).to(device),
                     torch.as_tensor(seq.translation[:1], device=device),
                     torch.as_tensor(seq.expression[:1], device=device),
                     torch.as_tensor(seq.gaze[:1], device=device))
    warm, _ = fitter.fit(obs, truth, ident, cam, 10)
    it = config.iterations_warm
    out: dict[str, object] = {"device": str(device)}
    out["regressor_ms"] = time_ms(lambda: reg.predict(obs, cam.focal, cam.principal), device,
                                  iters)
    out["fit_warm_ms"] = time_ms(lambda: fitter.fit(obs, warm, ident, cam, it, previous=warm),
                                 device, iters)
    out["fit_warm_iterations"] = it
    out["fit_warm_2_iterations_ms"] = time_ms(
        lambda: fitter.fit(obs, warm, ident, cam, 2, previous=warm), device, iters)
    out["gaze_ms"] = time_ms(lambda: fitter.fit_gaze(obs, warm, ident, cam), device, iters)

    def cold() -> None:
        g = reg.predict(obs, cam.focal, cam.principal)
        pts = fitter.lm.points(ident[None], g.expression)[:, :468]
        init = FitState(g.rotation, initial_translation(pts, g.rotation, obs[:, :468], cam),
                        g.expression, torch.zeros(1, 2, 2, device=device))
        fitter.fit(obs, init, ident, cam, config.iterations_cold, damping=1e-2)

    out["cold_start_ms"] = time_ms(cold, device, max(5, iters // 5))
    tracker = FaceTracker(model, config, device, regressor, focal=seq.focal,
                          identity=seq.identity)
    lms = seq.landmarks()
    k = [0]

    def step() -> None:
        i = k[0] % seq.frames
        tracker.step(lms[i], float(seq.timestamps[i]) + (k[0] // seq.frames) * 100.0)
        k[0] += 1

    out["tracker_step_ms"] = time_ms(step, device, iters)
    if device.type == "cuda":
        batch = 64
        obs_b = obs.expand(batch, -1, -1).contiguous()
        warm_b = FitState(*(x.expand(batch, *x.shape[1:]).contiguous() for x in
                            (warm.rotation, warm.translation, warm.expression, warm.gaze)))
        cam_b = Camera.make(seq.focal, cam.principal[0].cpu().numpy(), batch, device)
        ms = time_ms(lambda: fitter.fit(obs_b, warm_b, ident, cam_b, it, previous=warm_b),
                     device, max(5, iters // 4))
        out["fit_warm_batch64_ms_per_frame"] = round(ms / batch, 5)
        try:
            from tracker.graphs import GraphedWarmFit

            graphed = GraphedWarmFit(fitter, 1, it)
            out["fit_warm_cuda_graph_ms"] = time_ms(
                lambda: graphed(obs, warm, ident, cam), device, iters)
        except Exception as err:  # noqa: BLE001 - report, do not fail the benchmark
            out["fit_warm_cuda_graph_ms"] = f"unavailable: {err}"
    return out


def _errors(model: FaceModel, seq: SyntheticSequence, p: FaceParams) -> dict[str, float]:
    valid = np.asarray(p.valid, bool)
    r1 = axis_angle_to_matrix(torch.as_tensor(p.rotation[valid])).numpy()
    r0 = axis_angle_to_matrix(torch.as_tensor(seq.rotation[valid])).numpy()
    rot = np.degrees(np.linalg.norm(matrix_to_axis_angle(r1 @ r0.transpose(0, 2, 1)), axis=1))
    trans = np.linalg.norm(p.translation[valid] - seq.translation[valid], axis=1)
    face = model.region_vertices("face")
    n = int(valid.sum())
    v1 = model.vertices(np.broadcast_to(p.identity, (n, 100)), p.expression[valid],
                        vertex_ids=face)
    v0 = model.vertices(np.broadcast_to(seq.identity, (n, 100)), seq.expression[valid],
                        vertex_ids=face)
    shape = np.linalg.norm(v1 - v0, axis=-1).mean(1) * 10.0
    c1 = v1 @ r1.transpose(0, 2, 1) + p.translation[valid][:, None]
    c0 = v0 @ r0.transpose(0, 2, 1) + seq.translation[valid][:, None]
    cam = np.linalg.norm(c1 - c0, axis=-1).mean(1) * 10.0
    gaze = np.degrees(np.abs(p.gaze[valid] - seq.gaze[valid]))
    return {"rotation_deg_mean": float(rot.mean()), "rotation_deg_median": float(np.median(rot)),
            "translation_cm_mean": float(trans.mean()),
            "face_vertex_mm_mean": float(shape.mean()),
            "face_vertex_camera_mm_mean": float(cam.mean()),
            "gaze_deg_mean": float(gaze.mean()), "valid_frames": n}


def baseline(model: FaceModel, config: TrackerConfig, seq: SyntheticSequence) -> FaceParams:
    """Each frame alone from the mean face: no regressor, no warm start, no calibration."""
    fitter = LandmarkFitter(model, config, "cpu")
    h, w = seq.image_size
    focal = config.focal_guess * max(h, w)
    t = seq.frames
    cam = Camera.make(focal, np.asarray([w / 2, h / 2], np.float32), t, "cpu")
    obs = torch.as_tensor(seq.noisy)
    ident = torch.zeros(100)
    init = FitState.neutral(t, 50.0)
    pts = fitter.lm.points(ident[None].expand(t, -1), init.expression)[:, :468]
    init.translation = initial_translation(pts, init.rotation, obs[:, :468], cam)
    state, _ = fitter.fit(obs, init, ident, cam, config.iterations_cold, damping=1e-2)
    state.gaze = fitter.fit_gaze(obs, state, ident, cam)
    state = fitter.with_gaze(state)
    p = FaceParams.empty(t, model.expression_names, seq.image_size, focal, seq.timestamps)
    from dataclasses import replace

    return replace(p, rotation=matrix_to_axis_angle(state.rotation.numpy()),
                   translation=state.translation.numpy(), expression=state.expression.numpy(),
                   gaze=state.gaze.numpy(), valid=np.ones(t, bool))


def accuracy(model: FaceModel, regressor: Regressor, config: TrackerConfig, frames: int,
             seeds: int) -> dict[str, object]:
    runs: dict[str, list[dict[str, float]]] = {"tracker_raw": [], "tracker_smoothed": [],
                                               "tracker_known_focal_raw": [], "baseline": []}
    focal_err, iters, cold = [], [], []
    raw_cfg = TrackerConfig(**{**vars(config), "smoothing": False})
    for seed in range(seeds):
        seq = synthetic_sequence(model, frames=frames, seed=seed, noise_px=1.0)
        p, fr = track_landmarks(seq.landmarks(), seq.timestamps, model, raw_cfg,
                                regressor=regressor)
        runs["tracker_raw"].append(_errors(model, seq, p))
        focal_err.append(abs(float(p.focal[0]) - seq.focal) / seq.focal * 100.0)
        iters += [f.iterations for f in fr if not f.cold]
        cold.append(sum(f.cold for f in fr))
        p, _ = track_landmarks(seq.landmarks(), seq.timestamps, model, config,
                               regressor=regressor)
        runs["tracker_smoothed"].append(_errors(model, seq, p))
        p, _ = track_landmarks(seq.landmarks(), seq.timestamps, model, raw_cfg,
                               regressor=regressor, focal=seq.focal)
        runs["tracker_known_focal_raw"].append(_errors(model, seq, p))
        runs["baseline"].append(_errors(model, seq, baseline(model, config, seq)))
    out: dict[str, object] = {
        name: {k: round(float(np.mean([r[k] for r in rs])), 4) for k in rs[0]}
        for name, rs in runs.items()}
    out["focal_error_percent"] = round(float(np.mean(focal_err)), 3)
    out["warm_iterations_max"] = int(max(iters)) if iters else 0
    out["warm_iterations_mean"] = round(float(np.mean(iters)), 3) if iters else 0.0
    out["cold_starts_per_sequence"] = round(float(np.mean(cold)), 2)
    out["setup"] = {"frames": frames, "seeds": seeds, "noise_px": 1.0, "image": "640x480",
                    "focal_px": 600.0, "fps": 30.0}
    return out


# ---- video mode ------------------------------------------------------------------------
def video_errors(model: FaceModel, gt: FaceParams, tr: FaceParams, still: np.ndarray
                 ) -> dict[str, float]:
    """Errors of tracked `tr` against ground truth `gt` (valid frames; module doc); still:
    (T,) bool, the frames of the still segment."""
    from tracker.rotation import axis_angle_to_matrix_np

    ok = np.asarray(tr.valid, bool)
    rg = axis_angle_to_matrix_np(gt.rotation[ok])
    rt = axis_angle_to_matrix_np(tr.rotation[ok])
    err = matrix_to_axis_angle(np.einsum("tji,tjk->tik", rg, rt))  # head frame
    ang = np.degrees(np.linalg.norm(err, axis=1))
    ids = model.region_vertices("narrow_face")
    vg = model.vertices(gt.identity[None], gt.expression[ok], vertex_ids=ids)
    vt = model.vertices(tr.identity[None], tr.expression[ok], vertex_ids=ids)
    cg = vg @ rg.transpose(0, 2, 1) + gt.translation[ok][:, None]
    ct = vt @ rt.transpose(0, 2, 1) + tr.translation[ok][:, None]
    jaw = model.expression_index("jawOpen")
    blinks = [model.expression_index(n) for n in ("eyeBlink_L", "eyeBlink_R")]
    jg, jt = gt.expression[ok, jaw], tr.expression[ok, jaw]
    out = {
        "valid_frames": int(ok.sum()),
        "rotation_deg_median": float(np.median(ang)),
        "rotation_deg_mean": float(ang.mean()),
        "pitch_bias_deg": float(np.degrees(np.median(err[:, 0]))),
        "yaw_bias_deg": float(np.degrees(np.median(err[:, 1]))),
        "roll_bias_deg": float(np.degrees(np.median(err[:, 2]))),
        "translation_cm_median": float(np.median(np.linalg.norm(
            gt.translation[ok] - tr.translation[ok], axis=1))),
        "face_vertex_mm": float(np.linalg.norm(vg - vt, axis=-1).mean() * 10.0),
        "face_vertex_camera_mm": float(np.linalg.norm(cg - ct, axis=-1).mean() * 10.0),
        "jawOpen_mae": float(np.abs(jg - jt).mean()),
        "jawOpen_corr": float(np.corrcoef(jg, jt)[0, 1]) if jg.std() > 0 and jt.std() > 0
        else float("nan"),
        "eyeBlink_mae": float(np.abs(gt.expression[ok][:, blinks]
                                     - tr.expression[ok][:, blinks]).mean()),
        "focal_error_percent": float((tr.focal[0] / gt.focal[0] - 1.0) * 100.0),
    }
    rest = still & ok
    pairs = np.nonzero(rest[1:] & rest[:-1])[0]
    if len(pairs):
        r_all = axis_angle_to_matrix_np(tr.rotation)
        step = matrix_to_axis_angle(np.einsum("tji,tjk->tik", r_all[pairs], r_all[pairs + 1]))
        v_all = model.vertices(tr.identity[None], tr.expression[np.r_[pairs, pairs + 1]],
                               vertex_ids=ids)
        c_all = v_all @ r_all[np.r_[pairs, pairs + 1]].transpose(0, 2, 1) \
            + tr.translation[np.r_[pairs, pairs + 1]][:, None]
        n = len(pairs)
        out["jitter_rest_deg"] = float(np.degrees(np.linalg.norm(step, axis=1)).mean())
        out["jitter_rest_mm"] = float(np.linalg.norm(c_all[n:] - c_all[:n], axis=-1).mean()
                                      * 10.0)
        out["rest_frames"] = int(rest.sum())
    return out


def bench_video(seed: int, frames: int, res: int, still: float, device: torch.device,
                workdir: Path) -> dict[str, object]:
    """One `dvp synth` actor through landmark-only and refined tracking (module doc)."""
    from dataclasses import replace

    from renderer.refine import refine_video, smooth_params
    from renderer.synth import SynthActor
    from streamer.cli.config import Config
    from streamer.cli.main import main as dvp
    from streamer.video.io import read_frames
    from tracker.landmarks import make_landmark_detector

    out = workdir / f"actor{seed}_{res}"
    args = ["synth", "-o", str(out), "--frames", str(frames), "--res", str(res), "--seed",
            str(seed), "--still", str(still), "--device", device.type]
    t0 = time.perf_counter()
    import contextlib

    with contextlib.redirect_stdout(sys.stderr):  # dvp synth prints its output folder
        code = dvp(args)
    if code != 0:
        raise RuntimeError(f"dvp {' '.join(args)} failed")
    synth_s = time.perf_counter() - t0
    gt = FaceParams.load(out / "params.npz")
    model = load_face_model()
    actor = SynthActor(model, seed=seed, size=16, texture_size=16, supersample=1)
    rest = actor.still_frames(frames, float(1.0 / np.diff(gt.timestamps[:2])[0])
                              if frames > 1 else 25.0, still)
    config = Config()
    tc = config.tracker
    video = out / "video.mp4"
    detector = make_landmark_detector(tc, device)
    lms, times = [], []
    t0 = time.perf_counter()
    for frame, t in read_frames(video):
        lms.append(detector(frame))
        times.append(t)
    detector.close()
    lm_s = time.perf_counter() - t0
    regressor = load_or_train(model, settings_from_config(tc))
    t0 = time.perf_counter()
    raw, _ = track_landmarks(lms, times, model, replace(tc, smoothing=False), device, regressor)
    fit_s = time.perf_counter() - t0
    landmark_only = smooth_params(raw, tc)
    # where the landmark-only error comes from: the same fit given the true focal length,
    # then the true focal length and identity (what calibration could at best give it)
    given = {name: smooth_params(track_landmarks(lms, times, model, replace(tc, smoothing=False),
                                                 device, regressor, **kw)[0], tc)
             for name, kw in (("landmark_only_known_focal", {"focal": float(gt.focal[0])}),
                              ("landmark_only_known_focal_identity",
                               {"focal": float(gt.focal[0]), "identity": gt.identity}))}
    t0 = time.perf_counter()
    observed = np.stack([lm.points for lm in lms])
    refined = refine_video(model, raw, (f for f, _ in read_frames(video)), observed, tc,
                           config.renderer, device)
    refine_s = time.perf_counter() - t0
    live_ms = refine_one_frame_ms(model, refined.params, video, observed, config, device)
    n = len(lms)
    return {
        "seed": seed, "resolution": res, "frames": n, "still_seconds": still,
        "focal_true_px": float(gt.focal[0]), "focal_per_size": float(gt.focal[0]) / res,
        "landmark_only": video_errors(model, gt, landmark_only, rest),
        **{name: video_errors(model, gt, params, rest) for name, params in given.items()},
        "refined": video_errors(model, gt, refined.params, rest),
        "colour_rms": {"before": float(np.nanmean(refined.rmse_before)),
                       "after": float(np.nanmean(refined.rmse_after))},
        "timing": {"synth_s": round(synth_s, 2),
                   "landmarks_fps": round(n / lm_s, 2), "landmark_backend": detector.backend,
                   "fit_fps": round(n / fit_s, 2), "refine_fps": round(n / refine_s, 2),
                   "refine_one_frame_ms": round(live_ms, 2),
                   "refine_stage_s": {k: round(v, 2) for k, v in refined.seconds.items()}},
    }


def refine_one_frame_ms(model: FaceModel, params: FaceParams, video: Path,
                        observed: np.ndarray, config: object, device: torch.device,
                        frames: int = 8) -> float:
    """ms per frame of the refinement's per-frame stage at batch 1 (what a live frame would
    cost, albedo and identity known): the mean over the first `frames` frames."""
    from renderer.refine import (
        Refiner,
        RefineSettings,
        crop_boxes,
        face_crops,
    )
    from streamer.video.io import read_frames

    settings = RefineSettings.from_config(config.renderer)  # type: ignore[attr-defined]
    head = params.select(np.arange(min(frames, params.frames)))
    crops = face_crops((f for f, _ in read_frames(video, head.frames)),
                       crop_boxes(model, head, settings.margin), settings.size)
    ref = Refiner(model, config.tracker, settings, device)  # type: ignore[attr-defined]
    ident = torch.as_tensor(head.identity, device=device)
    tex = torch.full((3, settings.albedo_size, settings.albedo_size), 0.6, device=device)
    sh = torch.as_tensor(head.sh[0], device=device)
    ref.refine_frames(head, crops, observed, np.arange(1), ident, float(head.focal[0]), tex, sh)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(head.frames):
        ref.refine_frames(head, crops, observed, np.asarray([i]), ident, float(head.focal[0]),
                          tex, sh)
    _sync(device)
    return (time.perf_counter() - t0) / head.frames * 1e3


def video_mode(args: argparse.Namespace) -> None:
    import tempfile

    device = torch.device(args.device if args.device != "all" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    report: dict[str, object] = {"machine": machine(), "device": str(device)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="dvp-bench-video-") as tmp:
        for seed in range(args.seeds):
            runs.append(bench_video(seed, args.frames, args.res, args.still, device, Path(tmp)))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    report["runs"] = runs
    summary = {}
    for mode in ("landmark_only", "landmark_only_known_focal",
                 "landmark_only_known_focal_identity", "refined"):
        keys = [k for k in runs[0][mode] if isinstance(runs[0][mode][k], float)]
        summary[mode] = {k: round(float(np.nanmean([r[mode].get(k, np.nan) for r in runs])), 4)
                         for k in keys}
    report["mean_over_actors"] = summary
    print(json.dumps(report, indent=2))


def main() -> None:
    global MEDIA
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    ap.add_argument("--frames", type=int, default=90, help="frames per synthetic sequence")
    ap.add_argument("--seeds", type=int, default=3, help="synthetic sequences")
    ap.add_argument("--iters", type=int, default=100, help="timed calls per measurement")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--landmarks-only", action="store_true",
                    help="only the landmark backends (timing and parity)")
    ap.add_argument("--landmark-frames", type=int, default=100,
                    help="frames per clip for the landmark timing and parity")
    ap.add_argument("--batch", type=int, default=64, help="streams per batched landmark call")
    ap.add_argument("--compile", action="store_true",
                    help="also time the torch landmark backend through torch.compile (CUDA)")
    ap.add_argument("--media", type=Path, default=None,
                    help=f"folder of the clips {', '.join(CLIPS)} (default {MEDIA})")
    ap.add_argument("--video", action="store_true",
                    help="video mode: rendered dvp synth actors through MediaPipe")
    ap.add_argument("--res", type=int, default=256, help="video mode: frame size")
    ap.add_argument("--still", type=float, default=3.0,
                    help="video mode: seconds of the still segment")
    args = ap.parse_args()
    if args.media is not None:
        MEDIA = args.media
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.video:
        video_mode(args)
        return
    model = load_face_model()
    config = TrackerConfig()
    t0 = time.perf_counter()
    regressor = load_or_train(model, settings_from_config(config))
    report: dict[str, object] = {"machine": machine(),
                                 "regressor_load_or_train_s": round(time.perf_counter() - t0, 2)}
    devices = []
    if args.device in ("cpu", "all"):
        devices.append(torch.device("cpu"))
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    clip = CLIPS[0] if (MEDIA / CLIPS[0]).is_file() else None
    if clip is not None:
        frames, _ = landmark_frames(clip, args.landmark_frames)
    else:  # no media here: skimage's astronaut on a 640x480 canvas
        from skimage import data

        canvas = np.zeros((480, 640, 3), np.uint8)
        canvas[:, 64:576] = data.astronaut()[16:496]
        frames = [canvas]
    report.update(bench_landmarks(frames, args.iters, devices, args.batch, args.compile))
    if not args.skip_accuracy:
        report["landmark_parity"] = landmark_parity(model, regressor, config,
                                                    args.landmark_frames, devices)
    if args.landmarks_only:
        print(json.dumps(report, indent=2))
        return
    seq = synthetic_sequence(model, frames=60, seed=123)
    report["timing"] = [bench_device(model, regressor, config, d, seq, args.iters)
                        for d in devices]
    if not args.skip_accuracy:
        report["accuracy"] = accuracy(model, regressor, config, args.frames, args.seeds)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
