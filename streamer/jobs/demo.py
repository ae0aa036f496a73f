"""`dvp demo`: the whole system end to end on synthetic actors, from the installed face model.

`run_demo(out, config, settings, device)` makes, in the output directory DIR:

1. `actors/target/` and `actors/source/`: two synthetic actors of different identities
   (`renderer.synth.SynthActor`, seeds `target_seed` and `source_seed`): `video.mp4` and
   the ground-truth `params.npz`, as `dvp synth` writes them;
2. `target/`: the target directory of the target actor's video (`streamer.jobs.tracking.
   track_video` + `generator.prepare.prepare_target`, as `dvp prepare`), its consent text
   stating that the person shown is a synthetic actor;
3. `target/checkpoints/`: the generator trained up to the wanted step
   (`generator.training.Trainer`, as `dvp train`): preset `cpu_preset` / `cpu_steps` on the
   CPU (`tiny`), `gpu_preset` / `gpu_steps` on a GPU (`paper`): a fixed number of steps, so
   the model does not depend on the machine's load (`generator.max_minutes`, when a config
   sets it, stops a run early; the next `dvp demo` resumes it);
4. the held-out metrics of the model and of the renderer baseline
   (`generator.metrics.evaluate`, as `dvp eval`);
5. `out.mp4`: the source actor reenacting the target, source | conditioning | output side by
   side (`streamer.jobs.reenact.reenact_video`, as `dvp reenact --side-by-side`), marked and
   tagged as synthetic;
6. `report.json` (see `REPORT_KEYS`): held-out PSNR/SSIM/L1 of model and baseline, mean
   per-stage ms of the reenactment, the device, wall time per step, frame counts.

A second run reuses what the first made: each step is skipped when its output exists, is
complete, and was made from the same settings and the same inputs. `DIR/demo.json` records,
per step, the key it was made with (its settings and the `made` stamps of the steps it reads)
and what it measured; a step that is done again gets a new stamp, so exactly the steps that
read it are done again too. Outputs are written aside and renamed by the functions above, so
a present output is a complete one. `report.json` is rewritten on every run (cheap); its
`steps` say which were reused.

DIR must be a new or empty directory, or one that `dvp demo` made (it holds `demo.json`);
anything else is a DemoError naming it, before any work.

Settings: `DemoSettings` (section `demo` of `configs/demo.yaml`), and the stage sections of
that file layered over the defaults (`load_demo_config`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from streamer.cli.config import Config, ConfigError, _apply_mapping, _set, load_config
from tracker.errors import DvpError

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"
#: Format of DIR/demo.json.
RECORD_FORMAT = 1
RECORD_NAME = "demo.json"
REPORT_NAME = "report.json"
VIDEO_NAME = "out.mp4"
#: The steps of a demo, in order.
STEPS = ("synth_target", "synth_source", "prepare", "train", "eval", "reenact")
#: Top-level keys of report.json.
REPORT_KEYS = ("device", "backend", "preset", "batch", "resolution", "trained_steps", "wanted_steps",
               "stopped_by_time_limit", "heldout", "stage_ms", "frames", "steps",
               "wall_seconds", "outputs", "synthetic", "settings")


class DemoError(DvpError):
    """A demo that cannot run as asked (output directory, settings)."""


@dataclass
class DemoSettings:
    """What the demo makes (section `demo` of configs/demo.yaml).

    The defaults are the embedded default (the same as configs/demo.yaml): a whole demo in
    under 10 minutes on two CPU cores.
    """

    #: Seeds of the two synthetic actors (identity, look and motion); must differ.
    target_seed: int = 1
    source_seed: int = 7
    #: Frames of the target actor's video (the last 10 % are held out) and of the source's.
    target_frames: int = 250
    source_frames: int = 125
    #: Side of the square synthetic videos, px (the target's crop is about 0.8 of it).
    synth_size: int = 320
    #: Supersampling of the synthetic render (0: the renderer's default for the size).
    synth_supersample: int = 0
    #: Frame rate of the synthetic videos.
    fps: float = 25.0
    #: Portrait size S of the target (a power of two: the generator's), generator preset,
    #: training steps (a fixed number: the model must not depend on the machine's load) and
    #: global batch (0: the preset's) on the CPU and on a GPU. On two CPU cores: 128 px,
    #: `tiny`, 1,500 steps of batch 2 (docs/generator.md, "The CPU demo", says why): at 256
    #: px the steps that fit in the demo's 10 minutes leave the model below the renderer
    #: baseline's SSIM; batch 2 learns as much per step as 4, in half the time.
    cpu_resolution: int = 128
    cpu_preset: str = "tiny"
    cpu_steps: int = 1500
    cpu_batch: int = 2
    gpu_resolution: int = 256
    gpu_preset: str = "paper"
    gpu_steps: int = 3000
    gpu_batch: int = 0
    #: What the source drives (streamer.live.controls.MODES).
    mode: str = "full"

    def check(self) -> None:
        """Raise DemoError naming the first setting that cannot work."""
        from generator.config import PRESETS
        from streamer.live.controls import MODES

        if self.target_seed == self.source_seed:
            raise DemoError(f"demo.target_seed and demo.source_seed are both "
                            f"{self.target_seed}: the source must be another identity")
        if self.target_frames < 20:
            raise DemoError(f"demo.target_frames must be at least 20, got "
                            f"{self.target_frames}")
        if self.source_frames < 1:
            raise DemoError(f"demo.source_frames must be positive, got {self.source_frames}")
        if self.synth_size < 32:
            raise DemoError(f"demo.synth_size must be at least 32, got {self.synth_size}")
        if self.synth_supersample < 0:
            raise DemoError(f"demo.synth_supersample must be 0 or more, got "
                            f"{self.synth_supersample}")
        if not self.fps > 0:
            raise DemoError(f"demo.fps must be positive, got {self.fps}")
        for key in ("cpu_resolution", "gpu_resolution"):
            s = getattr(self, key)
            if s < 16 or s & (s - 1):
                raise DemoError(f"demo.{key} must be a power of two of at least 16, got {s}")
        for key in ("cpu_preset", "gpu_preset"):
            if getattr(self, key) not in PRESETS:
                raise DemoError(f"demo.{key} '{getattr(self, key)}' is not a preset: use "
                                + ", ".join(sorted(PRESETS)))
        for key in ("cpu_steps", "gpu_steps"):
            if getattr(self, key) < 1:
                raise DemoError(f"demo.{key} must be positive, got {getattr(self, key)}")
        for key in ("cpu_batch", "gpu_batch"):
            if getattr(self, key) < 0:
                raise DemoError(f"demo.{key} must be 0 (the preset's) or more, got "
                                f"{getattr(self, key)}")
        if self.mode not in MODES:
            raise DemoError(f"demo.mode '{self.mode}' is not a mode: use {', '.join(MODES)}")

    def training(self, device: torch.device) -> tuple[str, int, int, int]:
        """The training preset, steps, global batch (0: the preset's) and portrait size for
        `device`."""
        if device.type == "cuda":
            return self.gpu_preset, self.gpu_steps, self.gpu_batch, self.gpu_resolution
        return self.cpu_preset, self.cpu_steps, self.cpu_batch, self.cpu_resolution


# ---- settings ------------------------------------------------------------------------------
def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err


def _layer(config: Config, settings: DemoSettings, data: Any, source: str) -> None:
    """Apply one YAML mapping: section `demo` to `settings`, the others to `config`."""
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    demo = data.get("demo")
    if demo is not None:
        if not isinstance(demo, dict):
            raise ConfigError(f"{source}: config key 'demo' must be a mapping")
        holder = types.SimpleNamespace(demo=settings)
        for name, value in demo.items():
            _set(holder, f"demo.{name}", value)  # type: ignore[arg-type]
    _apply_mapping(config, {k: v for k, v in data.items() if k != "demo"}, source)


def load_demo_config(demo_file: str | Path | None = DEMO_CONFIG,
                     config_file: str | Path | None = None,
                     overrides: list[str] | tuple[str, ...] = ()) -> tuple[Config, DemoSettings]:
    """The demo's config and settings: the defaults (configs/default.yaml), then `demo_file`
    (its `demo` section and stage sections; skipped when it is the embedded default and
    missing), then `config_file`, then `overrides` ('section.name=value', as `--set`;
    `demo.name=value` too). Unknown keys and wrong types raise ConfigError naming them."""
    config, settings = load_config(None, []), DemoSettings()
    if demo_file is not None and (Path(demo_file).is_file() or Path(demo_file) != DEMO_CONFIG):
        _layer(config, settings, _read_yaml(Path(demo_file)), str(demo_file))
    if config_file is not None:
        _layer(config, settings, _read_yaml(Path(config_file)), str(config_file))
    stage = [o for o in overrides if not o.strip().startswith("demo.")]
    if stage:  # parsed and checked as `--set` is, then copied over the layers
        parsed = load_config(None, stage)
        for item in stage:
            section, name = item.split("=", 1)[0].strip().split(".")
            setattr(getattr(config, section), name, getattr(getattr(parsed, section), name))
    holder = types.SimpleNamespace(demo=settings)
    for item in overrides:
        if item.strip().startswith("demo."):
            key, raw = item.split("=", 1) if "=" in item else (item, None)
            if raw is None:
                raise ConfigError(f"--set expects key=value, got '{item}'")
            _set(holder, key.strip(), yaml.safe_load(raw) if raw else "")  # type: ignore[arg-type]
    return config, settings


# ---- the record of what a demo directory holds ---------------------------------------------
class DemoRecord:
    """DIR/demo.json: per step, the key it was made with and what it produced.

    `key` is a JSON-able dict; `made` a stamp unique to each making of a step's output, which
    the keys of the steps that read it include.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.path = root / RECORD_NAME
        self.steps: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as err:
                raise DemoError(f"{self.path} is not a dvp demo record ({err}): remove it "
                                f"or choose another output directory") from err
            if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT \
                    or not isinstance(data.get("steps"), dict):
                raise DemoError(f"{self.path} is not a dvp demo record of format "
                                f"{RECORD_FORMAT}: remove it or choose another output "
                                "directory")
            self.steps = data["steps"]

    def get(self, name: str, key: dict[str, Any]) -> dict[str, Any] | None:
        """The step's entry when it was made with `key` (compared as JSON), else None."""
        entry = self.steps.get(name)
        if entry is None or entry.get("key") != _jsonable(key):
            return None
        return entry

    def put(self, name: str, key: dict[str, Any], **values: Any) -> dict[str, Any]:
        """Record a (re)made step with a fresh `made` stamp; written at once, atomically."""
        entry = {"key": _jsonable(key), "made": f"{time.time_ns():x}", **_jsonable(values)}
        self.steps[name] = entry
        self.save()
        return entry

    def drop(self, name: str) -> None:
        if self.steps.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        _write_json(self.path, {"format": RECORD_FORMAT, "steps": self.steps})


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-able: {type(value).__name__}")


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def open_demo_dir(root: Path) -> DemoRecord:
    """Check (and create) the output directory; its record. Raises DemoError when `root`
    is not a directory, or is a non-empty one that `dvp demo` did not make."""
    if root.exists() and not root.is_dir():
        raise DemoError(f"{root} exists and is not a directory: choose another output "
                        "directory with -o")
    if root.is_dir() and not (root / RECORD_NAME).exists() and any(root.iterdir()):
        raise DemoError(f"{root} is not empty and was not made by 'dvp demo' (it has no "
                        f"{RECORD_NAME}): choose a new or empty output directory with -o")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DemoError(f"cannot create the output directory {root}: {err.strerror}") from err
    if not os.access(root, os.W_OK):
        raise DemoError(f"cannot write into the output directory {root}: permission denied")
    record = DemoRecord(root)
    if not record.path.exists():
        record.save()  # marks the directory as the demo's from the start
    return record


def _remove(path: Path) -> None:
    """Remove a step's stale output (inside the demo directory only)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---- the steps -----------------------------------------------------------------------------
@dataclass(frozen=True)
class DemoPaths:
    """Where a demo directory keeps each output."""

    root: Path

    @property
    def target_actor(self) -> Path:
        return self.root / "actors" / "target"

    @property
    def source_actor(self) -> Path:
        return self.root / "actors" / "source"

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def video(self) -> Path:
        return self.root / VIDEO_NAME

    @property
    def report(self) -> Path:
        return self.root / REPORT_NAME


def synth_complete(directory: Path, frames: int, size: int) -> bool:
    """Whether `directory` holds a synthetic actor's video.mp4 and params.npz of `frames`
    frames at `size` px."""
    from streamer.video.io import probe
    from tracker.params import FaceParams

    video, params = directory / "video.mp4", directory / "params.npz"
    if not (video.is_file() and params.is_file()):
        return False
    try:
        info = probe(video)
        p = FaceParams.load(params)
    except DvpError:
        return False
    return (info.frame_count == frames and (info.width, info.height) == (size, size)
            and p.frames == frames and tuple(int(v) for v in p.image_size) == (size, size))


def write_synth_actor(directory: Path, seed: int, frames: int, size: int, fps: float,
                      device: torch.device, supersample: int | None = None,
                      desc: str = "synth") -> Path:
    """A synthetic actor's `video.mp4` and ground-truth `params.npz` into `directory` (as
    `dvp synth`: SynthActor, seeded look and motion, rendered in batches); returns it."""
    from renderer.synth import SynthActor
    from streamer.video.io import VideoWriter
    from tracker.assets import load_face_model

    directory.mkdir(parents=True, exist_ok=True)
    actor = SynthActor(load_face_model(), seed=seed, size=size, device=device,
                       supersample=supersample)
    params = actor.motion(frames, fps)
    meta = {"comment": f"dvp demo: synthetic actor, seed {seed} (ground truth)"}
    batch = 8
    with VideoWriter(directory / "video.mp4", fps, metadata=meta) as writer, \
            tqdm(total=frames, desc=desc, unit="frame", leave=False) as bar:
        for start in range(0, frames, batch):
            sel = np.arange(start, min(start + batch, frames))
            images = actor.render(params.select(sel), batch=batch)
            for k, i in enumerate(sel):
                writer.write(images[k], float(i) / fps)
            bar.update(len(sel))
    params.save(directory / "params.npz")
    return directory


def consent_text(seed: int) -> str:
    """The consent recorded for a synthetic target (the demo's, the benchmarks')."""
    return (f"No real person: the target is a synthetic actor rendered by dvp from the ICT "
            f"face model (renderer.synth, seed {seed}); no consent is needed.")


def prepare_demo_target(root: Path, video: Path, seed: int, resolution: int, preset: str,
                        config: Config, device: torch.device, consent: str | None = None,
                        max_frames: int | None = None) -> Any:
    """The target directory (generator.target.TargetDir) of a video (as `dvp prepare`: track
    every frame, crop, fit albedo and lighting): a synthetic actor's of `seed` by default,
    another with its `consent`; `max_frames`: only the video's first frames."""
    from generator.prepare import PrepareSettings, prepare_target
    from generator.target import file_sha256
    from streamer.jobs.tracking import track_video
    from streamer.video.io import read_frames

    tracked = track_video(video, config, device, max_frames)
    settings = PrepareSettings(
        consent=consent or consent_text(seed), source_video=str(video.resolve()),
        source_sha256=file_sha256(video), fps=tracked.info.fps, resolution=resolution,
        window=config.renderer.window, preset=preset,
        albedo_size=config.renderer.albedo_size,
        photometric_steps=config.renderer.photometric_steps)
    totals = {"crop": tracked.params.frames, "albedo": settings.photometric_steps}
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=totals.get(stage), desc=stage, unit="step", leave=False)
        bars[stage].update(n)

    try:
        return prepare_target(root, tracked.params,
                              (frame for frame, _ in read_frames(video, max_frames)),
                              tracked.model,
                              settings, device, progress)
    finally:
        for bar in bars.values():
            bar.close()


def checkpoint_step(path: Path | None) -> int:
    """The global step of a checkpoint file (from its name), 0 for None."""
    if path is None:
        return 0
    return int(path.stem.split("-")[1])


def device_name(device: torch.device) -> str:
    """The device in words (for the report)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


@contextmanager
def _timed(seconds: dict[str, float], step: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] = round(time.perf_counter() - start, 2)


def run_demo(out: str | Path, config: Config, settings: DemoSettings | None = None,
             device: torch.device | None = None) -> dict[str, Any]:
    """Run (or finish) the demo in `out`; returns the report (also written to
    `out/report.json`). See the module doc. Raises DemoError, and the errors of the steps."""
    from generator.checkpoint import latest_checkpoint
    from generator.metrics import evaluate
    from generator.runtime import load_runtime as load_target_runtime
    from generator.target import TargetDir
    from generator.training import Trainer
    from streamer.cli.commands.generator_cmds import training_data
    from streamer.jobs.reenact import reenact_video
    from streamer.live.stages import LoadedTarget

    started = time.perf_counter()
    settings = settings or DemoSettings()
    settings.check()
    device = device or torch.device("cpu")
    paths = DemoPaths(Path(out))
    record = open_demo_dir(paths.root)
    preset, wanted, batch, resolution = settings.training(device)
    seconds: dict[str, float] = {}
    reused: dict[str, bool] = {}
    s = settings
    synth_ss = s.synth_supersample or None
    bar = tqdm(total=len(STEPS), desc="demo", unit="step")

    def begin(step: str) -> None:
        bar.set_postfix_str(step)

    def finish(step: str, was_reused: bool) -> None:
        reused[step] = was_reused
        log.info("demo: %s %s", step, "reused" if was_reused else "done")
        bar.update(1)

    try:
        # 1-2. the two synthetic actors
        actors: dict[str, dict[str, Any]] = {}
        key: dict[str, Any]
        entry: dict[str, Any] | None
        for step, directory, seed, frames in (
                ("synth_target", paths.target_actor, s.target_seed, s.target_frames),
                ("synth_source", paths.source_actor, s.source_seed, s.source_frames)):
            begin(step)
            key = {"seed": seed, "frames": frames, "size": s.synth_size, "fps": s.fps,
                   "supersample": s.synth_supersample}
            entry = record.get(step, key)
            done = entry is not None and synth_complete(directory, frames, s.synth_size)
            if not done:
                record.drop(step)
                _remove(directory)
                with _timed(seconds, step):
                    write_synth_actor(directory, seed, frames, s.synth_size, s.fps, device,
                                      synth_ss, desc=step.replace("_", " "))
                entry = record.put(step, key, seconds=seconds[step])
            actors[step] = _present(entry)
            finish(step, done)

        # 3. the target directory
        begin("prepare")
        key = {"actor": actors["synth_target"]["made"], "resolution": resolution,
               "preset": preset,
               "window": config.renderer.window, "albedo_size": config.renderer.albedo_size,
               "photometric_steps": config.renderer.photometric_steps,
               "tracker": dataclasses.asdict(config.tracker)}
        entry = record.get("prepare", key)
        done = entry is not None and _target_complete(paths.target)
        if not done:
            record.drop("prepare")
            _remove(paths.target)
            with _timed(seconds, "prepare"):
                prepare_demo_target(paths.target, paths.target_actor / "video.mp4",
                                    s.target_seed, resolution, preset, config, device)
            entry = record.put("prepare", key, seconds=seconds["prepare"])
        prepared = _present(entry)
        target = TargetDir(paths.target)
        finish("prepare", done)

        # 4. training (resumes up to the wanted step)
        begin("train")
        gen = dataclasses.replace(config.generator, preset=preset,
                                  batch_size=batch or config.generator.batch_size)
        key = {"target": prepared["made"], "preset": preset, "ngf": gen.ngf, "ndf": gen.ndf,
               "batch_size": gen.batch_size, "lr": gen.lr, "betas": [gen.beta1, gen.beta2],
               "l1_weight": gen.l1_weight, "seed": gen.seed,
               "network": dataclasses.asdict(gen.preset_values()),
               "losses": {k: getattr(gen, k) for k in ("face_weight", "mouth_weight",
                                                       "d_scales", "feature_matching")}}
        checkpoints = paths.target / "checkpoints"
        entry = record.get("train", key)
        step_now = checkpoint_step(latest_checkpoint(checkpoints))
        done = entry is not None and step_now >= wanted and entry.get("step") == step_now
        if entry is not None and not done and step_now >= wanted:  # trained on elsewhere
            entry = record.put("train", key, **{k: v for k, v in entry.items()
                                                if k not in ("key", "made", "step")},
                               step=step_now)
            done = True
        if not done:
            if entry is None:  # checkpoints of other settings (or none): start afresh
                _remove(checkpoints)
                _remove(paths.target / "samples")
            before = float(entry.get("seconds") or 0.0) if entry is not None else 0.0
            with _timed(seconds, "train"):
                data = training_data(target, device)
                trainer = Trainer(data, gen, target.output_dir("checkpoints"),
                                  target.output_dir("samples"), device)
                result = trainer.run(wanted)
            step_now = checkpoint_step(latest_checkpoint(checkpoints))
            entry = record.put("train", key, step=step_now, wanted=wanted,
                               seconds=round(before + seconds["train"], 2),
                               images_per_second=round(result.images_per_second, 2)
                               if result.images_per_second else None)
        trained = _present(entry)
        finish("train", done)

        # 5. held-out metrics
        begin("eval")
        key = {"train": trained["made"], "backend": config.generator.backend,
               "device": device.type}
        entry = record.get("eval", key)
        done = entry is not None
        if not done:
            with _timed(seconds, "eval"):
                runtime = load_target_runtime(target, config.generator.backend, device)
                data = training_data(target, device)
                metrics = evaluate(runtime, data, device)
            entry = record.put("eval", key, metrics=metrics, seconds=seconds["eval"])
        evaluated = _present(entry)
        finish("eval", done)

        # 6. the reenactment, side by side
        begin("reenact")
        key = {"train": trained["made"], "source": actors["synth_source"]["made"],
               "mode": s.mode, "mark": config.streamer.synthetic_mark,
               "backend": config.generator.backend, "device": device.type,
               "tracker": dataclasses.asdict(config.tracker),
               "ease_seconds": config.streamer.ease_seconds,
               "transfer": dataclasses.asdict(config.transfer)}
        entry = record.get("reenact", key)
        done = entry is not None and paths.video.is_file()
        if not done:
            record.drop("reenact")
            with _timed(seconds, "reenact"):
                loaded = LoadedTarget(paths.target, config, device)
                source = paths.source_actor / "video.mp4"
                summary = reenact_video(
                    loaded, source, paths.video, config, mode=s.mode, side_by_side=True)
            entry = record.put("reenact", key, summary=summary, backend=loaded.backend,
                               seconds=seconds["reenact"])
        reenacted = _present(entry)
        finish("reenact", done)
    finally:
        bar.close()

    steps = {step: {"seconds": record.steps[step].get("seconds"), "reused": reused[step]}
             for step in STEPS}
    summary = reenacted["summary"]
    metrics = evaluated["metrics"]
    report = {
        "device": device_name(device),
        "backend": reenacted.get("backend"),
        "preset": preset,
        "batch": gen.global_batch(resolution),
        "resolution": resolution,
        "trained_steps": trained["step"],
        "wanted_steps": wanted,
        "stopped_by_time_limit": trained["step"] < wanted,
        "heldout": metrics,
        "stage_ms": summary["stage_ms"],
        "frames": {"target": s.target_frames, "heldout": metrics["frames"],
                   "source": s.source_frames, "reenacted": summary["frames"],
                   "source_with_face": summary["faces"]},
        "steps": steps,
        "wall_seconds": {"this_run": round(time.perf_counter() - started, 2),
                         "all_steps": round(sum(float(v["seconds"] or 0.0)
                                                for v in steps.values()), 2)},
        "outputs": {"video": VIDEO_NAME, "target": paths.target.name,
                    "size": summary["size"]},
        "synthetic": True,
        "settings": dataclasses.asdict(s),
    }
    _write_json(paths.report, report)
    return report


def _present(entry: dict[str, Any] | None) -> dict[str, Any]:
    assert entry is not None, "a finished step has a record"
    return entry


def _target_complete(root: Path) -> bool:
    from generator.target import TargetDir

    if not root.is_dir():
        return False
    try:
        TargetDir(root)
    except DvpError:
        return False
    return True


__all__ = [
    "DEMO_CONFIG",
    "REPORT_KEYS",
    "STEPS",
    "DemoError",
    "DemoPaths",
    "DemoRecord",
    "DemoSettings",
    "consent_text",
    "load_demo_config",
    "open_demo_dir",
    "prepare_demo_target",
    "run_demo",
    "write_synth_actor",
]
