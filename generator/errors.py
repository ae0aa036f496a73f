"""Errors of the generator stage: each says what is wrong and, where it can, what to do."""

from __future__ import annotations

from tracker.errors import DvpError


class TargetError(DvpError):
    """A target directory of another format version, or one with files missing."""


class CheckpointError(DvpError):
    """A checkpoint that is missing, unreadable or of another network shape."""


class BackendError(DvpError):
    """An inference backend that was asked for but cannot run here."""


class DataError(DvpError):
    """Training data that cannot make a window (too short, shapes that do not agree)."""


class PresetError(DvpError):
    """A generator preset name that does not exist."""
