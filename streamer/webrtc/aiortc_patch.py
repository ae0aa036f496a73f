"""What this project changes in aiortc, and why: applied once, when `streamer.webrtc` is
imported (`install()`; idempotent). Checked against aiortc 1.16 (pyproject pins
`aiortc>=1.16,<1.17`); another version gets a warning, and an aiortc whose internals moved
gets an error in the log and its own behaviour (tests/streamer/test_transport.py fails then).

1. **Receivers complete video frames on the RTP marker bit** (`streamer.webrtc.jitter`):
   aiortc's video jitter buffer waits for a packet of the next frame before it hands a
   frame to the decoder, one frame interval per receiving hop (33 ms at 30 fps). Every
   `RTCRtpReceiver` of kind video gets a `FrameAssembler` in place of its `JitterBuffer`
   (audio keeps aiortc's), and `_handle_rtp_packet` is wrapped so that the frames a packet
   completes beyond the first (after a retransmission fills a gap) go to the decoder queue
   right behind it, as aiortc queues the first (timestamp mapped, codec by payload type),
   and that a gap holding frames back is asked for again (a NACK every 50 ms: aiortc asks
   once). aiortc's own NACKs, PLI, REMB, RTX and the decoder thread are unchanged.
2. **Senders encode with the project's video encoders** (`streamer.webrtc.encoders`): a
   bitrate suited to the frame size, VP8's denoiser off, x264 `veryfast`; VP8 real-time
   and H.264 `zerolatency` as aiortc has them; a keyframe on PLI as aiortc does it.
   `aiortc.rtcrtpsender.get_encoder` is replaced by one that returns them for video/VP8
   and video/H264 (aiortc's own for anything else).
3. **Video is sent with a playout delay of zero** (the `playout-delay` RTP header
   extension, http://www.webrtc.org/experiments/rtp-hdrext/playout-delay, min = max = 0):
   a browser that negotiates it (Chromium offers it) then shows each frame as soon as it is
   decoded instead of smoothing playout behind a jitter buffer of its own choosing; the
   page's `jitterBufferTarget = 0` only lowers the target of that buffer. aiortc neither
   negotiates nor writes the extension: it is added to aiortc's video header extensions
   (`aiortc.codecs.HEADER_EXTENSIONS`), and `HeaderExtensionsMap` notes its negotiated id
   and writes it in every packet its sender sends. aiortc's receivers ignore it.
"""

from __future__ import annotations

import functools
import logging
from importlib import metadata
from typing import Any

from aiortc import codecs as aiortc_codecs
from aiortc import rtcrtpsender, rtp
from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters
from aiortc.rtcrtpreceiver import RTCRtpReceiver

from streamer.webrtc.encoders import video_encoder
from streamer.webrtc.jitter import FrameAssembler

log = logging.getLogger(__name__)

#: aiortc releases these changes were checked against (major.minor).
CHECKED_VERSIONS = ("1.16",)
#: aiortc's private receiver attributes used here (name-mangled `RTCRtpReceiver.__x`).
_BUFFER = "_RTCRtpReceiver__jitter_buffer"
_CODECS = "_RTCRtpReceiver__codecs"
_DECODER_QUEUE = "_RTCRtpReceiver__decoder_queue"
_DECODER_THREAD = "_RTCRtpReceiver__decoder_thread"
_MAPPER = "_RTCRtpReceiver__timestamp_mapper"
PLAYOUT_DELAY_URI = "http://www.webrtc.org/experiments/rtp-hdrext/playout-delay"
#: The extension's id in aiortc's own offers (1 and 3 are aiortc's mid and abs-send-time).
_PLAYOUT_DELAY_ID = 5
#: Its value: minimum and maximum delay, 12 bits each, in 10 ms units: both 0.
_ZERO_PLAYOUT_DELAY = b"\x00\x00\x00"

_installed = False


def installed() -> bool:
    """Whether `install()` has patched aiortc in this process."""
    return _installed


def assembler(receiver: Any) -> FrameAssembler | None:
    """The FrameAssembler of an aiortc video receiver (None for audio, or unpatched)."""
    buffer = getattr(receiver, _BUFFER, None)
    return buffer if isinstance(buffer, FrameAssembler) else None


def install() -> None:
    """Patch aiortc (module doc). Safe to call more than once."""
    global _installed
    if _installed:
        return
    version = metadata.version("aiortc")
    if not version.startswith(tuple(v + "." for v in CHECKED_VERSIONS)):
        log.warning("aiortc %s: the low-latency receive and encode changes were checked "
                     "against %s only", version, ", ".join(CHECKED_VERSIONS))
    _patch_receiver()
    _patch_sender()
    _patch_playout_delay()
    _installed = True


def _patch_receiver() -> None:
    original_init = RTCRtpReceiver.__init__
    original_handle = RTCRtpReceiver._handle_rtp_packet

    @functools.wraps(original_init)
    def __init__(self: RTCRtpReceiver, kind: str, *args: Any, **kwargs: Any) -> None:
        original_init(self, kind, *args, **kwargs)
        if kind != "video":
            return
        old, codecs = getattr(self, _BUFFER, None), getattr(self, _CODECS, None)
        if old is None or codecs is None:
            log.error("aiortc's RTCRtpReceiver has no %s / %s: frames are assembled by "
                      "aiortc's jitter buffer (one frame interval later)", _BUFFER, _CODECS)
            return
        setattr(self, _BUFFER, FrameAssembler(capacity=old.capacity, codecs=codecs))

    @functools.wraps(original_handle)
    async def _handle_rtp_packet(self: RTCRtpReceiver, packet: Any,
                                 arrival_time_ms: int) -> None:
        await original_handle(self, packet, arrival_time_ms)
        buffer = assembler(self)
        if buffer is None:
            return
        lost = buffer.renack()
        if lost and buffer.ssrc is not None:
            await self._send_rtcp_nack(buffer.ssrc, lost)
        frames = buffer.take_ready()
        if not frames or not getattr(self, _DECODER_THREAD, None):
            return
        codecs, mapper = getattr(self, _CODECS), getattr(self, _MAPPER)
        queue = getattr(self, _DECODER_QUEUE)
        for frame in frames:
            codec = codecs.get(frame.payload_type)
            if codec is not None:
                frame.timestamp = mapper.map(frame.timestamp)
                queue.put((codec, frame))

    RTCRtpReceiver.__init__ = __init__  # type: ignore[method-assign]
    RTCRtpReceiver._handle_rtp_packet = _handle_rtp_packet  # type: ignore[method-assign]


def _patch_sender() -> None:
    original = rtcrtpsender.get_encoder

    @functools.wraps(original)
    def get_encoder(codec: Any) -> Any:
        return video_encoder(codec.mimeType) or original(codec)

    rtcrtpsender.get_encoder = get_encoder  # type: ignore[assignment]


def _patch_playout_delay() -> None:
    video = aiortc_codecs.HEADER_EXTENSIONS["video"]
    if not any(ext.uri == PLAYOUT_DELAY_URI for ext in video):
        video.append(RTCRtpHeaderExtensionParameters(id=_PLAYOUT_DELAY_ID,
                                                     uri=PLAYOUT_DELAY_URI))
    original_configure = rtp.HeaderExtensionsMap.configure
    original_set = rtp.HeaderExtensionsMap.set

    @functools.wraps(original_configure)
    def configure(self: rtp.HeaderExtensionsMap, parameters: Any) -> None:
        original_configure(self, parameters)
        for ext in parameters.headerExtensions:
            if ext.uri == PLAYOUT_DELAY_URI:
                self._playout_delay_id = ext.id  # type: ignore[attr-defined]

    @functools.wraps(original_set)
    def set_(self: rtp.HeaderExtensionsMap, values: rtp.HeaderExtensions) -> tuple[int, bytes]:
        profile, value = original_set(self, values)
        ext_id = getattr(self, "_playout_delay_id", None)
        if ext_id is None:
            return profile, value
        items = rtp.unpack_header_extensions(profile, value)
        return rtp.pack_header_extensions([*items, (ext_id, _ZERO_PLAYOUT_DELAY)])

    rtp.HeaderExtensionsMap.configure = configure  # type: ignore[method-assign]
    rtp.HeaderExtensionsMap.set = set_  # type: ignore[method-assign]
