"""Colour conversion of PyAV frames through one libswscale context per thread and purpose.

`VideoFrame.reformat` and `VideoFrame.to_ndarray(format=...)` make a new libswscale
context for every frame they are called on (each frame object has its own reformatter):
about 3 ms at 256 x 256, ten times the conversion itself. A `VideoReformatter` kept
between frames keeps its context while the frames' size, format and colour settings stay,
so the functions here keep one per thread (a reformatter is not thread-safe) for each kind
of conversion; the output is the same as the per-frame call's.
"""

from __future__ import annotations

import threading
from typing import Any

import av
import numpy as np
from av.video.reformatter import VideoReformatter

_LOCAL = threading.local()


def _reformatter(kind: str) -> VideoReformatter:
    """This thread's reformatter for conversions of `kind` (made on first use)."""
    found = getattr(_LOCAL, kind, None)
    if found is None:
        found = VideoReformatter()
        setattr(_LOCAL, kind, found)
    return found


def frame_to_rgb(frame: av.VideoFrame) -> np.ndarray:
    """A decoded frame as an `(H, W, 3)` uint8 RGB array, honouring its colour-range tag."""
    kwargs: dict[str, Any] = {"format": "rgb24"}
    if frame.color_range:
        kwargs["src_color_range"] = int(frame.color_range)
    return _reformatter("rgb").reformat(frame, **kwargs).to_ndarray()


def rgb_to_yuv420p(rgb: np.ndarray, bt709: bool = False) -> av.VideoFrame:
    """`rgb` `(H, W, 3)` uint8 as a yuv420p VideoFrame: BT.601 (libswscale's default, what
    WebRTC peers assume) or, with `bt709`, BT.709 limited range (the files we write)."""
    return frame_to_yuv420p(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb),
                                                       format="rgb24"), bt709)


def frame_to_yuv420p(frame: av.VideoFrame, bt709: bool = False) -> av.VideoFrame:
    """`frame` (any format) as yuv420p, as `rgb_to_yuv420p`; a yuv420p frame passes as is
    when `bt709` is not asked for."""
    if bt709:
        return _reformatter("yuv709").reformat(frame, format="yuv420p",
                                               dst_colorspace="itu709", dst_color_range="MPEG")
    if frame.format.name == "yuv420p":
        return frame
    return _reformatter("yuv").reformat(frame, format="yuv420p")
