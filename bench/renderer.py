"""Benchmark of the renderer; prints JSON.

For each size (default 256 and 512) and each available backend, the time of the whole
conditioning set (colour, correspondence, gaze, mask: vertices, rasterization, shading):

- `cupy`: the CuPy kernel on the GPU (eager, and replayed from a CUDA graph for one frame);
- `torch`: the plain-torch reference rasterizer on the GPU (baseline in the same run);
- `cpu`: the reference on the CPU (torch's intra-op threads as set).

`single_ms`: one frame per call (live), median wall time with the device synchronised;
`batched_ms_per_frame` / `batched_fps`: `--batch` frames per call (training). Rasterizer-only
times are given beside. Targets (issue 4): 512 x 512 under 0.5 ms per frame on one H100,
over 2,000 frames/s batched at 256, CPU reference under 100 ms per frame at 256.

    python bench/renderer.py [--sizes 256 512] [--batch 64] [--iters 50] [--cpu-iters 5]
                             [--no-cpu] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from renderer.conditioning import Camera, ConditioningRenderer, GraphedRenderer
from renderer.raster import rasterize
from renderer.synth import SynthActor
from tracker.assets import load_face_model
from tracker.rotation import axis_angle_to_matrix


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Any, device: torch.device, iters: int, warmup: int = 2) -> float:
    """Median wall time (ms) of fn() with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _inputs(p: Any, sel: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(getattr(p, k)[sel], device=device)
            for k in ("expression", "rotation", "translation", "sh", "gaze")}


def _screen(r: ConditioningRenderer, p: Any, sel: np.ndarray, size: int,
            device: torch.device) -> torch.Tensor:
    f, cx, cy = Camera.of(p).scaled_to(size)
    x = r.vertices(p.identity, torch.as_tensor(p.expression[sel], device=device),
                   torch.as_tensor(p.gaze[sel], device=device))
    rot = axis_angle_to_matrix(torch.as_tensor(p.rotation[sel], device=device))
    x = x @ rot.transpose(-1, -2) + torch.as_tensor(p.translation[sel], device=device)[:, None]
    return torch.stack([f * x[..., 0] / x[..., 2] + cx, f * x[..., 1] / x[..., 2] + cy,
                        x[..., 2]], -1).contiguous()


def bench_backend(model: Any, albedo: np.ndarray, size: int, device: torch.device,
                  backend: str, batch: int, iters: int) -> dict[str, Any]:
    actor = SynthActor(model, seed=0, size=size, texture_size=16, supersample=1)
    p = actor.motion(max(batch, 8))
    cam = Camera.of(p)
    r = ConditioningRenderer(model, albedo, size, device, rasterizer=backend, batch=batch)
    one = _inputs(p, np.arange(1), device)
    many = _inputs(p, np.arange(batch), device)
    out: dict[str, Any] = {"size": size, "device": str(device), "rasterizer": r.backend}

    def single() -> None:
        r.render_arrays(p.identity, one["expression"], one["rotation"], one["translation"],
                        one["sh"], one["gaze"], cam)

    def batched() -> None:
        r.render_arrays(p.identity, many["expression"], many["rotation"],
                        many["translation"], many["sh"], many["gaze"], cam)

    out["single_ms"] = round(_time(single, device, iters), 4)
    ms = _time(batched, device, max(2, iters // 4))
    out["batch"] = batch
    out["batched_ms_per_frame"] = round(ms / batch, 4)
    out["batched_fps"] = round(1e3 * batch / ms, 1)
    tris = r._tris32 if r.backend == "cupy" else r._tris
    s1 = _screen(r, p, np.arange(1), size, device)
    sb = _screen(r, p, np.arange(batch), size, device)
    out["raster_single_ms"] = round(_time(
        lambda: rasterize(s1, tris, size, size, backend=r.backend, trusted_triangles=True),
        device, iters), 4)
    out["raster_batched_ms_per_frame"] = round(_time(
        lambda: rasterize(sb, tris, size, size, backend=r.backend, trusted_triangles=True),
        device, max(2, iters // 4)) / batch, 4)
    if device.type == "cuda" and r.backend == "cupy":
        try:
            g = GraphedRenderer(r, p.identity, cam)
            out["graphed_single_ms"] = round(_time(
                lambda: g(one["expression"], one["rotation"], one["translation"], one["sh"],
                          one["gaze"]), device, iters), 4)
        except Exception as err:  # noqa: BLE001 - report, do not fail the benchmark
            out["graphed_single_ms"] = f"failed: {type(err).__name__}: {err}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--batch", type=int, default=64, help="frames per batched call (GPU)")
    ap.add_argument("--cpu-batch", type=int, default=8, help="frames per batched call (CPU)")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--cpu-iters", type=int, default=5)
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU reference")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args(argv)
    model = load_face_model()
    albedo = np.random.default_rng(0).uniform(0.2, 0.9, (256, 512, 3)).astype(np.float32)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    report: dict[str, Any] = {
        "benchmark": "renderer conditioning set (colour, correspondence, gaze, mask)",
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "numpy": np.__version__},
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "targets": {"gpu_512_single_ms": 0.5, "gpu_256_batched_fps": 2000,
                    "cpu_256_single_ms": 100},
        "results": [],
    }
    try:
        import cupy
        report["machine"]["cupy"] = cupy.__version__
    except ImportError:
        report["machine"]["cupy"] = None
    runs: list[tuple[torch.device, str, int, int]] = []
    if cuda:
        dev = torch.device("cuda")
        if report["machine"]["cupy"]:
            runs.append((dev, "cupy", args.batch, args.iters))
        runs.append((dev, "reference", args.batch, args.iters))
    if not args.no_cpu and args.device in ("auto", "cpu"):
        runs.append((torch.device("cpu"), "reference", args.cpu_batch, args.cpu_iters))
    for size in args.sizes:
        for dev, backend, batch, iters in runs:
            res = bench_backend(model, albedo, size, dev, backend, batch, iters)
            res["name"] = {"cupy": "cupy", "reference": "torch" if dev.type == "cuda"
                           else "cpu"}[backend]
            report["results"].append(res)
            print(json.dumps(res), file=sys.stderr)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
