"""Writing files so that a crash never leaves a half-written one: aside, then renamed."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np


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
