"""What commands tell the user besides their result: warning lines and the `--strict` flag."""

from __future__ import annotations

import argparse
import sys


def warn(message: str) -> None:
    """One `dvp: warning: MESSAGE` line on stderr (a result the user should know is partial)."""
    print(f"dvp: warning: {message}", file=sys.stderr, flush=True)


def add_strict(parser: argparse.ArgumentParser) -> None:
    """`--strict`: a source video not decoded whole, or frames without a face, is an error."""
    parser.add_argument(
        "--strict", action="store_true",
        help="fail (exit 1, nothing written) when the video cannot be decoded whole or a "
             "frame has no face, instead of a warning")
