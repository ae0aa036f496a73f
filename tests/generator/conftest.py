"""Shared fixtures of the generator tests."""

from __future__ import annotations

import pytest

from generator.synthetic import synthetic_data


@pytest.fixture(scope="module")
def data():  # type: ignore[no-untyped-def]
    """A small synthetic training set: 24 frames at 32 px (a module may define its own)."""
    return synthetic_data(frames=24, size=32)
