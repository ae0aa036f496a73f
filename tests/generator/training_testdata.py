"""Helpers of the training tests."""

from __future__ import annotations

from typing import Any

from generator.config import GeneratorConfig


def small_config(**kw: Any) -> GeneratorConfig:
    """A tiny network (widths 8) at batch 2, never checkpointing or sampling unless asked."""
    base = {"preset": "tiny", "ngf": 8, "ndf": 8, "batch_size": 2, "checkpoint_every": 10_000,
            "sample_every": 10_000}
    return GeneratorConfig(**{**base, **kw})
