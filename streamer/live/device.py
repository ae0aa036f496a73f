"""What the live engine needs of its device, one code path for CUDA and the CPU.

On CUDA: streams (each GPU stage on its own), events that say when queued work is done
(and time it), page-locked ("pinned") host memory for asynchronous downloads. On the CPU
every one of them degrades to what the synchronous CPU already gives: `on(stream)` does
nothing, an event is done when it is recorded and times by the wall clock, host memory is
ordinary memory. The engine's code does not branch on the device; only this module does.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch


class Fence:
    """The point in a stream's queue where it was recorded (CUDA: an event; CPU: now).

    `wait()` blocks until the work queued before it is done; `ms_since(other)` is the
    device time between two fences, milliseconds (valid once both are done)."""

    def __init__(self, cuda: bool) -> None:
        self._event = torch.cuda.Event(enable_timing=True) if cuda else None
        self._time = 0.0

    def record(self) -> Fence:
        """Record on the current stream (CUDA) or take the time (CPU); returns self."""
        if self._event is not None:
            self._event.record()
        else:
            self._time = time.perf_counter()
        return self

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def done(self) -> bool:
        return self._event.query() if self._event is not None else True

    def ms_since(self, earlier: Fence) -> float:
        """Device milliseconds from `earlier` to this fence (both recorded and done)."""
        if self._event is not None and earlier._event is not None:
            return float(earlier._event.elapsed_time(self._event))
        return (self._time - earlier._time) * 1e3

    def block(self, stream: Any) -> None:
        """Make `stream`'s later work wait for this fence (CUDA; nothing on the CPU)."""
        if self._event is not None and stream is not None:
            stream.wait_event(self._event)


class DeviceKit:
    """Streams, fences and host buffers of one device (see the module doc)."""

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        #: the CUDA device's index ("cuda" alone is the current device of the maker's thread)
        self.index = (self.device.index if self.device.index is not None
                      else torch.cuda.current_device()) if self.cuda else None

    def stream(self, high_priority: bool = False) -> torch.cuda.Stream | None:
        """A new stream (CUDA; high priority for small work on the critical path), or None
        on the CPU."""
        if not self.cuda:
            return None
        return torch.cuda.Stream(self.device, priority=-1 if high_priority else 0)

    @contextlib.contextmanager
    def on(self, stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Queue the block's device work on `stream` (nothing on the CPU or for None)."""
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield

    def fence(self) -> Fence:
        """A fence recorded now on the current stream."""
        return Fence(self.cuda).record()

    def upload(self, array: np.ndarray) -> torch.Tensor:
        """`array` on the device without waiting: on CUDA staged through pinned memory
        (torch's caching host allocator keeps the block until the copy has run), so the
        copy is queued on the current stream like a kernel; on the CPU the same memory."""
        host = torch.from_numpy(np.ascontiguousarray(array))
        if not self.cuda:
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        """`(nbytes,)` uint8 host memory: pinned on CUDA (asynchronous downloads)."""
        return torch.empty(int(nbytes), dtype=torch.uint8, pin_memory=self.cuda)

    def bind_thread(self) -> None:
        """Make this device the current one of the calling thread (CUDA's current device is
        per thread)."""
        if self.index is not None:
            torch.cuda.set_device(self.index)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
