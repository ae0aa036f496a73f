"""Video frame assembly that completes a frame on the RTP marker bit (aiortc receivers).

Why: aiortc's video jitter buffer (`aiortc/jitterbuffer.py`, `JitterBuffer._remove_frame`,
aiortc 1.16) hands a frame to the decoder only once a packet of the *next* frame has
arrived (a timestamp change), so every receiving hop holds each frame for one frame
interval: 33 ms at 30 fps, twice in a loopback. The RTP marker bit marks the last packet of
a video frame (RFC 7741 section 4.1 for VP8, RFC 6184 section 5.1 for H.264): a receiver
that completes a frame on it does not wait for the next one.

`FrameAssembler` is aiortc's `JitterBuffer` (its ring of packets and, inherited unchanged,
its handling of out-of-order, late and duplicated packets, sequence wrap-around, overflow
and stream restarts) with these changes:

- **Completion**: a frame is complete on its packet with the marker bit set when every
  packet from its first one is there; aiortc's rule stays for a lost or unset marker: a
  packet of another timestamp following without a gap completes it.
- **All at once**: every complete frame goes out (aiortc hands over at most one frame per
  packet received; `take_ready()` gives the others, which `streamer.webrtc.aiortc_patch`
  queues for the decoder right behind the first).
- **Recovery**: aiortc asks once for a missing packet (NACK, when it notices the gap) and
  then waits for it until 512 packets later (seconds of frozen video when the packet or
  its NACK is lost). Here a gap that holds frames back is asked for again every
  `NACK_RETRY_S` (`renack()`; aiortc's own NACKs are unchanged), and a gap not filled
  within `HOLE_WAIT_S` is given up: the frames up to the next frame
  boundary after it are dropped and a keyframe is requested (PLI). After a gap given up,
  an overflow, a stream restart, and at the start, frames are held back until a keyframe
  (VP8 and H.264 are recognised; other codecs pass): a frame whose reference is missing
  decodes to garbage. The request is repeated every `KEYFRAME_RETRY_S` while none comes
  (a PLI can be lost too).
- **Figures**: `stats` (an `AssemblyStats`) counts frames by rule, gaps given up, frames
  held back, keyframe requests, and keeps recent assembly times (first packet received to
  frame complete, ms).

The decoder gets `AssembledFrame`s (aiortc's `JitterFrame`: `data` bytes, `timestamp`
90 kHz RTP units, plus the payload type and whether it is a keyframe).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_add, uint16_gt

from streamer.live.pipeline import p50_p95

#: Seconds a missing packet is waited for (retransmission) while later packets wait.
HOLE_WAIT_S = 0.25
#: Seconds between repeated NACKs for a gap that holds frames back.
NACK_RETRY_S = 0.05
#: Most sequence numbers asked for in one repeated NACK.
_NACK_MAX = 64
#: Seconds between keyframe requests while frames are held back for want of a keyframe.
KEYFRAME_RETRY_S = 0.3
#: Recent assembly times kept for `AssemblyStats`.
_RECENT = 300


class AssembledFrame(JitterFrame):
    """One encoded video frame for the decoder: `data` (the depayloaded bytes), `timestamp`
    (RTP, 90 kHz), `payload_type`, `keyframe` (True/False; None for a codec not checked)."""

    def __init__(self, data: bytes, timestamp: int, payload_type: int,
                 keyframe: bool | None) -> None:
        super().__init__(data=data, timestamp=timestamp)
        self.payload_type = payload_type
        self.keyframe = keyframe


@dataclass
class AssemblyStats:
    """Counts of one assembler. `assembly_ms`: recent frames' time from their first packet
    received to complete (ms); frames that waited for a retransmission count in full."""

    frames: int = 0
    by_marker: int = 0
    by_timestamp: int = 0
    holes_skipped: int = 0
    held_for_keyframe: int = 0
    keyframe_requests: int = 0
    nack_retries: int = 0
    assembly_ms: deque[float] = field(default_factory=lambda: deque(maxlen=_RECENT))

    def as_dict(self) -> dict[str, Any]:
        """Plain figures (assembly p50/p95 in ms over the recent frames, None before any)."""
        return {
            "frames": self.frames, "by_marker": self.by_marker,
            "by_timestamp": self.by_timestamp, "holes_skipped": self.holes_skipped,
            "held_for_keyframe": self.held_for_keyframe,
            "keyframe_requests": self.keyframe_requests, "nack_retries": self.nack_retries,
            "assembly_ms": p50_p95(self.assembly_ms),
        }


def is_keyframe(codec_name: str | None, packets: Sequence[RtpPacket]) -> bool | None:
    """Whether the frame made of `packets` (depayloaded: `_data` set) can be decoded on its
    own. VP8: its first packet starts partition 0 and the payload header's P bit is 0
    (RFC 7741 section 4.3); H.264: it holds an IDR slice (NAL type 5). None for other
    codecs (not checked)."""
    name = (codec_name or "").lower()
    if name == "vp8":
        try:
            descriptor, data = VpxPayloadDescriptor.parse(packets[0].payload)
        except ValueError:
            return False
        if not descriptor.partition_start or descriptor.partition_id != 0 or not data:
            return False
        return data[0] & 0x01 == 0
    if name == "h264":
        data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
        start = data.find(b"\x00\x00\x01")
        while start != -1 and start + 3 < len(data):
            if data[start + 3] & 0x1F == 5:
                return True
            start = data.find(b"\x00\x00\x01", start + 3)
        return False
    return None


class FrameAssembler(JitterBuffer):
    """aiortc's video `JitterBuffer`, completing frames on the marker bit (module doc).

    `codecs` maps payload types to objects with a `name` (aiortc's RTCRtpCodecParameters;
    the receiver's own mapping, filled once it starts): it says which keyframe test
    applies. `clock` gives seconds (time.monotonic by default; tests pass their own).
    """

    def __init__(self, capacity: int = 512, codecs: Mapping[int, Any] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 hole_wait: float = HOLE_WAIT_S,
                 keyframe_retry: float = KEYFRAME_RETRY_S,
                 nack_retry: float = NACK_RETRY_S) -> None:
        super().__init__(capacity=capacity, is_video=True)
        self.codecs: Mapping[int, Any] = codecs if codecs is not None else {}
        self.clock = clock
        self.hole_wait = hole_wait
        self.keyframe_retry = keyframe_retry
        self.nack_retry = nack_retry
        #: SSRC of the media stream (of the last packet added), for RTCP feedback
        self.ssrc: int | None = None
        self.stats = AssemblyStats()
        self._ready: deque[AssembledFrame] = deque()
        self._now = 0.0
        self._newest: int | None = None  # the highest sequence number received
        self._incoming = 0
        self._blocked: tuple[int, float] | None = None  # (origin, since when)
        self._awaiting_keyframe = True
        self._last_request: float | None = None
        self._request = False
        self._last_nack: float | None = None

    # -- aiortc's interface --
    def add(self, packet: RtpPacket) -> tuple[bool, AssembledFrame | None]:  # type: ignore[override]
        """Take one depayloaded packet; returns (send a PLI, the first frame completed now
        or None). Further frames completed by this packet wait in `take_ready()`."""
        self._now = self.clock()
        packet._arrival = self._now  # type: ignore[attr-defined]
        self.ssrc = packet.ssrc
        self._incoming = seq = packet.sequence_number
        if self._newest is None or uint16_gt(seq, self._newest):
            self._newest = seq
        pli, frame = super().add(packet)
        if self._request:
            pli, self._request = True, False
        return pli, frame  # type: ignore[return-value]

    def take_ready(self) -> list[AssembledFrame]:
        """Frames completed beyond the one `add` returned, oldest first (and forgets them)."""
        frames = list(self._ready)
        self._ready.clear()
        return frames

    def renack(self) -> list[int]:
        """Sequence numbers to ask for again (a NACK) now: those missing before the newest
        packet while a gap has held frames back for `nack_retry` seconds, at most every
        `nack_retry` seconds; else []."""
        if self._blocked is None or self._newest is None or self._origin is None:
            return []
        now = self._now
        if now - self._blocked[1] < self.nack_retry or (
                self._last_nack is not None and now - self._last_nack < self.nack_retry):
            return []
        span = min(uint16_add(self._newest, -self._origin), self._capacity)
        missing = [uint16_add(self._origin, i) for i in range(span) if self._slot(i) is None]
        self._last_nack = now
        self.stats.nack_retries += 1
        return sorted(missing[:_NACK_MAX])  # numeric order, as aiortc packs NACKs

    def remove(self, count: int) -> None:
        if count >= self._capacity:  # aiortc restarts the stream (a jump of sequence numbers)
            self._newest = self._incoming
            self._lost_reference(pli_sent=True)
        super().remove(count)

    def smart_remove(self, count: int) -> bool:
        self._lost_reference(pli_sent=True)  # aiortc drops frames to make room (and sends a PLI)
        return super().smart_remove(count)

    # -- assembly --
    def _remove_frame(self, sequence_number: int) -> AssembledFrame | None:
        while True:
            frames, consumed, hole = self._scan()
            if consumed:
                self.remove(consumed)
            for packets, rule in frames:
                self._emit(packets, rule)
            if hole is None:
                self._blocked = None
                break
            if self._blocked is None or self._blocked[0] != self._origin:
                self._blocked = (self._origin, self._now)  # type: ignore[assignment]
                break
            if self._now - self._blocked[1] < self.hole_wait:
                break
            boundary = self._boundary_after(hole)
            if boundary is None:  # nothing complete after the gap yet: keep waiting
                break
            self.remove(boundary)
            self.stats.holes_skipped += 1
            self._blocked = None
            self._lost_reference(pli_sent=False)
            self._ask_keyframe()
        return self._ready.popleft() if self._ready else None

    def _slot(self, offset: int) -> RtpPacket | None:
        assert self._origin is not None
        return self._packets[(self._origin + offset) % self._capacity]

    def _scan(self) -> tuple[list[tuple[list[RtpPacket], str]], int, int | None]:
        """Complete frames from the origin: ([(packets, rule)], packets consumed, offset of
        a gap with packets after it or None)."""
        frames: list[tuple[list[RtpPacket], str]] = []
        consumed = 0
        packets: list[RtpPacket] = []
        for count in range(self._capacity):
            packet = self._slot(count)
            if packet is None:
                assert self._newest is not None and self._origin is not None
                later = count < uint16_add(self._newest, -self._origin) < self._capacity
                return frames, consumed, count if later else None
            if packets and packet.timestamp != packets[0].timestamp:
                frames.append((packets, "timestamp"))
                consumed, packets = count, []
            packets.append(packet)
            if packet.marker:
                frames.append((packets, "marker"))
                consumed, packets = count + 1, []
        return frames, consumed, None

    def _boundary_after(self, hole: int) -> int | None:
        """Offset of the first frame start known after the gap at `hole`: the packet after
        one with the marker bit, or a packet whose timestamp differs from the one before."""
        before: RtpPacket | None = None
        for offset in range(hole + 1, self._capacity):
            packet = self._slot(offset)
            if before is not None and (before.marker or (
                    packet is not None and packet.timestamp != before.timestamp)):
                return offset
            before = packet
        return None

    def _emit(self, packets: list[RtpPacket], rule: str) -> None:
        data = b"".join(p._data for p in packets)  # type: ignore[attr-defined]
        if not data:  # padding only (bandwidth probes): nothing to decode
            return
        codec = self.codecs.get(packets[0].payload_type)
        keyframe = is_keyframe(getattr(codec, "name", None), packets)
        if self._awaiting_keyframe:
            if keyframe is False:
                self.stats.held_for_keyframe += 1
                self._ask_keyframe()
                return
            self._awaiting_keyframe = False
        self.stats.frames += 1
        if rule == "marker":
            self.stats.by_marker += 1
        else:
            self.stats.by_timestamp += 1
        self.stats.assembly_ms.append((self._now - packets[0]._arrival) * 1e3)  # type: ignore[attr-defined]
        self._ready.append(AssembledFrame(data, packets[0].timestamp,
                                          packets[0].payload_type, keyframe))

    def _lost_reference(self, pli_sent: bool) -> None:
        """Frames were dropped: hold back frames until a keyframe. `pli_sent`: aiortc sends
        a PLI for this one itself (the retry clock starts now)."""
        self._awaiting_keyframe = True
        if pli_sent:
            self._last_request = self._now

    def _ask_keyframe(self) -> None:
        """Request a keyframe (PLI with the next `add`'s answer), at most every
        `keyframe_retry` seconds."""
        if self._last_request is None or self._now - self._last_request >= self.keyframe_retry:
            self._last_request = self._now
            self._request = True
            self.stats.keyframe_requests += 1
