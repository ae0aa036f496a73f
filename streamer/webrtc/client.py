"""A Python client of `dvp serve` (aiortc): send frames, receive the reenacted ones.

It speaks the signalling protocol of docs/protocol.md and is what the tests and the latency
benchmark use; it is also a reference for writing other clients::

    source = FrameSourceTrack(lambda i: frame_number_i, fps=30)
    async with DvpClient("ws://127.0.0.1:8080/ws", source) as client:
        frame = await client.next_frame()       # (received_at, av.VideoFrame)
        await client.control(mode="face")
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any, Self

import aiohttp
import av
import numpy as np
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from streamer.webrtc.media import VIDEO_CLOCK, VIDEO_TIME_BASE
from tracker.errors import DvpError


class ClientError(DvpError):
    """The server refused the session (busy, bad token, error reply) or went away."""


class FrameSourceTrack(MediaStreamTrack):
    """A video track of frames `make(i) -> (H, W, 3) uint8 RGB`, paced at `fps` in real
    time. `sent[i]` is the `time.monotonic()` at which frame i left for the encoder."""

    kind = "video"

    def __init__(self, make: Callable[[int], np.ndarray], fps: float = 30.0) -> None:
        super().__init__()
        self.make = make
        self.fps = fps
        self.sent: dict[int, float] = {}
        self._index = 0
        self._start: float | None = None

    async def recv(self) -> av.VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._index / self.fps
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        rgb = self.make(self._index)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        frame.pts = round(self._index / self.fps * VIDEO_CLOCK)
        frame.time_base = VIDEO_TIME_BASE
        self.sent[self._index] = time.monotonic()
        self._index += 1
        return frame


class DvpClient:
    """One session with a `dvp serve` server. Use `async with` or `start()` / `close()`.

    Received video frames queue in `frames` as (monotonic receive time, av.VideoFrame),
    the oldest dropped beyond `max_frames`; `received` / `audio_received` count video and
    audio frames; `params` keeps the data-channel messages (parsed), `messages` every
    signalling message; `placement_s`: seconds from the offer sent to the answer received;
    `error_at`: `time.monotonic()` when the first `error` message arrived.
    """

    def __init__(self, ws_url: str, source: MediaStreamTrack | None,
                 audio: MediaStreamTrack | None = None, mode: str = "full",
                 token: str | None = None, max_frames: int = 1000) -> None:
        self.ws_url = ws_url + (f"?token={token}" if token else "")
        self.source = source
        self.audio = audio
        self.mode = mode
        self.frames: asyncio.Queue[tuple[float, av.VideoFrame]] = asyncio.Queue(max_frames)
        self.params: list[dict[str, Any]] = []
        self.messages: list[dict[str, Any]] = []
        self.hello: dict[str, Any] | None = None
        self.pc: RTCPeerConnection | None = None
        self._http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._answer: asyncio.Future[dict[str, Any]] | None = None
        self.received = 0
        self.audio_received = 0
        self.placement_s: float | None = None
        self.error_at: float | None = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> dict[str, Any]:
        """Open the WebSocket and wait for `hello` (ClientError on busy or refusal)."""
        self._http = aiohttp.ClientSession()
        try:
            self.ws = await self._http.ws_connect(self.ws_url)
        except aiohttp.WSServerHandshakeError as err:
            raise ClientError(f"server refused the WebSocket: HTTP {err.status}") from err
        first = await self.ws.receive_json(timeout=30)
        self.messages.append(first)
        if first.get("type") == "busy":
            raise ClientError("server busy")
        if first.get("type") != "hello":
            raise ClientError(f"expected hello, got {first}")
        self.hello = first
        self._tasks.append(asyncio.ensure_future(self._read()))
        return first

    async def start(self) -> None:
        """Connect, offer the tracks, wait for the answer."""
        await self.connect()
        pc = RTCPeerConnection()
        self.pc = pc
        if self.source is not None:
            pc.addTrack(self.source)
        if self.audio is not None:
            pc.addTrack(self.audio)
        channel = pc.createDataChannel("params", ordered=False, maxRetransmits=0)

        @channel.on("message")
        def on_message(message: str) -> None:
            self.params.append(json.loads(message))

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            receive = self._receive if track.kind == "video" else self._receive_audio
            self._tasks.append(asyncio.ensure_future(receive(track)))

        await pc.setLocalDescription(await pc.createOffer())
        self._answer = asyncio.get_running_loop().create_future()
        offered = time.monotonic()
        await self.send({"type": "offer", "sdp": pc.localDescription.sdp, "mode": self.mode})
        answer = await asyncio.wait_for(self._answer, 30)
        self.placement_s = time.monotonic() - offered
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))

    async def send(self, message: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send_str(json.dumps(message))

    async def control(self, **fields: Any) -> None:
        await self.send({"type": "control", **fields})

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            message = json.loads(msg.data)
            self.messages.append(message)
            if message.get("type") == "error" and self.error_at is None:
                self.error_at = time.monotonic()
            if self._answer is not None and not self._answer.done():
                if message.get("type") == "answer":
                    self._answer.set_result(message)
                elif message.get("type") == "error":
                    self._answer.set_exception(ClientError(message.get("message", "")))

    async def _receive(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.received += 1
            if self.frames.full():
                self.frames.get_nowait()
            self.frames.put_nowait((time.monotonic(), frame))

    async def _receive_audio(self, track: MediaStreamTrack) -> None:
        while True:
            try:
                await track.recv()
            except MediaStreamError:
                return
            self.audio_received += 1

    async def next_frame(self, timeout: float = 30.0) -> tuple[float, av.VideoFrame]:
        """The next received frame (receive time, frame)."""
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.source is not None:
            self.source.stop()
        if self.pc is not None:
            await self.pc.close()
        if self.ws is not None:
            await self.ws.close()
        if self._http is not None:
            await self._http.close()
