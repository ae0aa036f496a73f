"""aiortc media tracks of a live session: the reenacted video out, the microphone delayed.

- `ReenactedVideoTrack`: the frames a session's pipeline makes, sent as they come (no fixed
  clock: a frame goes to the encoder as soon as it exists). Latest frame wins here too: if
  the encoder falls behind, an older waiting frame is replaced. Frames arrive as yuv420p
  planes made on the GPU by the live engine (`yuv_video_frame`), so neither the asyncio
  loop nor the encoder converts colour.
- `DelayedAudioTrack`: the browser's microphone returned with the video's processing delay
  added, so speech stays in sync with the reenacted mouth. Frames are played out on the
  schedule of their own timestamps, shifted by the delay the pipeline currently measures.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import time
from collections.abc import Callable
from typing import Any

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streamer.video.convert import rgb_to_yuv420p

log = logging.getLogger(__name__)

VIDEO_CLOCK = 90_000
VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
#: Audio later than this behind its schedule is re-anchored (played at once from then on).
_AUDIO_LATE_S = 0.25


def video_frame(rgb: np.ndarray, seconds: float) -> av.VideoFrame:
    """An encoder-ready yuv420p frame of `rgb` `(H, W, 3)` uint8 stamped at `seconds`
    (converted by libswscale)."""
    return _stamped(rgb_to_yuv420p(rgb), seconds)


def yuv_video_frame(planes: np.ndarray, seconds: float) -> av.VideoFrame:
    """An encoder-ready frame of yuv420p `planes` `(H*3/2, W)` uint8 (the live engine's
    output, streamer.live.output) stamped at `seconds`: the planes are copied in as they
    are, no colour conversion."""
    return _stamped(av.VideoFrame.from_ndarray(planes, format="yuv420p"), seconds)


def _stamped(frame: av.VideoFrame, seconds: float) -> av.VideoFrame:
    frame.pts = round(seconds * VIDEO_CLOCK)
    frame.time_base = VIDEO_TIME_BASE
    return frame


class ReenactedVideoTrack(MediaStreamTrack):
    """The output video of one session; `put` (from the loop) offers the next frame."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self._frame: av.VideoFrame | None = None
        self._event = asyncio.Event()
        self._last_pts = -1
        self.sent = 0
        self.replaced = 0

    def put(self, frame: av.VideoFrame) -> None:
        """Offer a frame (call in the loop's thread); a frame still waiting is replaced."""
        if self._frame is not None:
            self.replaced += 1
        if frame.pts is not None and frame.pts <= self._last_pts:
            frame.pts = self._last_pts + 1
        self._frame = frame
        self._event.set()

    async def recv(self) -> av.VideoFrame:
        while self._frame is None:
            if self.readyState != "live":
                raise MediaStreamError
            self._event.clear()
            await self._event.wait()
        frame, self._frame = self._frame, None
        if self.readyState != "live":
            raise MediaStreamError
        self._last_pts = frame.pts if frame.pts is not None else self._last_pts
        self.sent += 1
        return frame

    def stop(self) -> None:
        super().stop()
        self._event.set()


class DelayedAudioTrack(MediaStreamTrack):
    """`source` (a received audio track) played out `delay()` seconds later."""

    kind = "audio"

    def __init__(self, source: MediaStreamTrack, delay: Callable[[], float]) -> None:
        super().__init__()
        self.source = source
        self.delay = delay
        self._anchor: float | None = None
        self.frames = 0

    async def recv(self) -> Any:
        if self.readyState != "live":
            raise MediaStreamError
        frame = await self.source.recv()
        media_t = float(frame.time) if frame.time is not None else None
        now = time.monotonic()
        if media_t is None:
            return frame
        if self._anchor is None:
            self._anchor = now - media_t
        due = self._anchor + media_t + max(0.0, self.delay())
        wait = due - now
        if wait > 0:
            await asyncio.sleep(min(wait, 2.0))
        elif -wait > _AUDIO_LATE_S + self.delay():
            self._anchor = now - media_t  # the source stalled or jumped: start over
        self.frames += 1
        return frame


class RtpClock:
    """Seconds from a stream's RTP-derived pts (90 kHz, 32-bit, random start): unwraps the
    32-bit counter and restarts on a jump of more than `max_jump` seconds."""

    def __init__(self, max_jump: float = 10.0) -> None:
        self.max_jump = max_jump
        self._last_raw: int | None = None
        self._seconds = 0.0

    def __call__(self, pts: int | None, time_base: fractions.Fraction | None) -> float:
        if pts is None or time_base is None:
            self._seconds += 1.0 / 30.0
            return self._seconds
        if self._last_raw is None:
            self._last_raw = pts
            return self._seconds
        step = pts - self._last_raw
        if time_base == VIDEO_TIME_BASE:
            step %= 1 << 32  # the RTP counter wraps
        dt = float(step * time_base)
        self._last_raw = pts
        if not 0.0 <= dt <= self.max_jump:
            dt = 1.0 / 30.0  # a jump or a reset: carry on one frame later
        self._seconds += dt
        return self._seconds
