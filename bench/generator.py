"""Generator benchmarks, printed as JSON (never a timed test).

Modes (one per run):

- default: ms per frame (batch 1) at each size for every runtime backend present, beside
  eager fp32 of the same network in the same run; training images per second; peak memory.
  Network: the `paper` preset on CUDA, `tiny` on the CPU (override with --preset).
- `--ddp-compare --gpus N`: one-process training against N processes under torchrun (same
  seed, same global batch): both L1 curves (50-step moving means), their largest relative
  gap, and the throughput ratio (issue 8).
- `--quality`: trains on a synthetic target (generator.synthetic) for --minutes, then the
  held-out report of `dvp eval` (model and renderer baseline); sample grid into --out.

Random weights time the same as trained ones, so timing needs no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generator.config import GeneratorConfig
from generator.distributed import leave, torchrun_command
from generator.metrics import evaluate
from generator.runtime import make_runtime, tensorrt_importable
from generator.synthetic import synthetic_data
from generator.training import Trainer
from generator.unet import UNet, parameter_count


def machine(device: torch.device) -> dict[str, object]:
    """The machine and device this run measured."""
    info: dict[str, object] = {"host": platform.node(), "cpu": platform.processor(),
                               "cpu_cores": os.cpu_count(), "torch_threads":
                               torch.get_num_threads(), "python": platform.python_version(),
                               "torch": str(torch.__version__)}
    info["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                      else f"cpu ({os.cpu_count()} cores)")
    return info


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, window: torch.Tensor, device: torch.device, iters: int) -> float:
    """Median wall-clock ms of `fn(window)` over `iters` calls, after warm-up."""
    for _ in range(max(3, iters // 5)):
        fn(window)
    _sync(device)
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn(window)
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def calibrated(size: int, ngf: int, device: torch.device) -> UNet:
    """A random network with BatchNorm statistics of its inputs, in eval mode."""
    torch.manual_seed(0)
    net = UNet(size, 11, ngf).to(device)
    with torch.no_grad():
        for _ in range(2):
            net(torch.rand(2, 99, size, size, device=device))
    return net.eval()


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA allocations on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_inference(size: int, ngf: int, device: torch.device, iters: int,
                    engine_dir: Path) -> dict[str, object]:
    """ms/frame at batch 1 of eager fp32 and of each backend present."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    net = calibrated(size, ngf, device)
    window = torch.rand(1, 99, size, size, device=device)
    row: dict[str, object] = {"params": parameter_count(net)}
    with torch.inference_mode():
        row["eager_fp32_ms"] = time_ms(net, window, device, iters)
        if device.type == "cuda":
            half = UNet(size, 11, ngf).to(device, torch.float16, memory_format=torch.channels_last)
            half.load_state_dict(net.state_dict())
            half.eval()
            row["eager_fp16_channels_last_ms"] = time_ms(
                lambda w: half(w.half().contiguous(memory_format=torch.channels_last)),
                window, device, iters)
    backends = ["torch"] if device.type == "cuda" else ["cpu"]
    engine = None
    if device.type == "cuda" and tensorrt_importable():
        from generator.export import export

        engine = export(net.cpu(), engine_dir / str(size), "tensorrt", max_batch=1)
        net.to(device)
        backends.append("tensorrt")
    for backend in backends:
        runtime = make_runtime(net, backend, device, engine)
        row[f"{backend}_ms"] = time_ms(runtime, window, device, iters)
        row[f"{backend}_speedup_vs_eager_fp32"] = row["eager_fp32_ms"] / row[f"{backend}_ms"]
    row["peak_memory_mib"] = peak_memory_mib(device)
    return row


def bench_training(preset: str, size: int, device: torch.device, steps: int,
                   ngf: int = 0) -> dict[str, object]:
    """Training images per second of `preset` at `size` (after warm-up steps)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = GeneratorConfig(preset=preset, ngf=ngf, checkpoint_every=10**9,
                             sample_every=10**9)
    data = synthetic_data(frames=max(64, 2 * config.global_batch(size)), size=size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(data, config, Path(tmp), None, device)
        warm = min(5, steps)
        trainer.run(warm, progress=False)
        result = trainer.run(warm + steps, progress=False)
    return {"preset": preset, "size": size, "global_batch": trainer.global_batch,
            "steps_timed": steps - 1, "images_per_second": result.images_per_second,
            "peak_memory_mib": peak_memory_mib(device)}


def moving_mean(values: list[float], window: int = 50) -> list[float]:
    """Trailing moving means (the first window-1 entries average what there is)."""
    cums = np.cumsum([0.0, *values])
    return [float((cums[i + 1] - cums[max(0, i + 1 - window)]) / min(window, i + 1))
            for i in range(len(values))]


def _curve_config(args: argparse.Namespace) -> GeneratorConfig:
    return GeneratorConfig(preset=args.preset or "paper", checkpoint_every=10**9,
                           sample_every=10**9, seed=0)


def ddp_worker(args: argparse.Namespace) -> None:
    """Under torchrun: train, and rank 0 writes the history and throughput to --out."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data = synthetic_data(frames=args.frames, size=args.size)
    trainer = Trainer(data, _curve_config(args), Path(args.out) / "checkpoints", None, device)
    result = trainer.run(args.steps, progress=False)
    if trainer.world.is_main:
        (Path(args.out) / "ddp.json").write_text(json.dumps(
            {"history": result.history, "images_per_second": result.images_per_second}))
    leave(trainer.world)


def ddp_compare(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """One process against args.gpus processes: L1 curves and throughput."""
    data = synthetic_data(frames=args.frames, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        single = Trainer(data, _curve_config(args), Path(tmp) / "one", None, device)
        one = single.run(args.steps, progress=False)
        del single
        torch.cuda.empty_cache()
        command = torchrun_command(args.gpus, [
            __file__, "--ddp-worker", "--out", tmp, "--steps", str(args.steps),
            "--size", str(args.size), "--frames", str(args.frames),
            *(["--preset", args.preset] if args.preset else [])])
        subprocess.run(command, check=True)
        many = json.loads((Path(tmp) / "ddp.json").read_text())
    curve_one = moving_mean([h["l1"] for h in one.history])
    curve_many = moving_mean([h["l1"] for h in many["history"]])
    gaps = [abs(a - b) / a for a, b in zip(curve_one[49:], curve_many[49:])]
    every = max(1, args.steps // 60)
    return {
        "steps": args.steps, "size": args.size,
        "global_batch": _curve_config(args).global_batch(args.size), "gpus": args.gpus,
        "l1_moving_mean_50": {"steps": list(range(1, args.steps + 1, every)),
                              "one": curve_one[::every], f"n{args.gpus}": curve_many[::every]},
        "max_relative_gap_after_step_50": max(gaps) if gaps else None,
        "images_per_second": {"one": one.images_per_second, f"n{args.gpus}":
                              many["images_per_second"]},
        "throughput_ratio": many["images_per_second"] / one.images_per_second,
    }


def quality(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Train on a synthetic target for args.minutes, then the held-out report.

    Checkpoints go to a temporary folder (a paper-size one is 0.8 GB); sample grids (and
    TensorBoard events) to `--out/samples` when --out is given.
    """
    start = time.perf_counter()
    data = synthetic_data(frames=args.frames, size=args.size)
    made = time.perf_counter() - start
    config = GeneratorConfig(preset=args.preset or "paper", checkpoint_every=10**9,
                             sample_every=10**9)
    samples = Path(args.out) / "samples" if args.out else None
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(data, config, Path(tmp), samples, device)
        deadline = time.perf_counter() + args.minutes * 60
        first = trainer.run(100, progress=False)
        steps_per_second = first.images_per_second / trainer.global_batch
        left = deadline - time.perf_counter()
        result = trainer.run(100 + max(0, int(0.95 * left * steps_per_second)), progress=False)
        report = evaluate(make_runtime(trainer.g, "auto", device), data, device)
    curve = moving_mean([h["l1"] for h in first.history + result.history])
    return {"frames": args.frames, "size": args.size, "preset": config.preset,
            "steps": result.step, "train_minutes": args.minutes,
            "images_per_second": result.images_per_second or first.images_per_second,
            "synth_seconds": made, "l1_moving_mean_50_every_100_steps": curve[::100], "eval": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--preset", choices=["tiny", "paper"],
                        help="network (default: paper on CUDA, tiny on the CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--iters", type=int, default=0, help="timed calls (default 200 GPU, 30 CPU)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="timed training steps (default 30 GPU, 6 CPU)")
    parser.add_argument("--ddp-compare", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.ddp_worker:
        ddp_worker(args)
        return
    from tracker.device import pick_device

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    report: dict[str, object] = {"machine": machine(device)}
    if args.ddp_compare:
        report["ddp_compare"] = ddp_compare(args, device)
    elif args.quality:
        report["quality"] = quality(args, device)
    else:
        preset = args.preset or ("paper" if cuda else "tiny")
        ngf = GeneratorConfig(preset=preset).preset_values().ngf
        iters = args.iters or (200 if cuda else 30)
        report["preset"] = preset
        with tempfile.TemporaryDirectory() as tmp:
            report["inference_batch1"] = {
                str(size): bench_inference(size, ngf, device, iters, Path(tmp))
                for size in args.sizes}
        steps = args.train_steps or (30 if cuda else 6)
        report["training"] = [bench_training(preset, size, device, steps)
                              for size in args.sizes]
        report["peak_memory_mib"] = peak_memory_mib(device)
        report["tensorrt"] = ("present" if tensorrt_importable()
                              else "absent (the tensorrt package does not import)")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
