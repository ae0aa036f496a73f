"""The echo configuration of `dvp serve` (`streamer.echo: true`): each received video frame
goes straight back, through the same transport path as reenacted frames (the session's
receiver, its output track, the encoder), with no tracking and no model. It measures the
transport as the product has it (bench/browser_latency.py, bench/latency.py's baseline).

`EchoPipeline` stands where a session's `LivePipeline` stands and offers what the session
uses of it; `submit` (on the asyncio loop) hands the decoded frame (yuv420p, as the decoder
gave it) to `send` at once. Echoed frames are the sender's own picture, not a reenactment:
they carry no synthetic mark. Nothing is kept.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from streamer.live.controls import Controls

_HISTORY = 120


class EchoPipeline:
    """A session's pipeline in the echo configuration: `send(frame)` gets every frame."""

    def __init__(self, send: Callable[[Any], None]) -> None:
        self.send = send
        self.controls = Controls()
        self.setup_error: BaseException | None = None
        self._submitted = 0
        self._times: deque[float] = deque(maxlen=_HISTORY)

    def set_controls(self, controls: Controls) -> None:
        self.controls = controls

    def set_neutral(self) -> None:
        """Nothing to calibrate."""

    def start(self) -> None:
        """Nothing to start."""

    def wait_ready(self, timeout: float | None = None) -> bool:
        return True

    def submit(self, image: Any, timestamp: float) -> None:
        """Send `image` (an av.VideoFrame) back now."""
        self._submitted += 1
        self._times.append(time.monotonic())
        self.send(image)

    def close(self, timeout: float = 10.0) -> None:
        """Nothing to stop."""

    def stats(self) -> dict[str, Any]:
        """The figures a LivePipeline reports, for frames echoed (no stages, no latency)."""
        now = time.monotonic()
        recent = [t for t in self._times if now - t <= 2.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) \
            if len(recent) > 2 and recent[-1] > recent[0] else 0.0
        return {"submitted": self._submitted, "processed": self._submitted, "dropped": 0,
                "errors": 0, "fps": round(fps, 2), "latency_ms": {"p50": 0.0, "p95": 0.0},
                "stage_ms": {}, "face": False, "mode": "echo"}

    def latency_estimate(self) -> float:
        return 0.0
