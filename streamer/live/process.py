"""Process-wide settings of the commands that run the live path (`dvp serve`, `dvp reenact`,
a cluster worker): applied once, at the start, by each of them."""

from __future__ import annotations

import sys

import torch

from streamer.cli.config import Config


def apply_process_settings(config: Config) -> None:
    """Apply `streamer.cpu_threads` (torch's CPU threads; 0 keeps torch's default) and
    `streamer.switch_interval_ms` (the interpreter's thread switch interval; 0 keeps
    Python's)."""
    if config.streamer.cpu_threads > 0:
        torch.set_num_threads(config.streamer.cpu_threads)
    if config.streamer.switch_interval_ms > 0:
        sys.setswitchinterval(config.streamer.switch_interval_ms / 1e3)
