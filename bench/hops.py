"""Per-hop timing of a process's WebRTC media path, for the latency benchmarks.

`instrument()` wraps, in this process, the project's video encoders (ms per `encode` call,
colour conversion included), aiortc's video decoders (ms per `decode` call) and keeps the
frame assemblers made (their assembly times: first packet received to frame complete);
`summary()` gives medians. `budget()` lines up one frame's trip from both ends' summaries:
encode, send (the rest: packetising, encryption, the network, queues and thread hand-overs,
not measured on their own), assemble, decode, model, encode back, assemble, decode.

`lossy(rate, seed)` makes every DTLS transport created afterwards in this process drop that
fraction of RTP/RTCP packets in and out (streamer.webrtc.loss).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

_current: HopTimes | None = None
_patched = False


class HopTimes:
    """What `instrument()` records in this process since it was called."""

    def __init__(self) -> None:
        self.encode_ms: list[float] = []
        self.decode_ms: list[float] = []
        self.assemblers: list[Any] = []

    def reset(self) -> None:
        """Forget what was recorded (the assemblers made so far too)."""
        self.encode_ms.clear()
        self.decode_ms.clear()
        self.assemblers.clear()

    def summary(self) -> dict[str, Any]:
        """Medians (ms) and the assemblers' counts, merged."""
        assembly = [ms for a in self.assemblers for ms in a.stats.assembly_ms]
        counts: dict[str, int] = {}
        for a in self.assemblers:
            for key, value in a.stats.as_dict().items():
                if isinstance(value, int):
                    counts[key] = counts.get(key, 0) + value
        return {"encode_ms": _median(self.encode_ms), "decode_ms": _median(self.decode_ms),
                "assemble_ms": _median(assembly), "frames_encoded": len(self.encode_ms),
                "frames_decoded": len(self.decode_ms), "assembler": counts}


def _median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 2) if values else None


def _timed(cls: type, name: str, store: str) -> None:
    original = getattr(cls, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        tick = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            if _current is not None:
                getattr(_current, store).append((time.perf_counter() - tick) * 1e3)

    setattr(cls, name, timed)


def instrument() -> HopTimes:
    """Start recording in this process (the wrappers go in once); returns the recorder."""
    global _current, _patched
    if not _patched:
        from aiortc.codecs import h264, vpx

        from streamer.webrtc.encoders import LowLatencyH264Encoder, LowLatencyVp8Encoder
        from streamer.webrtc.jitter import FrameAssembler

        for cls in (LowLatencyVp8Encoder, LowLatencyH264Encoder):
            _timed(cls, "encode", "encode_ms")
        for cls in (vpx.Vp8Decoder, h264.H264Decoder):
            _timed(cls, "decode", "decode_ms")
        init = FrameAssembler.__init__

        def register(self: Any, *args: Any, **kwargs: Any) -> None:
            init(self, *args, **kwargs)
            if _current is not None:
                _current.assemblers.append(self)

        FrameAssembler.__init__ = register  # type: ignore[method-assign]
        _patched = True
    _current = HopTimes()
    return _current


def lossy(rate: float, seed: int = 0) -> Any:
    """Every RTCDtlsTransport made from now on in this process loses `rate` of its RTP/RTCP
    packets each way; returns the PacketLoss (its counters)."""
    from aiortc.rtcdtlstransport import RTCDtlsTransport

    from streamer.webrtc.loss import PacketLoss

    loss = PacketLoss(rate, rate, seed=seed)
    init = RTCDtlsTransport.__init__

    def with_loss(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        loss.wrap(self)

    RTCDtlsTransport.__init__ = with_loss  # type: ignore[method-assign]
    return loss


def budget(total_p50: float | None, near: dict[str, Any], far: dict[str, Any],
           model_ms: float | None) -> dict[str, Any]:
    """One frame's trip, ms: `near` is the sending and finally receiving end (the client),
    `far` the server; `send_and_queues` is the p50 total less the hops measured."""
    hops = {
        "encode": near.get("encode_ms"),
        "assemble": far.get("assemble_ms"),
        "decode": far.get("decode_ms"),
        "model": model_ms,
        "encode_back": far.get("encode_ms"),
        "assemble_back": near.get("assemble_ms"),
        "decode_back": near.get("decode_ms"),
    }
    measured = sum(v for v in hops.values() if v is not None)
    rest = round(total_p50 - measured, 2) if total_p50 is not None else None
    return {**hops, "send_and_queues": rest, "total_p50": total_p50}
