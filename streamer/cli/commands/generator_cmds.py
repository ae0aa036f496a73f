"""`dvp train`, `dvp eval`, `dvp export`: the rendering-to-video network of a target directory.

`dvp train TDIR --gpus N` (N > 1) re-runs `dvp train` under torchrun in N processes (one per
GPU; with `--device cpu`, N CPU processes on gloo), each with the preset's batch (weak
scaling) unless `generator.batch_size` fixes the global batch. It prints the last
checkpoint on stdout and its throughput on stderr (`dvp train: step N, X images/s on N
processes (global batch B)`). The preset is `--preset`, else the one
recorded in the target's target.yaml.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist

from generator.checkpoint import latest_checkpoint, load_generator, require_checkpoint
from generator.config import PRESETS
from generator.dataset import ConditioningSource, TrainingData, load_training_data
from generator.distributed import from_env, join, leave, torchrun_command
from generator.export import export
from generator.metrics import evaluate
from generator.runtime import load_runtime
from generator.target import TargetDir
from generator.training import Trainer, TrainResult
from streamer.cli.config import Config
from streamer.cli.messages import command_device
from tracker.errors import DvpError

log = logging.getLogger(__name__)


def renderer_factory(target: TargetDir,
                     device: torch.device) -> Callable[[], ConditioningSource]:
    """Makes the target's ConditioningRenderer (face model from the cache, target's albedo)."""
    def make() -> ConditioningSource:
        from renderer.conditioning import ConditioningRenderer
        from tracker.assets import load_face_model

        return ConditioningRenderer(load_face_model(), target.albedo(), target.info.resolution,
                                    device)
    return make


def training_data(target: TargetDir, device: torch.device) -> TrainingData:
    """The target's TrainingData (conditioning rendered into the cache when missing), with
    the face model's mouth box (`renderer.regions.mouth_box`) for the regions."""
    from renderer.regions import mouth_box
    from tracker.assets import load_face_model

    return load_training_data(target, renderer_factory(target, device),
                              mouth_box(load_face_model()))


def _add_target(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="TDIR", help="target directory (made by 'dvp prepare')")


def _add_train(p: argparse.ArgumentParser) -> None:
    _add_target(p)
    p.add_argument("--steps", type=int, default=0, metavar="N",
                   help="train up to global step N (default: the preset's)")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="network preset (default: the target's, from target.yaml)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="train on N GPUs of this host through torchrun (default: 1)")


def _relaunch(args: argparse.Namespace) -> int:
    """Run this `dvp train` again under torchrun in `args.gpus` processes."""
    if args.device != "cpu" and args.gpus > torch.cuda.device_count():
        raise DvpError(f"--gpus {args.gpus} asks for more GPUs than the "
                       f"{torch.cuda.device_count()} visible")
    argv = ["train", args.target, "--steps", str(args.steps), "--device", args.device]
    argv += ["--preset", args.preset] if args.preset else []
    argv += ["--config", args.config] if args.config else []
    for item in args.overrides:
        argv += ["--set", item]
    argv += ["-v"] * args.verbose
    command = torchrun_command(args.gpus, ["-m", "streamer.cli.main", *argv])
    log.info("launching %s", " ".join(command))
    return subprocess.run(command, check=False).returncode


def _train(args: argparse.Namespace, config: Config) -> int:
    world = from_env()
    if args.gpus > 1 and world.size == 1:
        return _relaunch(args)
    target = TargetDir(args.target)
    gen = config.generator
    gen.preset = args.preset or target.info.preset
    device = join(world, command_device(args.device))
    try:
        if world.is_main:  # rank 0 renders the cache, the others then read it
            data = training_data(target, device)
        if world.size > 1:
            dist.barrier()
        if not world.is_main:
            data = training_data(target, device)
        trainer = Trainer(data, gen, target.output_dir("checkpoints"),
                          target.output_dir("samples"), device, world)
        result = trainer.run(args.steps or gen.preset_values().steps)
        if world.size > 1:  # every rank done (rank 0 writes samples last) before teardown
            dist.barrier()
    finally:
        leave(world)
    if world.is_main:
        print(result.checkpoint or latest_checkpoint(target.root / "checkpoints"))
        print(throughput_line(result), file=sys.stderr)
    return 0


def throughput_line(result: TrainResult) -> str:
    """What `dvp train` says on stderr when it ends: steps, images/s, processes, batch."""
    speed = (f"{result.images_per_second:.1f} images/s" if result.images_per_second
             else "too few steps to time")
    graph = ", CUDA graph" if result.graph else ""
    return (f"dvp train: step {result.step}, {speed} on {result.processes} process"
            f"{'es' if result.processes > 1 else ''} (global batch {result.global_batch}{graph})")


def _eval(args: argparse.Namespace, config: Config) -> int:
    target = TargetDir(args.target)
    device = command_device(args.device)
    runtime = load_runtime(target, config.generator.backend, device)
    data = training_data(target, device)
    print(json.dumps(evaluate(runtime, data, device), indent=2))
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    _add_target(p)
    p.add_argument("--backend", choices=["onnx", "tensorrt"], default="onnx",
                   help="onnx: checked ONNX file; tensorrt: also an FP16 engine (default: onnx)")


def _export(args: argparse.Namespace, config: Config) -> int:
    target = TargetDir(args.target)
    checkpoint = require_checkpoint(target.root / "checkpoints")
    model = load_generator(checkpoint)
    print(export(model, target.output_dir("engine"), args.backend,
                 config.generator.engine_max_batch, checkpoint=checkpoint))
    return 0


COMMANDS = {
    "train": ("train (or resume) the target's rendering-to-video network", True,
              _add_train, _train),
    "eval": ("held-out metrics of the latest checkpoint and the renderer baseline (JSON)", True,
             _add_target, _eval),
    "export": ("export the latest checkpoint for inference into TDIR/engine/", True,
               _add_export, _export),
}
