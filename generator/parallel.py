"""An ordered map over a thread pool, for frame work whose C code releases the GIL (PNG
coding in Pillow, resizing in OpenCV)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from tracker.device import usable_cores

In = TypeVar("In")
Out = TypeVar("Out")

#: Most threads `threads_for(0)` gives (auto: one per usable core, at most this many).
MAX_THREADS = 8


def threads_for(setting: int = 0) -> int:
    """Threads for frame work: `setting`, or for 0 one per usable core, at most MAX_THREADS."""
    if setting < 0:
        raise ValueError(f"frame threads must be 0 (auto) or more, got {setting}")
    return setting or min(usable_cores(), MAX_THREADS)


def ordered_map(fn: Callable[[In], Out], items: Iterable[In], threads: int = 0
                ) -> Iterator[Out]:
    """`fn(item)` of each of `items`, in their order, computed on `threads` threads (0:
    `threads_for`; 1: in the caller's thread, one after another). `items` is consumed in
    the caller's thread, at most 2 x threads items ahead of the results. An exception of
    `fn` is raised where its result would have come, after the calls under way have ended;
    the calls not started are dropped (also when the caller stops early)."""
    threads = threads_for(threads)
    if threads == 1:
        yield from map(fn, items)
        return
    pending: deque[Future[Out]] = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="frames") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                while len(pending) > 2 * threads or (pending and pending[0].done()):
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
