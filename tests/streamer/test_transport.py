"""The transport as the product has it: `dvp serve`'s echo configuration and the Python
client, both with the project's aiortc receivers (frames completed on the marker bit) and
encoders; an echo must come back within one frame interval, and video must recover from
packet loss without freezing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from streamer.cli.config import load_config
from streamer.video.stamp import read_stamp, write_stamp
from streamer.webrtc import aiortc_patch
from streamer.webrtc.client import DvpClient, FrameSourceTrack
from streamer.webrtc.loss import PacketLoss

ECHO = ["streamer.echo=true"]


def picture(i: int) -> np.ndarray:
    """A 240 x 320 picture that changes every frame, with frame id i stamped."""
    yy, xx = np.mgrid[0:240, 0:320]
    rgb = np.empty((240, 320, 3), np.uint8)
    rgb[..., 0] = (xx + 3 * i) % 256
    rgb[..., 1] = (yy * 2) % 256
    rgb[..., 2] = 90
    return write_stamp(rgb, i)


async def echo_run(server: Any, fps: float, seconds: float,
                   on_connected: Any = None) -> dict[str, Any]:
    """Send stamped frames at `fps` for `seconds` to an echo server; the frames that came
    back: (receive time, id, ms since sent) and the unreadable count."""
    source = FrameSourceTrack(picture, fps=fps)
    back: list[tuple[float, int, float]] = []
    unreadable = 0
    async with DvpClient(server.ws_url, source) as client:
        await client.next_frame(30)
        if on_connected is not None:
            on_connected(client)
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            try:
                received, frame = await client.next_frame(5)
            except TimeoutError:
                break
            stamp = read_stamp(frame.to_ndarray(format="rgb24"))
            if stamp is None or stamp not in source.sent:
                unreadable += 1
                continue
            back.append((received, stamp, (received - source.sent[stamp]) * 1e3))
        receivers = [t.receiver for t in client.pc.getTransceivers() if t.kind == "video"]
        return {"back": back, "unreadable": unreadable, "sent": len(source.sent),
                "client": [aiortc_patch.assembler(r) for r in receivers],
                "hello": client.hello}


def server_assemblers(server: Any) -> list[Any]:
    return [aiortc_patch.assembler(t.receiver) for s in server.server.sessions.values()
            for t in s.media.pc.getTransceivers() if t.kind == "video"]


def test_an_echo_comes_back_within_one_frame_interval(run_server: Any) -> None:
    """At 10 fps a frame interval is 100 ms; aiortc's own jitter buffer holds each frame
    that long at each of the two receivers (p50 >= 200 ms): this fails if the project's
    frame assembly stops taking effect."""
    assert aiortc_patch.installed()
    server = run_server(config=load_config(None, ECHO))
    seen: dict[str, Any] = {}
    result = asyncio.run(echo_run(server, fps=10, seconds=4,
                                  on_connected=lambda c: seen.update(
                                      server=server_assemblers(server))))
    latencies = [ms for _, _, ms in result["back"]]
    assert len(latencies) >= 25, result
    assert result["unreadable"] == 0
    assert np.median(latencies) < 100.0, f"echo p50 {np.median(latencies):.0f} ms"
    (client_side,) = result["client"]
    (server_side,) = seen["server"]
    for assembler in (client_side, server_side):
        assert assembler is not None, "a receiver has aiortc's own jitter buffer"
        assert assembler.stats.by_marker >= 25 and assembler.stats.by_timestamp == 0
    # the echo is the sent picture itself, in order, unmarked
    ids = [i for _, i, _ in result["back"]]
    assert ids == sorted(ids)


def test_echo_is_the_received_picture(run_server: Any) -> None:
    server = run_server(config=load_config(None, ECHO))

    async def go() -> tuple[np.ndarray, int, list[dict[str, Any]], str]:
        async with DvpClient(server.ws_url, FrameSourceTrack(picture, fps=15)) as client:
            for _ in range(5):
                _, frame = await client.next_frame(30)
            image = frame.to_ndarray(format="rgb24")
            deadline = time.monotonic() + 5
            while not any(m["type"] == "stats" for m in client.messages) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            return image, len(client.params), client.messages, client.pc.remoteDescription.sdp

    image, params, messages, answer = asyncio.run(go())
    assert aiortc_patch.PLAYOUT_DELAY_URI in answer  # negotiated: video sent for no delay
    stamp = read_stamp(image)
    assert stamp is not None
    error = np.abs(image.astype(int) - picture(stamp).astype(int)).mean()
    assert error < 12.0, f"the echo differs from the picture sent (mean error {error:.1f})"
    assert params == 0  # no reenactment, no parameters
    stats = next(m for m in messages if m["type"] == "stats")
    assert stats["mode"] == "echo" and stats["processed"] >= 5


def test_video_recovers_from_packet_loss(run_server: Any) -> None:
    """5 % of the server's RTP/RTCP packets lost each way for 8 s at 15 fps: retransmission
    (NACK), keyframe requests (PLI) and keyframes keep the video going: no gap of a second
    between good frames, and no broken frame reaches the client's decoder output."""
    server = run_server(config=load_config(None, ECHO))
    loss = PacketLoss(0.05, 0.05, seed=3)

    def lossy(client: Any) -> None:
        for session in server.server.sessions.values():
            loss.wrap_connection(session.media.pc)

    result = asyncio.run(echo_run(server, fps=15, seconds=8, on_connected=lossy))
    assert loss.dropped_in >= 3 and loss.dropped_out >= 3, loss.as_dict()
    times = [t for t, _, _ in result["back"]]
    assert len(times) >= 0.6 * 15 * 8, (len(times), loss.as_dict())
    gap = max(np.diff(times))
    assert gap < 1.0, f"video froze for {gap:.2f} s ({loss.as_dict()})"
    assert result["unreadable"] <= 2, result["unreadable"]


def test_sent_video_packets_carry_a_zero_playout_delay() -> None:
    """The playout-delay extension (min = max = 0 ms) in every packet of a sender that
    negotiated it, beside aiortc's own extensions; none where it was not negotiated."""
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters, RTCRtpParameters
    from aiortc.rtp import HeaderExtensions, HeaderExtensionsMap, unpack_header_extensions

    def extensions(negotiated: list[tuple[int, str]]) -> list[tuple[int, bytes]]:
        ids = HeaderExtensionsMap()
        ids.configure(RTCRtpParameters(headerExtensions=[
            RTCRtpHeaderExtensionParameters(id=i, uri=u) for i, u in negotiated]))
        return unpack_header_extensions(*ids.set(HeaderExtensions(mid="0")))

    mid = (1, "urn:ietf:params:rtp-hdrext:sdes:mid")
    assert extensions([mid, (5, aiortc_patch.PLAYOUT_DELAY_URI)]) == [(1, b"0"),
                                                                     (5, b"\x00\x00\x00")]
    assert extensions([mid]) == [(1, b"0")]
