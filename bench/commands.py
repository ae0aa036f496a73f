"""Running this checkout's `dvp` from a bench, as a child process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def dvp(*args: str) -> str:
    """Run `dvp ARGS` (this checkout's code, its progress on stderr) and return its stdout;
    a failure ends the bench naming the command and its exit code."""
    command = [sys.executable, "-m", "streamer.cli.main", *args]
    print("+ dvp " + " ".join(args), file=sys.stderr, flush=True)
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"dvp {' '.join(args)} failed with exit code {done.returncode}")
    return done.stdout
