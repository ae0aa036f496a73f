"""Video encoders for latency: aiortc's VP8 and H.264 encoders with the project's settings.

aiortc's own (`aiortc/codecs/vpx.py`, `aiortc/codecs/h264.py`, 1.16) are already real-time
(VP8: `deadline=realtime`, `lag-in-frames=0`; H.264: `tune=zerolatency`, Baseline, so no
frame waits inside the encoder for a later one). These subclasses change:

- **bitrate suited to the output size** (`suited_bitrate`: 0.1 bit per pixel at 30 fps,
  300 kbps to 4 Mbps) instead of a fixed start (500 kbps VP8, 1 Mbps H.264). The receiver's
  estimate (REMB) can lower it to half, not raise it, in steps of a factor sqrt(2) (the
  step nearest to the estimate): aiortc
  reopens the encoder (a keyframe) on every change above 10 %, so small swings of the
  estimate must not reach it.
- **VP8**: the temporal denoiser off (`noise-sensitivity=0`: the output is a generated,
  clean picture; the denoiser costs 0.4-0.5 ms at 512 x 512).
- **H.264**: x264 preset `veryfast` (aiortc leaves x264's `medium`: 7.6 ms against 2.5 ms
  per 512 x 512 frame, measured on the 2-core CPU), `zerolatency` kept.
- **threads**: VP8 as aiortc decides (one thread up to 640 x 480); H.264 likewise (aiortc
  leaves it to FFmpeg's automatic count, which stalls on a busy machine).

A keyframe on PLI/FIR is aiortc's (the sender sets `force_keyframe`; these encoders keep
it). `streamer.webrtc.aiortc_patch` makes aiortc's senders use them.
"""

from __future__ import annotations

import fractions
import math
import multiprocessing
from collections.abc import Iterator
from typing import Any

import av
from aiortc.codecs import h264, vpx

from streamer.video.convert import frame_to_yuv420p

#: Bits per pixel per frame of the suited bitrate (at `_FPS` frames per second).
BITS_PER_PIXEL = 0.1
MIN_BITRATE = 300_000
MAX_BITRATE = 4_000_000
_FPS = 30
#: Steps the receiver's estimate may take the bitrate down to: suited x these.
_LEVELS = (1.0, 1 / math.sqrt(2), 0.5)


def suited_bitrate(width: int, height: int) -> int:
    """Target bits per second for `width` x `height` video at 30 fps."""
    return int(min(MAX_BITRATE, max(MIN_BITRATE, BITS_PER_PIXEL * width * height * _FPS)))


class _SuitedBitrate:
    """The bitrate property shared by both encoders: the receiver's estimate (`requested`)
    bounded by the frame size's suited bitrate and quantised to `_LEVELS`."""

    _size: tuple[int, int] = (0, 0)
    _requested: int | None = None

    @property
    def target_bitrate(self) -> int:
        suited = suited_bitrate(*self._size) if self._size[0] else MIN_BITRATE
        if self._requested is None:
            return suited
        # the level nearest to the estimate (in log scale), never above the suited bitrate
        ratio = math.log2(max(self._requested, 1) / suited)
        level = min(_LEVELS, key=lambda x: abs(math.log2(x) - ratio))
        return int(suited * level)

    @target_bitrate.setter
    def target_bitrate(self, bitrate: int) -> None:
        self._requested = int(bitrate)

    def _stale(self, codec: Any, frame: av.VideoFrame) -> bool:
        """aiortc's rule for reopening the codec: another size, or a bitrate 10 % off."""
        return (frame.width != codec.width or frame.height != codec.height
                or abs(self.target_bitrate - codec.bit_rate) / codec.bit_rate > 0.1)


def _threads(frame: av.VideoFrame) -> int:
    return vpx.number_of_threads(frame.width * frame.height, multiprocessing.cpu_count())


class LowLatencyVp8Encoder(_SuitedBitrate, vpx.Vp8Encoder):
    """aiortc's VP8 encoder with the settings of the module doc."""

    def encode(self, frame: Any, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        frame = frame_to_yuv420p(frame)
        self._size = (frame.width, frame.height)
        if self.codec is None or self._stale(self.codec, frame):
            self.codec = self._open(frame)
        return super().encode(frame, force_keyframe)

    def _open(self, frame: av.VideoFrame) -> Any:
        bitrate = self.target_bitrate
        codec = av.CodecContext.create("libvpx", "w")
        codec.width, codec.height = frame.width, frame.height
        codec.bit_rate = bitrate
        codec.pix_fmt = "yuv420p"
        codec.gop_size = 3000  # keyframes on request only
        codec.qmin, codec.qmax = 2, 56
        codec.options = {
            "bufsize": str(bitrate),  # a one-second rate-control buffer
            "cpu-used": "-6",
            "deadline": "realtime",
            "lag-in-frames": "0",
            "minrate": str(bitrate),
            "maxrate": str(bitrate),
            "noise-sensitivity": "0",
            "overshoot-pct": "15",
            "partitions": "0",
            "static-thresh": "1",
            "undershoot-pct": "100",
        }
        codec.thread_count = _threads(frame)
        return codec


class LowLatencyH264Encoder(_SuitedBitrate, h264.H264Encoder):
    """aiortc's H.264 encoder with the settings of the module doc."""

    def _encode_frame(self, frame: av.VideoFrame, force_keyframe: bool) -> Iterator[bytes]:
        self._size = (frame.width, frame.height)
        if self.codec is None or self._stale(self.codec, frame):
            self.buffer_data, self.buffer_pts = b"", None
            self.codec = self._open(frame)
        yield from super()._encode_frame(frame, force_keyframe)

    def _open(self, frame: av.VideoFrame) -> Any:
        codec = av.CodecContext.create("libx264", "w")
        codec.width, codec.height = frame.width, frame.height
        codec.bit_rate = self.target_bitrate
        codec.pix_fmt = "yuv420p"
        codec.framerate = fractions.Fraction(h264.MAX_FRAME_RATE, 1)
        codec.time_base = fractions.Fraction(1, h264.MAX_FRAME_RATE)
        codec.options = {"level": "31", "preset": "veryfast", "tune": "zerolatency"}
        codec.profile = "Baseline"
        codec.thread_count = _threads(frame)
        return codec


def video_encoder(mime_type: str) -> Any:
    """The project's encoder for a video MIME type, or None (aiortc's own then)."""
    kind = mime_type.lower()
    if kind == "video/vp8":
        return LowLatencyVp8Encoder()
    if kind == "video/h264":
        return LowLatencyH264Encoder()
    return None
