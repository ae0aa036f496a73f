"""`dvp serve`'s server: WebRTC sessions over /ws with an aiortc client, and its behaviour on
bad input, busy, tokens, TLS, vanishing clients and many connects."""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import torch
from aiortc.mediastreams import AudioStreamTrack

from streamer.cli.config import load_config
from streamer.video.mark import has_synthetic_mark
from streamer.webrtc.client import ClientError, DvpClient, FrameSourceTrack
from streamer.webrtc.server import ServeError, ServeOptions, ice_server
from tracker.errors import DvpError


def source_frame(i: int) -> np.ndarray:
    """A 96 x 128 frame with a "face" for the stand-in tracker (yaw sways with i)."""
    frame = np.zeros((96, 128, 3), np.uint8)
    frame[..., 0] = 120 + (i % 20) * 3
    frame[..., 1] = 100
    frame[..., 2] = 110
    frame[30:60, 40:90] = 200
    return frame


def wait_for(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


async def ws_session(url: str) -> tuple[aiohttp.ClientSession, Any, dict[str, Any]]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url)
    hello = await ws.receive_json(timeout=10)
    return http, ws, hello


def test_aiortc_client_gets_reenacted_frames_params_and_audio(run_server: Any) -> None:
    server = run_server()

    async def go() -> tuple[list[Any], DvpClient]:
        client = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=15),
                           audio=AudioStreamTrack())
        async with client:
            frames = [await client.next_frame(30) for _ in range(10)]
            deadline = time.monotonic() + 10
            while (not client.params or client.audio_received < 5
                   or not any(m["type"] == "stats" for m in client.messages)) \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
        return frames, client

    frames, client = asyncio.run(go())
    assert client.hello is not None and client.hello["resolution"] == 64
    assert [m["type"] for m in client.messages[:2]] == ["hello", "answer"]
    image = frames[-1][1].to_ndarray(format="rgb24")
    assert image.shape == (64, 64, 3)
    assert image.std() > 5.0, "the reenacted frame is blank"
    assert has_synthetic_mark(image, contrast=30.0), "no synthetic mark on the live frame"
    assert client.params and client.params[-1]["face"] is True
    assert client.params[-1]["mode"] == "full"
    assert client.audio_received >= 5, "the microphone did not come back"
    stats = next(m for m in client.messages if m["type"] == "stats")
    assert stats["processed"] >= 1 and set(stats["stage_ms"]) >= {"render", "generator"}
    assert wait_for(lambda: not server.server.sessions)


def test_sessions_run_at_once_with_their_own_state(run_server: Any) -> None:
    server = run_server()

    async def go() -> tuple[DvpClient, DvpClient]:
        a = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=15), mode="face")
        b = DvpClient(server.ws_url, FrameSourceTrack(lambda i: source_frame(i)[..., ::-1],
                                                      fps=15), mode="dub")
        async with a, b:
            assert len(server.server.sessions) == 2
            await a.control(expression_gain=0.5)
            for client in (a, b):
                for _ in range(5):
                    await client.next_frame(30)
            deadline = time.monotonic() + 10
            while (len(a.params) < 3 or len(b.params) < 3) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return a, b

    a, b = asyncio.run(go())
    assert {p["mode"] for p in a.params} == {"face"}
    assert {p["mode"] for p in b.params} == {"dub"}
    states_a = [m for m in a.messages if m["type"] == "state"]
    assert states_a[-1]["controls"]["expression_gain"] == 0.5
    assert not [m for m in b.messages if m["type"] == "state"]
    # each reads its own source: their yaws differ in sign
    assert a.params[-1]["rotation"][1] > 0 > b.params[-1]["rotation"][1]
    assert wait_for(lambda: not server.server.sessions)


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("dvp-session") or t.name.endswith("-decoder")]


def test_50_connects_and_disconnects_leave_nothing_behind(run_server: Any) -> None:
    server = run_server()
    before = threading.active_count()
    gpu_before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0

    async def cycle(i: int) -> None:
        if i % 2:  # half of them only open and close the WebSocket
            http, ws, hello = await ws_session(server.ws_url)
            assert hello["type"] == "hello"
            await ws.close()
            await http.close()
            return
        client = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=30))
        try:
            await client.start()
            if i % 10 == 0:  # some wait for media to flow before leaving
                await client.next_frame(30)
        finally:
            await client.close()

    async def go() -> None:
        for i in range(50):
            await cycle(i)

    started = time.monotonic()
    asyncio.run(go())
    assert wait_for(lambda: not server.server.sessions, 20), server.server.sessions
    assert wait_for(lambda: not session_threads(), 20), session_threads()
    # the server loop's thread pool may have grown (at most min(32, cpus + 4) threads)
    assert threading.active_count() <= before + 6
    if torch.cuda.is_available():
        assert torch.cuda.memory_allocated() <= gpu_before
    assert time.monotonic() - started < 120


def test_malformed_and_oversized_messages_get_errors(run_server: Any) -> None:
    server = run_server()
    limit = load_config(None, []).streamer.max_message_bytes

    async def go() -> list[str]:
        http, ws, hello = await ws_session(server.ws_url)
        replies = []
        for text in ["{not json", "[1, 2]", '{"type": 5}', '{"type": "bogus"}',
                     '{"type": "offer"}', '{"type": "offer", "sdp": "v=0 garbage"}',
                     '{"type": "offer", "sdp": "v=0", "mode": "sideways"}',
                     '{"type": "control", "mode": "face"}',
                     json.dumps({"type": "ping", "pad": "x" * (limit + 10)})]:
            await ws.send_str(text)
            replies.append(await ws.receive_json(timeout=10))
        await ws.send_bytes(b"\x00\x01")
        replies.append(await ws.receive_json(timeout=10))
        await ws.send_str('{"type": "ping", "t": 7}')
        pong = await ws.receive_json(timeout=10)
        assert pong == {"type": "pong", "t": 7, "server": pong["server"]}
        # far past the limit: the connection is closed (1009), the server lives on
        try:
            await ws.send_str("x" * (limit * 20))
        except (ConnectionError, aiohttp.ClientOSError):
            pass  # the server closed it while the frame was still being written (seen in CI)
        else:
            closing = await ws.receive(timeout=10)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                    aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.TEXT)
        await http.close()
        http, ws, hello = await ws_session(server.ws_url)
        assert hello["type"] == "hello"
        await http.close()
        return [r["message"] for r in replies if r["type"] == "error"]

    errors = asyncio.run(go())
    assert len(errors) == 10
    expected = ["malformed JSON", "a message must be a JSON object with a string 'type'",
                "a message must be a JSON object with a string 'type'",
                "unknown message type 'bogus'", "offer needs 'sdp'", "bad offer SDP",
                "offer 'mode' must be one of full, face, gaze, dub, edit, got 'sideways'",
                "control before offer", f"bytes exceeds the limit of {limit} bytes",
                "binary messages are not part of the protocol"]
    for message, start in zip(errors, expected, strict=True):
        assert start in message, (message, start)
    assert wait_for(lambda: not server.server.sessions)


def test_control_messages_after_an_offer(run_server: Any) -> None:
    server = run_server()

    async def go() -> list[dict[str, Any]]:
        client = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=15))
        async with client:
            await client.next_frame(30)
            for message in [{"mode": "face"}, {"head_rotation_deg": [0, 10, 0]},
                            {"neutral": True}, {"expression_gains": {"jawOpen": 2.0}},
                            {"wobble": 1}, {"expression_gain": 9},
                            {"expression_gains": {"notAShape": 1.0}}, {"neutral": False},
                            {"mode": "edit", "reset": True}]:
                await client.control(**message)
            deadline = time.monotonic() + 10
            while sum(m["type"] in ("state", "error") for m in client.messages) < 9 \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            while client.params[-1]["mode"] != "edit" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        return [m for m in client.messages if m["type"] in ("state", "error")]

    replies = asyncio.run(go())
    kinds = [r["type"] for r in replies]
    assert kinds == ["state"] * 4 + ["error"] * 4 + ["state"]
    assert replies[1]["controls"]["head_rotation_deg"] == [0, 10, 0]
    assert replies[3]["controls"]["expression_gains"] == {"jawOpen": 2.0}
    assert replies[4]["message"] == "unknown control field 'wobble'"
    assert replies[5]["message"] == "control 'expression_gain' must lie in [0, 3], got 9"
    assert "unknown expression 'notAShape'" in replies[6]["message"]
    assert replies[8]["controls"] == {"mode": "edit", "head_rotation_deg": [0, 0, 0],
                                      "head_translation_cm": [0, 0, 0], "expression_gain": 1,
                                      "expression_gains": {}, "gaze_offset_deg": [0, 0]}


def test_busy_past_max_sessions(run_server: Any) -> None:
    server = run_server(max_sessions=1)

    async def go() -> None:
        http, ws, hello = await ws_session(server.ws_url)
        assert hello["type"] == "hello"
        with pytest.raises(ClientError, match="server busy"):
            await DvpClient(server.ws_url, None).connect()
        http2 = aiohttp.ClientSession()
        ws2 = await http2.ws_connect(server.ws_url)
        assert await ws2.receive_json(timeout=10) == {"type": "busy"}
        closing = await ws2.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1013
        await http2.close()
        await ws.close()
        await http.close()
        for _ in range(50):  # the slot frees once the first session has closed
            if not server.server.sessions:
                break
            await asyncio.sleep(0.05)
        http, ws, hello = await ws_session(server.ws_url)
        assert hello["type"] == "hello"
        await http.close()

    asyncio.run(go())


def test_token_is_checked(run_server: Any) -> None:
    server = run_server(token="s3cret")
    assert server.url.endswith("?token=s3cret")

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            for url in (server.ws_url, server.ws_url + "?token=wrong"):
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await http.ws_connect(url)
                assert err.value.status == 401
            async with http.get(server.url.split("?")[0]) as page:  # the page itself is open
                assert page.status == 200
            ws = await http.ws_connect(server.ws_url + "?token=s3cret")
            assert (await ws.receive_json(timeout=10))["type"] == "hello"
            await ws.close()

    asyncio.run(go())


def test_options_off_loopback_need_a_token() -> None:
    with pytest.raises(ServeError, match="--token is required to serve on 0.0.0.0"):
        ServeOptions(host="0.0.0.0").check()
    ServeOptions(host="0.0.0.0", token="t").check()
    ServeOptions(host="::1").check()
    with pytest.raises(ServeError, match="--cert and --key go together"):
        ServeOptions(cert=Path("c.pem")).check()
    with pytest.raises(ServeError, match="--max-sessions must be at least 1"):
        ServeOptions(max_sessions=0).check()
    assert ice_server("turn:al:pw@turn.example.org:3478") == {
        "urls": "turn:turn.example.org:3478", "username": "al", "credential": "pw"}
    with pytest.raises(ServeError, match="--ice-server expects"):
        ice_server("http://example.org")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_tls(run_server: Any, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server = run_server(cert=cert, key=key)
    assert server.url.startswith("https://127.0.0.1:")
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            async with http.get(server.url + "health", ssl=context) as reply:
                assert await reply.json() == {"status": "ok", "sessions": 0, "max_sessions": 4}
            ws = await http.ws_connect(server.ws_url, ssl=context)
            assert (await ws.receive_json(timeout=10))["type"] == "hello"
            await ws.close()

    asyncio.run(go())


def test_a_vanishing_client_is_freed(run_server: Any) -> None:
    server = run_server()

    async def go() -> DvpClient:
        client = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=15))
        await client.start()
        await client.next_frame(30)
        assert len(server.server.sessions) == 1
        # the network goes away under the WebSocket: no close frame, no goodbye
        assert client.ws is not None
        transport = client.ws._response.connection.transport  # type: ignore[union-attr]
        transport.abort()
        for _ in range(200):
            if not server.server.sessions:
                break
            await asyncio.sleep(0.05)
        await client.close()
        return client

    asyncio.run(go())
    assert not server.server.sessions
    assert wait_for(lambda: not session_threads(), 10), session_threads()


def test_a_pipeline_that_cannot_start_is_reported(run_server: Any) -> None:
    def broken(target: Any, config: Any) -> Any:
        raise DvpError("the live face fit is not available: test")

    server = run_server(stage_factory=broken)

    async def go() -> list[dict[str, Any]]:
        client = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=15))
        await client.start()
        for _ in range(200):
            if any(m["type"] == "error" for m in client.messages):
                break
            await asyncio.sleep(0.05)
        await client.close()
        return client.messages

    messages = asyncio.run(go())
    errors = [m["message"] for m in messages if m["type"] == "error"]
    assert errors == ["the pipeline could not start: the live face fit is not available: test"]
    assert wait_for(lambda: not server.server.sessions)


def test_serve_refuses_to_start_with_a_bad_target(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.main import main

    assert main(["serve", str(tmp_path / "nothing")]) == 1
    assert "is not a target directory: target.yaml is missing" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--host", "0.0.0.0"]) == 1
    assert "--token is required to serve on 0.0.0.0" in capsys.readouterr().err
