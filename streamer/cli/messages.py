"""What commands tell the user besides their result: warning lines, the `--strict` flag,
and the error of a `--device` that cannot be had."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tracker.errors import DvpError

if TYPE_CHECKING:
    import torch


def warn(message: str) -> None:
    """One `dvp: warning: MESSAGE` line on stderr (a result the user should know is partial)."""
    print(f"dvp: warning: {message}", file=sys.stderr, flush=True)


def add_strict(parser: argparse.ArgumentParser) -> None:
    """`--strict`: a source video not decoded whole, or frames without a face, is an error."""
    parser.add_argument(
        "--strict", action="store_true",
        help="fail (exit 1, nothing written) when the video cannot be decoded whole or a "
             "frame has no face, instead of a warning")


def command_device(name: str) -> torch.device:
    """The torch device of `--device NAME` (tracker.device.pick_device); one that cannot be
    had (CUDA asked for, none visible) is a DvpError saying so, not a traceback."""
    from tracker.device import pick_device  # imports torch: only when a command computes

    try:
        return pick_device(name)
    except (RuntimeError, ValueError) as err:
        raise DvpError(str(err)) from err
