"""One config for every stage: YAML defaults plus `--set section.key=value` overrides.

The combined `Config` holds one dataclass per package (`tracker`, `renderer`, `generator`,
`streamer`), and `transfer` (the tracker's transfer onto a target). Loading checks every key and type: an unknown key or a value of the wrong type is
a `ConfigError` whose message names the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from generator.config import GeneratorConfig
from renderer.config import RendererConfig
from tracker.config import TrackerConfig, TransferConfig
from tracker.errors import DvpError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


class ConfigError(DvpError):
    """A config file or override that names an unknown key or holds a wrong type."""


@dataclass
class StreamerConfig:
    """Settings of the live and offline output (section `streamer`)."""

    #: Draw the visible "synthetic" mark on every reenactment output frame.
    synthetic_mark: bool = True
    #: Video frame rate of live output, frames per second.
    fps: float = 30.0
    #: Largest signalling message accepted, bytes.
    max_message_bytes: int = 65536
    #: Seconds over which the output eases back to neutral when the face is lost.
    ease_seconds: float = 1.0
    #: Live sessions `dvp serve` runs at once (`--max-sessions` overrides); more get `busy`.
    #: 0: as many as the GPU holds at the target's size, estimated when the server starts
    #: from the device stage's measured time, the free memory and the host's cores, and at
    #: most what one process holds (2 at 30 fps; more per GPU with `--ray local
    #: --workers-per-gpu K`) (streamer.live.capacity); 2 on the CPU.
    max_sessions: int = 0
    #: Seconds a live session may take to send its offer (from connecting) and, again, for
    #: its peer connection to connect (from the answer); past either it is closed and its
    #: slot freed, so idle or stalled clients cannot hold the server.
    negotiation_seconds: float = 10.0
    #: Torch CPU threads per process for `dvp serve` / `dvp reenact` (0: torch's default, one
    #: per core). One is the safe choice: the live path already runs MediaPipe, the encoder
    #: and the decoder in threads of their own, and torch's thread pool stalls badly when
    #: its threads are descheduled (measured on 2 busy cores: 4-100x slower with 2 threads).
    cpu_threads: int = 1
    #: The interpreter's thread switch interval for `dvp serve` / `dvp reenact`, ms
    #: (sys.setswitchinterval; 0 keeps Python's 5 ms). Many sessions run many threads that
    #: share one interpreter lock; a thread back from the GPU, MediaPipe or the encoder waits
    #: up to this long for it while another thread runs Python.
    switch_interval_ms: float = 0.0
    #: Copy the frame id stamped in each source frame's pixels (streamer.video.stamp) onto the
    #: reenacted frame: for latency measurements (bench/latency.py), off in normal use.
    echo_stamp: bool = False
    #: Live: seconds between generated frames re-tracked in the background to check the
    #: output against the requested pose (the `retrack` figures of the session stats;
    #: streamer.jobs.retrack); 0: off.
    retrack_seconds: float = 1.0
    #: The echo configuration of `dvp serve`: send each received video frame straight back
    #: through the same transport path, with no tracking and no model (no mark: it is the
    #: sender's own picture). For measuring the transport (bench/browser_latency.py).
    echo: bool = False
    #: Worker processes for the landmarks of a whole video (`dvp track`, `dvp prepare`,
    #: `dvp reenact`): each tracks a chunk of the video from its own start (0: auto, one per
    #: usable core and at most one per 50 frames, for videos of 500 frames or more; 1: one
    #: stream in process).
    landmark_workers: int = 0
    #: Frames per batch of the GPU work of `dvp reenact` (render, window, generator).
    reenact_batch: int = 32
    #: `dvp serve --ray`: seconds between the log lines of each worker's figures (sessions,
    #: fps, frames, latency, errors: the numbers of `/metrics`); 0: none.
    metrics_log_seconds: float = 60.0
    #: `dvp serve --ray`: worker processes per GPU (`--workers-per-gpu` overrides), each its
    #: own engine, its own sessions, 1/K of the GPU (its capacity sized to that share) and its
    #: share of the host's cores: spreads the per-session CPU work (landmarks, fit, VP8
    #: decode and encode) over K interpreter locks. `--ray local --device cpu`: K CPU
    #: workers. Only `--ray` reads it.
    workers_per_gpu: int = 1


@dataclass
class Config:
    """Every stage's settings."""

    tracker: TrackerConfig = field(default_factory=TrackerConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    renderer: RendererConfig = field(default_factory=RendererConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    streamer: StreamerConfig = field(default_factory=StreamerConfig)


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` as the field type `annotation`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(annotation) or (Any,)
            return [v if item is Any else _coerce(key, v, item) for v in value]
        if isinstance(value, str):
            return _coerce(key, [v for v in value.split(",") if v], annotation)
    else:
        return value
    name = getattr(annotation, "__name__", str(annotation))
    raise ConfigError(f"config key '{key}' expects {name}, got {value!r}")


def _set(config: Config, key: str, value: Any) -> None:
    """Set dotted `key` ('section.name') on `config`, checking the name and the type."""
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"unknown config key '{key}': use section.name, e.g. tracker.huber_px")
    section_name, name = parts
    section = getattr(config, section_name, None)
    if section is None or not dataclasses.is_dataclass(section):
        raise ConfigError(f"unknown config key '{key}': no section '{section_name}'")
    hints = typing.get_type_hints(type(section))
    if name not in hints:
        raise ConfigError(f"unknown config key '{key}'")
    setattr(section, name, _coerce(key, value, hints[name]))


def _apply_mapping(config: Config, data: Any, source: str) -> None:
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for section_name, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: config key '{section_name}' must be a mapping")
        for name, value in values.items():
            _set(config, f"{section_name}.{name}", value)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Build the config: defaults, then `configs/default.yaml`, then `path`, then overrides.

    `overrides` are 'section.name=value' strings (the CLI's `--set`); values are parsed as
    YAML scalars, so `--set renderer.resolution=512` gives an int.
    """
    config = Config()
    files = [DEFAULT_CONFIG] if DEFAULT_CONFIG.exists() else []
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        files.append(Path(path))
    for file in files:
        try:
            data = yaml.safe_load(Path(file).read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{file}: not valid YAML: {err}") from err
        _apply_mapping(config, data, str(file))
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        _set(config, key.strip(), value)
    return config


def as_dict(config: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for logs and `target.yaml`)."""
    return dataclasses.asdict(config)


if __name__ == "__main__":  # `python -m streamer.cli.config > configs/default.yaml`
    print("# Defaults of every stage. Override with --config FILE or --set section.key=value.")
    print(yaml.safe_dump(as_dict(Config()), sort_keys=False), end="")
