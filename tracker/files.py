"""Writing files so that a crash never leaves a half-written one: aside, then renamed; and
reading `.npz` files so that a damaged one is one clear error, not a traceback."""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def partial_path(path: str | Path) -> Path:
    """Where this process writes `path` aside before renaming it: `.NAME.PID.partial` beside
    it (a file or a folder). `remove_stale_partials` finds those of processes that died."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.partial")


def _process_runs(pid: int) -> bool:
    """True when a process `pid` exists (ours or another user's)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(directory: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed processes left in `directory`: `.NAME.PID.partial` files and
    folders (see `partial_path`) whose process PID no longer runs. `name` limits the sweep
    to one NAME. Those of running processes (this one too) are left alone. Returns the
    removed paths."""
    directory = Path(directory)
    pattern = re.compile(r"^\.(.+)\.(\d+)\.partial$")
    removed = []
    try:
        entries = list(os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or (name is not None and match.group(1) != name):
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _process_runs(pid):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed %s, left by process %d, which was stopped while writing it",
                    path, pid)
        removed.append(path)
    return removed


def save_npz(path: str | Path, arrays: Mapping[str, np.ndarray]) -> Path:
    """Write `arrays` as an uncompressed `.npz` into a temporary file beside `path`, then
    rename it over `path`; on any error the temporary file is removed. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, **dict(arrays))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


#: What numpy raises on a damaged, truncated, empty or foreign `.npz` file.
_NPZ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, read whole (never unpickling anything).

    Raises FileNotFoundError when the file is missing, ValueError saying why when it is not
    a readable `.npz` (empty, truncated, garbage, pickled objects inside).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ValueError("the file is empty (0 bytes)")
    with open(path, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            raise ValueError("it is not an .npz archive")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except _NPZ_ERRORS as err:
        raise ValueError(str(err) or type(err).__name__) from err
