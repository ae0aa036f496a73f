"""The one place that reports what `auto` chose: no slow path stays silent.

Where a setting left at `auto` picks an implementation (the device, the landmark backend,
the rasterizer, the generator runtime, the number of landmark worker processes), the code
that picks calls `report_choice(what, chosen, why)`: one INFO line on this module's logger,
once per process for each distinct choice, saying what runs and, when a faster one exists
but was not used, why not and what to do about it (e.g. "CuPy absent: pip install
'live-dvp[gpu]'"). The `dvp` CLI shows this logger at its default verbosity, so every
command and the server print their choices once; the rest of the INFO lines stay behind -v.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)

_reported: set[tuple[str, str, str]] = set()
_lock = threading.Lock()


def report_choice(what: str, chosen: str, why: str = "") -> bool:
    """Log `"{what}: {chosen} ({why})"` at INFO once per process per distinct choice.

    what: the stage ("device", "landmarks", "rasterizer", "generator runtime", ...);
    chosen: what runs; why: the reason, and when a faster one was not used, why not and how
    to get it. Returns True when this call logged (False: already reported).
    """
    key = (what, chosen, why)
    with _lock:
        if key in _reported:
            return False
        _reported.add(key)
    log.info("%s: %s%s", what, chosen, f" ({why})" if why else "")
    return True


def forget_choices() -> None:
    """Report every choice again from now on (a new command in the same process, tests)."""
    with _lock:
        _reported.clear()
