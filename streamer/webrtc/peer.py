"""The media half of one live session: its aiortc peer connection, its live-engine session,
its tracks and its `stats`, whichever process holds them.

`dvp serve` alone holds it beside the session's WebSocket (streamer.webrtc.server); under
`dvp serve --ray` a cluster worker holds it (streamer.cluster.worker) and the front keeps
the WebSocket. Either way the media flows between the client and this peer connection, and
the session's outgoing signalling messages (`stats`, `error`) go through `send`; `end` is
called when the session cannot go on (its peer connection failed or closed, or its
pipeline could not start).

Threads: the asyncio loop runs the peer connection and hands frames between aiortc and the
live engine (streamer.live.engine: its threads do the model work, latest frame wins at
every hand-over); the engine's frames come back as yuv420p planes, which the loop hands to
aiortc's sender unconverted. No webcam frame is stored: each lives until its session has
found its landmarks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError

from streamer.live.controls import Controls
from streamer.live.pipeline import OutputFrame, p50_p95, params_message
from streamer.live.session import EngineSession
from streamer.webrtc.echo import EchoPipeline
from streamer.webrtc.media import (
    DelayedAudioTrack,
    ReenactedVideoTrack,
    RtpClock,
    video_frame,
    yuv_video_frame,
)
from streamer.webrtc.tasks import cancel_others, spawn
from tracker.errors import DvpError

log = logging.getLogger(__name__)

#: Seconds between `stats` messages.
STATS_PERIOD = 1.0
#: Seconds a new session waits for its pipeline's stages before reporting a failure.
SETUP_TIMEOUT = 60.0
#: Frames of history of a session's `server_ms` figures.
_HANDOFF_HISTORY = 3000
#: Data-channel bytes waiting to go out above which a `params` message is skipped.
_CHANNEL_BACKLOG = 256 * 1024

#: `open_pipeline(peer) -> pipeline`: a new (not started) pipeline of the PeerSession `peer`
#: that hands its frames to `peer.on_output` (an engine session) or `peer.echo` (the echo
#: configuration, streamer.webrtc.echo).
PipelineOpener = Callable[["PeerSession"], "EngineSession | EchoPipeline"]


class OfferError(DvpError):
    """An offer that cannot start a session; the message is the client's `error` text."""


class PeerSession:
    """One session's peer connection, engine session and tracks (module doc).

    sid: the session's id (for logs); open_pipeline: makes its pipeline;
    expression_names: the target's 53 names (the `params` messages); ice_servers: the
    STUN/TURN servers as RTCIceServer dicts (`urls`, `username`, `credential`: the server's
    `ice_server`); send(message): an outgoing signalling message (a dict); end():
    ends the session (the owner then calls `close`); negotiation_seconds: the peer
    connection must connect within this many seconds of the answer, or the session ends
    (`streamer.negotiation_seconds`; 0: no deadline).
    """

    def __init__(self, sid: str, open_pipeline: PipelineOpener, expression_names: list[str],
                 ice_servers: list[dict[str, Any]],
                 send: Callable[[dict[str, Any]], Awaitable[None]],
                 end: Callable[[], Awaitable[None]], negotiation_seconds: float = 0.0) -> None:
        self.id = sid
        self.open_pipeline = open_pipeline
        self.expression_names = expression_names
        self.ice_servers = ice_servers
        self.send = send
        self.end = end
        self.negotiation_seconds = negotiation_seconds
        self.connected = False  # the peer connection has reached "connected"
        self.loop = asyncio.get_running_loop()
        self.pc: RTCPeerConnection | None = None
        self.pipeline: EngineSession | EchoPipeline | None = None
        self.video_out: ReenactedVideoTrack | None = None
        self.params_channel: Any = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.closed = False
        self.frames_out = 0
        #: ms from a decoded frame handed to the engine to its output handed to aiortc
        self.handoff_ms: deque[float] = deque(maxlen=_HANDOFF_HISTORY)

    # -- the owner's calls --
    async def open(self, sdp: str, controls: Controls) -> str:
        """Answer the client's offer `sdp` and start the engine session with `controls`;
        returns the answer's SDP. OfferError on an offer that cannot start a session (the
        session stays usable for another offer)."""
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[
            RTCIceServer(**server) for server in self.ice_servers]))
        self.pc = pc
        pipeline = self.open_pipeline(self)
        pipeline.set_controls(controls)
        self.pipeline = pipeline
        self.video_out = ReenactedVideoTrack()
        kinds: set[str] = set()

        @pc.on("track")
        def on_track(track: Any) -> None:
            kinds.add(track.kind)
            if track.kind == "video":
                assert self.video_out is not None
                pc.addTrack(self.video_out)
                self._spawn(self._pump(track))
            elif track.kind == "audio":
                pc.addTrack(DelayedAudioTrack(track, pipeline.latency_estimate))

        @pc.on("datachannel")
        def on_datachannel(channel: Any) -> None:
            if channel.label == "params":
                self.params_channel = channel

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.info("session %s: connection %s", self.id, pc.connectionState)
            self.connected = self.connected or pc.connectionState == "connected"
            if pc.connectionState in ("failed", "closed") and pc is self.pc \
                    and not self.closed:
                self._spawn(self.end())

        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
            if "video" not in kinds:
                raise ValueError("the offer sends no video: add the webcam track")
            answer = await pc.createAnswer()
            await pc.setLocalDescription(answer)
        except Exception as err:  # aiortc raises many kinds on bad SDP
            log.info("session %s: bad offer: %s", self.id, err)
            self.pc, self.pipeline, self.video_out = None, None, None
            pipeline.close()
            await pc.close()
            raise OfferError(f"bad offer SDP: {err}") from err
        pipeline.start()
        if self.negotiation_seconds > 0:
            self._spawn(self._connection_deadline())
        self._spawn(self._watch_setup())
        self._spawn(self._stats_loop())
        return pc.localDescription.sdp

    async def control(self, controls: Controls, neutral: bool) -> None:
        """Take the session's new controls (checked by the caller); `neutral`: calibrate the
        source's neutral from its next frames."""
        if self.pipeline is None:
            return
        if neutral:
            self.pipeline.set_neutral()
        self.pipeline.set_controls(controls)

    def stats(self) -> dict[str, Any]:
        """The `stats` message of the session now (empty before the offer)."""
        if self.pipeline is None:
            return {}
        stats = self.pipeline.stats()
        stats.update(type="stats", sent=self.video_out.sent if self.video_out else 0,
                     server_ms=self.server_ms())
        return stats

    # -- media --
    def _spawn(self, coro: Any) -> None:
        spawn(self.tasks, coro)

    async def _pump(self, track: Any) -> None:
        """Webcam frames into the pipeline (latest wins there)."""
        clock = RtpClock()
        while not self.closed:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if self.pipeline is not None:
                self.pipeline.submit(frame, clock(frame.pts, frame.time_base))
            del frame

    async def _connection_deadline(self) -> None:
        """End the session unless its peer connection has connected within
        `negotiation_seconds` of the answer: a stalled client must not hold a slot."""
        await asyncio.sleep(self.negotiation_seconds)
        if self.closed or self.pc is None or self.connected:
            return
        why = (f"the peer connection did not connect within {self.negotiation_seconds:g} s "
               "of the answer (ICE found no path: a TURN server may be needed, see "
               "--ice-server)")
        log.info("session %s: %s: closing", self.id, why)
        await self.send({"type": "error", "message": f"{why}: closing the session"})
        await self.end()

    async def _watch_setup(self) -> None:
        pipeline = self.pipeline
        assert pipeline is not None
        ready = await self.loop.run_in_executor(None, pipeline.wait_ready, SETUP_TIMEOUT)
        if self.closed:
            return
        if not ready or pipeline.setup_error is not None:
            why = pipeline.setup_error or "timed out"
            await self.send({"type": "error",
                             "message": f"the pipeline could not start: {why}"})
            await self.end()

    async def _stats_loop(self) -> None:
        while not self.closed and self.pipeline is not None:
            await asyncio.sleep(STATS_PERIOD)
            if self.closed or self.pipeline is None:
                return
            await self.send(self.stats())

    def on_output(self, out: OutputFrame) -> None:
        """Called in the engine's output thread with each finished frame."""
        frame = yuv_video_frame(out.yuv, out.timestamp) if out.yuv is not None else \
            video_frame(out.image, out.timestamp)
        message = params_message(out, self.expression_names)
        try:
            self.loop.call_soon_threadsafe(self._deliver, frame, message, out.received)
        except RuntimeError:  # the loop has closed: the server is shutting down
            pass

    def echo(self, frame: Any) -> None:
        """The echo configuration: a received frame straight back (on the loop)."""
        self._deliver(frame, None, time.monotonic())

    def _deliver(self, frame: Any, message: str | None, received: float) -> None:
        if self.closed or self.video_out is None:
            return
        self.video_out.put(frame)
        self.handoff_ms.append((time.monotonic() - received) * 1e3)
        self.frames_out += 1
        channel = self.params_channel
        if message is not None and channel is not None and channel.readyState == "open" \
                and channel.bufferedAmount < _CHANNEL_BACKLOG:
            try:
                channel.send(message)
            except Exception as err:  # noqa: BLE001  (a channel closing under us)
                log.debug("session %s: params send failed: %s", self.id, err)

    def server_ms(self) -> dict[str, Any]:
        """p50 / p95 ms from a decoded frame handed to the engine to its output frame
        handed to aiortc's sender (the last frames), and how many."""
        ms = list(self.handoff_ms)
        return {**p50_p95(ms), "frames": len(ms)}

    async def close(self) -> None:
        """Free everything the session's media holds. Idempotent."""
        if self.closed:
            return
        self.closed = True
        cancel_others(self.tasks)
        if self.video_out is not None:
            self.video_out.stop()
        if self.pc is not None:
            try:
                await self.pc.close()
            except Exception:
                log.debug("session %s: error closing the peer connection", self.id,
                          exc_info=True)
        if self.pipeline is not None:
            await self.loop.run_in_executor(None, self.pipeline.close)
        self.pc, self.pipeline, self.video_out, self.params_channel = None, None, None, None
