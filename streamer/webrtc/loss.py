"""Packet loss on an aiortc transport, in process: for testing and measuring recovery.

`PacketLoss(rate_in, rate_out, seed)` drops, at random, that fraction of the SRTP and SRTCP
packets a DTLS transport receives and sends (media, NACK, PLI, receiver reports alike); the
DTLS handshake and the data channel (SCTP over DTLS) are left alone. `wrap(transport)` acts
on one `RTCDtlsTransport`, `wrap_connection(pc)` on every transport of a peer connection.
It is not part of serving: tests and benchmarks apply it to their own connections.
"""

from __future__ import annotations

import random
from typing import Any


class PacketLoss:
    """Random loss of RTP/RTCP packets; `dropped_in`/`dropped_out` and `passed_in`/
    `passed_out` count what it did."""

    def __init__(self, rate_in: float, rate_out: float | None = None, seed: int = 0) -> None:
        rate_out = rate_in if rate_out is None else rate_out
        for name, rate in (("rate_in", rate_in), ("rate_out", rate_out)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"packet loss {name} must lie in [0, 1), got {rate}")
        self.rate_in, self.rate_out = rate_in, rate_out
        self._rng = random.Random(seed)
        self.dropped_in = self.dropped_out = self.passed_in = self.passed_out = 0
        self._wrapped: set[int] = set()

    def _keep(self, rate: float) -> bool:
        return rate <= 0.0 or self._rng.random() >= rate

    def wrap(self, transport: Any) -> None:
        """Drop packets of this aiortc RTCDtlsTransport from now on (once per transport)."""
        if id(transport) in self._wrapped:
            return
        self._wrapped.add(id(transport))
        send, rtp_in, rtcp_in = (transport._send_rtp, transport._handle_rtp_data,
                                 transport._handle_rtcp_data)

        async def _send_rtp(data: bytes) -> None:
            if self._keep(self.rate_out):
                self.passed_out += 1
                await send(data)
            else:
                self.dropped_out += 1

        async def _handle_rtp_data(data: bytes, arrival_time_ms: int) -> None:
            if self._keep(self.rate_in):
                self.passed_in += 1
                await rtp_in(data, arrival_time_ms)
            else:
                self.dropped_in += 1

        async def _handle_rtcp_data(data: bytes) -> None:
            if self._keep(self.rate_in):
                self.passed_in += 1
                await rtcp_in(data)
            else:
                self.dropped_in += 1

        transport._send_rtp = _send_rtp
        transport._handle_rtp_data = _handle_rtp_data
        transport._handle_rtcp_data = _handle_rtcp_data

    def wrap_connection(self, pc: Any) -> None:
        """Drop packets on every DTLS transport of an aiortc RTCPeerConnection."""
        for transceiver in pc.getTransceivers():
            for end in (transceiver.sender, transceiver.receiver):
                if end.transport is not None:
                    self.wrap(end.transport)

    def as_dict(self) -> dict[str, Any]:
        return {"rate_in": self.rate_in, "rate_out": self.rate_out,
                "dropped_in": self.dropped_in, "passed_in": self.passed_in,
                "dropped_out": self.dropped_out, "passed_out": self.passed_out}
