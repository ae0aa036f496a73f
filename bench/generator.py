"""Generator benchmarks, printed as JSON (never a timed test).

Modes (one per run):

- default: ms per frame (batch 1) at each size for every runtime backend present, beside
  eager fp32 of the same network in the same run; training images per second; peak memory.
  Network: the `paper` preset on CUDA, `tiny` on the CPU (override with --preset).
- `--scaling --gpus N`: training throughput of the `paper` preset (or --preset) at --size on
  one process (as a CUDA graph) and on N processes under torchrun (eager and graphed), each
  at the preset's batch per process (weak scaling), and one process at twice the batch,
  beside the issue-8 baseline in the same run (one process, global batch 16, eager); each
  configuration in its own processes, so one that fails is reported and the others still
  run; each is also printed to stderr as one JSON line when it ends. About 4 minutes on two
  H200s.
- `--ddp-compare --gpus N`: one-process training against N processes under torchrun (same
  seed, same global batch): both L1 curves (50-step moving means), their largest relative
  gap, and the throughput ratio (issue 8).
- `--quality`: a target made the way a user makes one, timed stage by stage: a `dvp synth`
  actor (--frames at --synth-size), or the first --seconds of a real video (`--video PATH`);
  `dvp prepare` at --size; then for each variant (`--variants`, names of VARIANTS) training
  from scratch with held-out evaluations (`dvp eval`'s report, regions included) after
  --eval-minutes of training each. Its state lives in --work, so a run stopped by
  `--budget-seconds` (with a checkpoint) goes on where it stopped when run again with the
  same arguments; the JSON says what is done. A/B: `--variants default,regions,...` trains
  each on the same prepared target for the same minutes.

Random weights time the same as trained ones, so timing needs no checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import signal
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


def calibrated(size: int, ngf: int, device: torch.device, upsample: str = "transpose") -> UNet:
    """A random network with BatchNorm statistics of its inputs, in eval mode."""
    torch.manual_seed(0)
    net = UNet(size, 11, ngf, upsample).to(device)
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
                    engine_dir: Path, upsample: str = "transpose") -> dict[str, object]:
    """ms/frame at batch 1 of eager fp32 and of each backend present."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    net = calibrated(size, ngf, device, upsample)
    window = torch.rand(1, 99, size, size, device=device)
    row: dict[str, object] = {"params": parameter_count(net)}
    with torch.inference_mode():
        row["eager_fp32_ms"] = time_ms(net, window, device, iters)
        if device.type == "cuda":
            half = UNet(size, 11, ngf, upsample).to(device, torch.float16,
                                                    memory_format=torch.channels_last)
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
                   ngf: int = 0, batch: int = 0, graph: str = "auto") -> dict[str, object]:
    """Training images per second of `preset` at `size` (after warm-up steps); `batch` 0
    is the preset's per-process batch."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    config = GeneratorConfig(preset=preset, ngf=ngf, checkpoint_every=10**9,
                             sample_every=10**9, batch_size=batch, train_graph=graph)
    data = synthetic_data(frames=max(64, 2 * config.global_batch(size)), size=size)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(data, config, Path(tmp), None, device)
        warm = min(5, steps)
        trainer.run(warm, progress=False)
        result = trainer.run(warm + steps, progress=False)
    return {"preset": preset, "size": size, "global_batch": trainer.global_batch,
            "learning_rate": trainer.lr, "cuda_graph": result.graph,
            "steps_timed": steps - 1, "images_per_second": result.images_per_second,
            "peak_memory_mib": peak_memory_mib(device)}


def moving_mean(values: list[float], window: int = 50) -> list[float]:
    """Trailing moving means (the first window-1 entries average what there is)."""
    cums = np.cumsum([0.0, *values])
    return [float((cums[i + 1] - cums[max(0, i + 1 - window)]) / min(window, i + 1))
            for i in range(len(values))]


def _curve_config(args: argparse.Namespace) -> GeneratorConfig:
    return GeneratorConfig(preset=args.preset or "paper", checkpoint_every=10**9,
                           sample_every=10**9, seed=0, batch_size=args.batch,
                           train_graph=args.graph)


def ddp_worker(args: argparse.Namespace) -> None:
    """Under torchrun (or alone): train, and rank 0 writes the history and throughput to
    --out/ddp.json."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    data = synthetic_data(frames=args.frames, size=args.size)
    trainer = Trainer(data, _curve_config(args), Path(args.out) / "checkpoints", None, device)
    result = trainer.run(args.steps, progress=False)
    if trainer.world.is_main:
        (Path(args.out) / "ddp.json").write_text(json.dumps(
            {"history": result.history, "images_per_second": result.images_per_second,
             "global_batch": result.global_batch, "processes": result.processes,
             "cuda_graph": result.graph, "learning_rate": trainer.lr}))
    leave(trainer.world)


def _worker_command(nproc: int, out: str, args: argparse.Namespace, batch: int,
                    graph: str) -> list[str]:
    program = [__file__, "--ddp-worker", "--out", out, "--steps", str(args.steps),
               "--size", str(args.size), "--frames", str(args.frames), "--batch", str(batch),
               "--graph", graph, *(["--preset", args.preset] if args.preset else [])]
    return torchrun_command(nproc, program) if nproc > 1 else [sys.executable, *program]


def ddp_compare(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """One process against args.gpus processes at the same global batch: L1 curves and
    throughput."""
    data = synthetic_data(frames=args.frames, size=args.size)
    args.batch = args.batch or _curve_config(args).global_batch(args.size)
    with tempfile.TemporaryDirectory() as tmp:
        single = Trainer(data, _curve_config(args), Path(tmp) / "one", None, device)
        one = single.run(args.steps, progress=False)
        del single
        torch.cuda.empty_cache()
        subprocess.run(_worker_command(args.gpus, tmp, args, args.batch, args.graph), check=True)
        many = json.loads((Path(tmp) / "ddp.json").read_text())
    curve_one = moving_mean([h["l1"] for h in one.history])
    curve_many = moving_mean([h["l1"] for h in many["history"]])
    gaps = [abs(a - b) / a for a, b in zip(curve_one[49:], curve_many[49:])]
    every = max(1, args.steps // 60)
    return {
        "steps": args.steps, "size": args.size, "global_batch": args.batch, "gpus": args.gpus,
        "l1_moving_mean_50": {"steps": list(range(1, args.steps + 1, every)),
                              "one": curve_one[::every], f"n{args.gpus}": curve_many[::every]},
        "max_relative_gap_after_step_50": max(gaps) if gaps else None,
        "images_per_second": {"one": one.images_per_second, f"n{args.gpus}":
                              many["images_per_second"]},
        "throughput_ratio": many["images_per_second"] / one.images_per_second,
    }


def _run_group(command: list[str], timeout: float) -> tuple[int, str]:
    """Run `command` in its own process group; on timeout end the whole group (torchrun's
    workers too). Returns (exit code, the output's tail); -9 and a note on timeout."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out or ""
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        try:  # a child stuck in the driver may hold the pipe open: do not wait for it
            out, _ = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            out = ""
        return -9, f"{(out or '')[-1000:]}\ntimed out after {timeout} s"


def scaling(args: argparse.Namespace) -> dict[str, object]:
    """Weak-scaling throughput: 1 process (graphed) and N (eager and graphed) at the preset's
    batch per process, 1 at twice that batch, and the issue-8 baseline (1 process, global
    batch 16, eager)."""
    n = args.gpus
    per_gpu = GeneratorConfig(preset=args.preset or "paper").global_batch(args.size)
    runs = {"baseline_1x_batch16_eager": (1, 16, "off"), "one_graph": (1, 0, "auto"),
            f"one_graph_batch{2 * per_gpu}": (1, 2 * per_gpu, "auto"),
            f"n{n}_eager": (n, 0, "off"), f"n{n}_graph": (n, 0, "on")}
    rows: dict[str, object] = {}
    for name, (nproc, batch, graph) in runs.items():
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            code, output = _run_group(_worker_command(nproc, tmp, args, batch * nproc, graph),
                                      args.timeout)
            if code != 0:
                rows[name] = {"error": output[-1500:]}
            else:
                got = json.loads((Path(tmp) / "ddp.json").read_text())
                got.pop("history")
                rows[name] = {**got, "wall_seconds": round(time.perf_counter() - start, 1)}
        # each configuration as it ends, so a run cut short still shows the ones done
        print(json.dumps({"scaling_run": name, **rows[name]}), file=sys.stderr, flush=True)
    speed = {k: v.get("images_per_second") for k, v in rows.items() if isinstance(v, dict)}

    def ratio(a: str, b: str) -> float | None:
        return speed[a] / speed[b] if speed.get(a) and speed.get(b) else None

    best_one = speed.get("one_graph") or 0.0
    best_n = max((speed.get(f"n{n}_eager") or 0.0, speed.get(f"n{n}_graph") or 0.0))
    return {"size": args.size, "steps": args.steps, "gpus": n, "runs": rows,
            f"n{n}_over_one_graph": ratio(f"n{n}_graph", "one_graph"),
            f"best_n{n}_over_best_one": best_n / best_one if best_one and best_n else None,
            "best_one_over_baseline": (best_one / speed["baseline_1x_batch16_eager"]
                                       if best_one and speed.get("baseline_1x_batch16_eager")
                                       else None)}


#: Named generator settings for `--quality --variants` (A/B on the same target).
VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "transpose": {"upsample": "transpose"},
    "resize": {"upsample": "resize"},
    "input_skip": {"input_skip": "on"},
    "no_input_skip": {"input_skip": "off"},
    "regions": {"face_weight": 1.0, "mouth_weight": 2.0},
    "msd_fm": {"d_scales": 2, "feature_matching": 10.0},
    "batch16": {"batch_size": 16},
}


def _load_state(path: Path) -> dict[str, object]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_state(path: Path, state: dict[str, object]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def _make_target(args: argparse.Namespace, work: Path, config, device: torch.device,
                 state: dict[str, object]) -> Path:
    """The prepared target under `work` (made once): synth (or the video's first seconds),
    then `dvp prepare`; the seconds of each stage into `state`."""
    from streamer.jobs.demo import prepare_demo_target, write_synth_actor

    root = work / "target"
    if (root / "target.yaml").is_file():
        return root
    if args.video:
        video = Path(args.video)
        from streamer.video.io import probe

        fps = probe(video).fps
        max_frames = round(args.seconds * fps) if args.seconds else None
        consent = (f"benchmark only: {video.name}, a public test clip shipped with this "
                   "project's shared media; no output leaves the benchmark")
        state["source"] = {"video": str(video), "frames": max_frames, "fps": fps}
    else:
        start = time.perf_counter()
        video = write_synth_actor(work / "actor", args.seed, args.frames, args.synth_size,
                                  25.0, device) / "video.mp4"
        state["synth_seconds"] = round(time.perf_counter() - start, 2)
        max_frames, consent = None, None
        state["source"] = {"synth_seed": args.seed, "frames": args.frames,
                           "synth_size": args.synth_size}
    from tracker.assets import load_face_model
    from tracker.regressor import load_or_train, settings_from_config

    start = time.perf_counter()  # once per installation (cached in DVP_HOME): not prepare's
    load_or_train(load_face_model(), settings_from_config(config.tracker))
    state["regressor_seconds"] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    prepare_demo_target(root, video, args.seed, args.size, args.preset or "paper", config,
                        device, consent=consent, max_frames=max_frames)
    state["prepare_seconds"] = round(time.perf_counter() - start, 2)
    return root


def quality(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    """Prepare (once), then per variant train from scratch to each of --eval-minutes of
    training and evaluate there; resumable (state in --work), bounded by --budget-seconds."""
    import dataclasses

    from generator.target import TargetDir
    from streamer.cli.commands.generator_cmds import training_data
    from streamer.cli.config import load_config

    began = time.perf_counter()
    budget = args.budget_seconds or float("inf")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / "state.json"
    state = _load_state(state_path)
    config = load_config(None, args.set)
    root = _make_target(args, work, config, device, state)
    _save_state(state_path, state)
    target = TargetDir(root)
    start = time.perf_counter()
    data = training_data(target, device)  # renders the conditioning cache the first time
    state.setdefault("cache_seconds", round(time.perf_counter() - start, 2))
    state["frames"] = {"total": target.info.frames, "heldout": target.info.frames -
                       target.info.holdout_start, "size": target.info.resolution}
    variants = state.setdefault("variants", {})
    for name in args.variants.split(","):
        base = dataclasses.replace(config.generator, preset=args.preset or "paper",
                                   checkpoint_every=10**9, sample_every=10**9)
        gen = dataclasses.replace(base, **VARIANTS[name])
        row = variants.setdefault(name, {"settings": VARIANTS[name], "train_seconds": 0.0,
                                         "evals": []})
        for minutes in args.eval_minutes:
            if any(e["minutes"] == minutes for e in row["evals"]):
                continue
            left = budget - (time.perf_counter() - began) - args.eval_reserve
            need = minutes * 60.0 - row["train_seconds"]
            if left <= 5.0:
                state["incomplete"] = True
                _save_state(state_path, state)
                return state
            start = time.perf_counter()
            trainer = Trainer(data, gen, work / "runs" / name / "checkpoints",
                              work / "runs" / name / "samples", device)
            ready = time.perf_counter() - start
            result = trainer.run(10**9, progress=False,
                                 seconds=max(1.0, min(need, left) - ready))
            row["train_seconds"] = round(row["train_seconds"] + time.perf_counter() - start, 2)
            row["step"], row["global_batch"] = result.step, result.global_batch
            row["learning_rate"], row["cuda_graph"] = trainer.lr, result.graph
            row.setdefault("images_per_second", []).append(round(result.images_per_second, 1))
            if need > left:
                del trainer
                state["incomplete"] = True
                _save_state(state_path, state)
                return state
            start = time.perf_counter()
            report = evaluate(make_runtime(trainer.g.eval(), "auto", device), data, device)
            row["evals"].append({"minutes": minutes, "train_seconds": row["train_seconds"],
                                 "step": result.step, "eval_seconds":
                                 round(time.perf_counter() - start, 2), "report": report})
            del trainer
            _save_state(state_path, state)
    state["incomplete"] = False
    _save_state(state_path, state)
    return state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--preset", choices=["tiny", "paper"],
                        help="network (default: paper on CUDA, tiny on the CPU)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--iters", type=int, default=0, help="timed calls (default 200 GPU, 30 CPU)")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="timed training steps (default 30 GPU, 6 CPU)")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--ddp-compare", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--steps", type=int, default=0,
                        help="training steps (default: 60 for --scaling, 300 otherwise)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=0,
                        help="frames of the synthetic data (default: 300; --quality: 1500)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (0: the preset's)")
    parser.add_argument("--graph", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--timeout", type=float, default=240.0,
                        help="seconds each --scaling configuration may take")
    parser.add_argument("--video", default="", help="--quality: a real video instead of synth")
    parser.add_argument("--seconds", type=float, default=60.0,
                        help="--quality --video: its first SECONDS (0: all)")
    parser.add_argument("--synth-size", type=int, default=320)
    parser.add_argument("--seed", type=int, default=1, help="--quality: the synth actor's seed")
    parser.add_argument("--eval-minutes", type=float, nargs="+", default=[3.0, 10.0])
    parser.add_argument("--variants", default="default",
                        help="--quality: comma-separated names of VARIANTS")
    parser.add_argument("--work", default="", help="--quality: state directory (resumable)")
    parser.add_argument("--budget-seconds", type=float, default=0.0,
                        help="--quality: stop (resumably) after this many seconds (0: none)")
    parser.add_argument("--eval-reserve", type=float, default=45.0,
                        help="--quality: seconds kept for an evaluation within the budget")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="--quality: config overrides (as dvp's --set)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    args.steps = args.steps or (60 if args.scaling else 300)
    args.frames = args.frames or (1500 if args.quality else 300)
    if args.ddp_worker:
        ddp_worker(args)
        return
    from tracker.device import pick_device

    device = pick_device(args.device)
    cuda = device.type == "cuda"
    report: dict[str, object] = {"machine": machine(device)}
    if args.scaling:
        report["scaling"] = scaling(args)
    elif args.ddp_compare:
        report["ddp_compare"] = ddp_compare(args, device)
    elif args.quality:
        if args.variants and any(v not in VARIANTS for v in args.variants.split(",")):
            parser.error(f"--variants: use names of {', '.join(VARIANTS)}")
        if not args.work:
            parser.error("--quality needs --work DIR (its resumable state)")
        report["quality"] = quality(args, device)
    else:
        preset = args.preset or ("paper" if cuda else "tiny")
        values = GeneratorConfig(preset=preset).preset_values()
        iters = args.iters or (200 if cuda else 30)
        report["preset"] = preset
        with tempfile.TemporaryDirectory() as tmp:
            report["inference_batch1"] = {
                str(size): bench_inference(size, values.ngf, device, iters, Path(tmp),
                                           values.upsample)
                for size in args.sizes}
        steps = args.train_steps or (30 if cuda else 6)
        report["training"] = [bench_training(preset, size, device, steps)
                              for size in args.sizes]
        if cuda:  # the issue-8 configuration, measured in the same run
            report["training_baseline_batch16_eager"] = bench_training(
                preset, 256, device, steps, batch=16, graph="off")
        report["peak_memory_mib"] = peak_memory_mib(device)
        report["tensorrt"] = ("present" if tensorrt_importable()
                              else "absent (the tensorrt package does not import)")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
