"""The `dvp` command line: common options, one subcommand per module in `streamer.cli.commands`.

Every command takes `--config FILE`, `--set key=value` (repeatable), `-v` and `--help`; every
command that computes takes `--device auto|cpu|cuda`. Exit codes: 0 success, 1 a failure the
command explains on stderr, 2 bad usage (argparse), 130 interrupted (SIGINT), 143 terminated
(SIGTERM). SIGTERM unwinds like Ctrl-C, so what a command was writing aside (a target being
prepared, a cache, a checkpoint) is removed before the process ends; a second SIGTERM ends it
at once.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from types import ModuleType

from streamer.cli.commands import COMMANDS
from streamer.cli.config import ConfigError, load_config
from tracker import choices
from tracker.errors import DvpError

log = logging.getLogger(__name__)


def _common(parser: argparse.ArgumentParser, computes: bool) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config layered over the defaults")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set renderer.resolution=512 (repeatable)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv)")
    if computes:
        parser.add_argument(
            "--device", default="auto", choices=["auto", "cpu", "cuda"],
            help="where to compute: auto picks CUDA when present (default: auto)",
        )


def build_parser(commands: Sequence[ModuleType] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser with every registered command."""
    parser = argparse.ArgumentParser(
        prog="dvp",
        description="Live Deep Video Portraits: drive a photo-realistic portrait of a target "
        "actor with your face (head pose, expression, gaze, blinks).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for module in commands:
        for name, (help_text, computes, add_args, run) in module.COMMANDS.items():
            words = name.split()
            target = sub
            if len(words) == 2:  # a command group such as `dvp assets install`
                if words[0] not in groups:
                    group = sub.add_parser(words[0], help=f"{words[0]} commands")
                    groups[words[0]] = group.add_subparsers(
                        dest="subcommand", metavar="SUBCOMMAND", required=True)
                target = groups[words[0]]
            p = target.add_parser(words[-1], help=help_text, description=help_text)
            add_args(p)
            _common(p, computes)
            p.set_defaults(_run=run, _computes=computes)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that `finally` blocks and context managers run
    (a BaseException, like KeyboardInterrupt, so no `except Exception` swallows it)."""


def _terminate(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


def _configure_logging(verbosity: int) -> None:
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # what `auto` chose (device, landmarks, rasterizer, runtime) shows at the default level
    logging.getLogger(choices.__name__).setLevel(min(level, logging.INFO))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `dvp` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (main() called from a thread): leave SIGTERM be
        previous = None
    try:
        config = load_config(args.config, args.overrides)
        return int(args._run(args, config) or 0)
    except (DvpError, ConfigError, FileNotFoundError) as err:
        print(f"dvp: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("dvp: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("dvp: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
