"""What a hostile page or client can do to `dvp serve` (issue 18): each case is answered as
docs/protocol.md says, and a good client connected to the same server meanwhile keeps
receiving frames, with no gap over one second.

Cases: pages of other origins and foreign Host names (DNS rebinding); the page's security
headers; idle WebSockets and peers that never connect (the negotiation timeout); slots freed
at once; huge and non-finite numbers in JSON; lenient SDP; ICE candidates on loopback only;
the token kept out of logs and /health; TURN credentials only to authorised sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import VideoStreamTrack

from streamer.cli.config import load_config
from streamer.cli.main import main
from streamer.webrtc.client import DvpClient, FrameSourceTrack
from tests.streamer.conftest import RunningServer, start_server, stop_server
from tests.streamer.test_server import source_frame

TIMEOUT = 3.0  # streamer.negotiation_seconds of these servers
ALLOWED = "https://allowed.example"


def config_with(**streamer: Any) -> Any:
    return load_config(None, [f"streamer.{k}={v}" for k, v in streamer.items()])


class GoodClient:
    """A well-behaved client in a thread of its own, recording when each frame arrives."""

    def __init__(self, ws_url: str) -> None:
        self.ws_url = ws_url
        self.times: list[float] = []
        self.messages: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()),
                                        name="good-client", daemon=True)
        self._thread.start()
        assert self._ready.wait(60), "the good client did not connect"
        if self.error is not None:
            raise self.error

    async def _run(self) -> None:
        client = DvpClient(self.ws_url, FrameSourceTrack(source_frame, fps=15))
        try:
            await client.start()
            self.messages = client.messages
            self.times.append((await client.next_frame(30))[0])
        except BaseException as err:  # noqa: BLE001  (reported to the test)
            self.error = err
            self._ready.set()
            await client.close()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                try:
                    received, _ = await client.next_frame(0.25)
                except TimeoutError:
                    continue
                self.times.append(received)
        except BaseException as err:  # noqa: BLE001
            self.error = err
        finally:
            await client.close()

    def check(self) -> None:
        """The good client is still connected and no gap between its frames (or since its
        last one) exceeds one second."""
        assert self.error is None, self.error
        times = [*self.times, time.monotonic()]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) <= 1.0, f"a gap of {max(gaps):.2f} s in the good client's frames"

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.fixture(scope="module")
def server(loaded_target: Any) -> Iterator[RunningServer]:
    handle = start_server(loaded_target, config_with(negotiation_seconds=TIMEOUT),
                          allow_origins=[ALLOWED], max_sessions=8)
    yield handle
    stop_server(handle)


@pytest.fixture(scope="module")
def good(server: RunningServer) -> Iterator[GoodClient]:
    client = GoodClient(server.ws_url)
    yield client
    client.stop()


@pytest.fixture()
def other_server(loaded_target: Any) -> Iterator[Any]:
    """`other_server(**options)`: a further server (not the good client's)."""
    started: list[RunningServer] = []

    def start(config: Any = None, **options: Any) -> RunningServer:
        handle = start_server(loaded_target, config or config_with(
            negotiation_seconds=TIMEOUT), **options)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        stop_server(handle)


def port_of(server: RunningServer) -> int:
    return int(server.server.port)


async def get_json(http: aiohttp.ClientSession, url: str, **headers: str) -> tuple[int, Any]:
    async with http.get(url, headers=headers) as reply:
        return reply.status, await reply.json()


async def open_ws(url: str, **kwargs: Any) -> tuple[aiohttp.ClientSession, Any, dict[str, Any]]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(url, **kwargs)
    return http, ws, await ws.receive_json(timeout=10)


# ---- Origin, Host, headers ---------------------------------------------------------------------
def test_pages_of_other_origins_cannot_open_the_websocket(server: RunningServer,
                                                          good: GoodClient) -> None:
    port = port_of(server)
    http_url = server.ws_url.replace("ws://", "http://")

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            for origin in ("https://evil.example", "null", f"http://127.0.0.1:{port + 1}",
                           f"http://localhost:{port}", f"https://127.0.0.1:{port}"):
                status, body = await get_json(http, http_url, Origin=origin)
                assert status == 403, origin
                assert body == {"type": "error", "message": (
                    f"pages of origin {origin!r} may not connect: only this server's own page "
                    "may (start dvp serve with --allow-origin ORIGIN to let another in)")}
                with pytest.raises(aiohttp.WSServerHandshakeError) as err:
                    await http.ws_connect(server.ws_url, origin=origin)
                assert err.value.status == 403
        for origin in (f"http://127.0.0.1:{port}", ALLOWED, None):  # own, allowed, no browser
            kwargs = {"origin": origin} if origin else {}
            http, _ws, hello = await open_ws(server.ws_url, **kwargs)
            assert hello["type"] == "hello", origin
            await http.close()

    asyncio.run(go())
    good.check()


def test_a_foreign_host_name_is_refused(server: RunningServer, good: GoodClient) -> None:
    port = port_of(server)
    base = server.url

    async def go() -> None:
        async with aiohttp.ClientSession() as http:
            for path in ("", "app.js", "ws", "health"):
                status, body = await get_json(http, base + path, Host=f"evil.example:{port}")
                assert status == 403, path
                assert body["message"] == (
                    f"Host 'evil.example:{port}' is not a name of this server: open it by its "
                    "address, or start dvp serve with --allow-origin for that name")
            for host in (f"localhost:{port}", f"127.0.0.1:{port}", "allowed.example"):
                async with http.get(base, headers={"Host": host}) as reply:
                    assert reply.status == 200, host

    asyncio.run(go())
    good.check()


def test_the_page_may_not_be_framed_and_loads_only_its_own_code(server: RunningServer,
                                                                good: GoodClient) -> None:
    async def go() -> dict[str, dict[str, str]]:
        async with aiohttp.ClientSession() as http:
            out = {}
            for path in ("", "app.js", "health"):
                async with http.get(server.url + path) as reply:
                    out[path] = dict(reply.headers)
            return out

    headers = asyncio.run(go())
    for path, h in headers.items():
        policy = h["Content-Security-Policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy, path
        assert f"connect-src 'self' ws://127.0.0.1:{port_of(server)}" in policy
        assert h["X-Frame-Options"] == "DENY" and h["Referrer-Policy"] == "no-referrer"
        assert h["X-Content-Type-Options"] == "nosniff"
    good.check()


# ---- timeouts and slots -----------------------------------------------------------------------
def test_an_idle_websocket_is_closed_and_its_slot_freed(server: RunningServer,
                                                        good: GoodClient) -> None:
    async def go() -> tuple[dict[str, Any], float, Any]:
        http, ws, _hello = await open_ws(server.ws_url)
        started = time.monotonic()
        error = await ws.receive_json(timeout=TIMEOUT + 10)
        closing = await ws.receive(timeout=10)
        await http.close()
        return error, time.monotonic() - started, closing

    error, waited, closing = asyncio.run(go())
    assert error == {"type": "error", "message": f"no offer within {TIMEOUT:g} s of connecting: "
                                                 "closing the session"}
    assert TIMEOUT - 0.5 <= waited <= TIMEOUT + 5
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert len(server.server.sessions) == 1  # the good client's
    good.check()


def test_a_peer_that_never_connects_is_closed(server: RunningServer, good: GoodClient) -> None:
    async def go() -> list[dict[str, Any]]:
        http, ws, _hello = await open_ws(server.ws_url)
        pc = RTCPeerConnection()
        pc.addTrack(VideoStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        await ws.send_str(json.dumps({"type": "offer", "sdp": pc.localDescription.sdp}))
        replies = [await ws.receive_json(timeout=30)]  # the answer, never applied: no ICE
        deadline = time.monotonic() + TIMEOUT + 10
        while time.monotonic() < deadline:  # `stats` come meanwhile
            message = await ws.receive_json(timeout=TIMEOUT + 10)
            if message["type"] != "stats":
                replies.append(message)
                break
        else:
            replies.append({"type": "timeout"})
        await pc.close()
        await http.close()
        return replies

    answer, error = asyncio.run(go())
    assert answer["type"] == "answer"
    assert error == {"type": "error", "message": (
        f"the peer connection did not connect within {TIMEOUT:g} s of the answer (ICE found "
        "no path: a TURN server may be needed, see --ice-server): closing the session")}
    assert wait_until(lambda: len(server.server.sessions) == 1)
    good.check()


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(condition())


def test_one_idle_socket_does_not_lock_a_one_session_server(other_server: Any,
                                                            good: GoodClient) -> None:
    one = other_server(config=config_with(negotiation_seconds=1.0), max_sessions=1)

    async def go() -> None:
        http, ws, hello = await open_ws(one.ws_url)
        assert hello["type"] == "hello"
        busy_http, _busy_ws, busy = await open_ws(one.ws_url)
        assert busy == {"type": "busy"}
        await busy_http.close()
        assert (await ws.receive_json(timeout=10))["message"].startswith("no offer within 1 s")
        await http.close()
        http, ws, hello = await open_ws(one.ws_url)
        assert hello["type"] == "hello"
        await http.close()

    asyncio.run(go())
    good.check()


def test_a_closed_session_frees_its_slot_at_once(other_server: Any, good: GoodClient) -> None:
    one = other_server(max_sessions=1)

    async def go() -> list[str]:
        firsts = []
        for _ in range(10):  # bare WebSockets, closed and opened again at once
            http, ws, hello = await open_ws(one.ws_url)
            firsts.append(hello["type"])
            await ws.close()
            await http.close()
        for _ in range(3):  # whole sessions (peer connection and pipeline) likewise
            client = DvpClient(one.ws_url, FrameSourceTrack(source_frame, fps=15))
            await client.start()
            await client.next_frame(30)
            await client.close()
            firsts.append(client.messages[0]["type"])
        previous = None
        for _ in range(3):  # the WebSocket drops first, its media still flowing: the next
            client = DvpClient(one.ws_url, FrameSourceTrack(source_frame, fps=15))
            await client.start()  # session starts once the engine slot is back
            firsts.append(client.messages[0]["type"])
            await client.next_frame(30)
            if previous is not None:
                await previous.close()
            assert client.ws is not None
            await client.ws.close()
            previous = client
        assert previous is not None
        await previous.close()
        return firsts

    assert asyncio.run(go()) == ["hello"] * 16
    good.check()


# ---- malformed input ---------------------------------------------------------------------------
def test_huge_and_non_finite_numbers_get_an_error_and_the_session_stays(
        server: RunningServer, good: GoodClient) -> None:
    async def go() -> tuple[list[str], list[dict[str, Any]]]:
        http, ws, _hello = await open_ws(server.ws_url)
        errors = []
        for text in ('{"type": "ping", "t": ' + "9" * 5000 + "}",
                     '{"type": "ping", "t": 1e400}', '{"type": "ping", "t": NaN}',
                     '{"type": "ping", "t": -Infinity}'):
            await ws.send_str(text)
            errors.append((await ws.receive_json(timeout=10))["message"])
        await ws.send_str('{"type": "ping", "t": 7}')
        assert (await ws.receive_json(timeout=10))["t"] == 7
        await http.close()
        client = DvpClient(server.ws_url, FrameSourceTrack(source_frame, fps=15))
        async with client:
            await client.next_frame(30)
            assert client.ws is not None
            for text in ('{"type": "control", "expression_gain": 1' + "0" * 400 + "}",
                         '{"type": "control", "head_rotation_deg": [1e400, 0, 0]}'):
                await client.ws.send_str(text)
            await client.control(expression_gain=0.5)
            deadline = time.monotonic() + 10
            while sum(m["type"] in ("error", "state") for m in client.messages) < 3 \
                    and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await client.next_frame(30)  # still served
        return errors, [m for m in client.messages if m["type"] in ("error", "state")]

    errors, replies = asyncio.run(go())
    assert errors == [
        "malformed JSON: an integer of 5000 digits is out of range (at most 18 digits)",
        "malformed JSON: the number 1e400 is out of range",
        "malformed JSON: NaN is not a JSON number",
        "malformed JSON: -Infinity is not a JSON number"]
    assert [r["type"] for r in replies] == ["error", "error", "state"]
    assert replies[0]["message"] == ("malformed JSON: an integer of 401 digits is out of range "
                                     "(at most 18 digits)")
    assert replies[1]["message"] == "malformed JSON: the number 1e400 is out of range"
    assert replies[2]["controls"]["expression_gain"] == 0.5
    good.check()


def test_lenient_sdp_is_refused(server: RunningServer, good: GoodClient) -> None:
    async def go() -> list[dict[str, Any]]:
        pc = RTCPeerConnection()
        pc.addTrack(VideoStreamTrack())
        await pc.setLocalDescription(await pc.createOffer())
        sdp = pc.localDescription.sdp
        await pc.close()
        bad = re.sub(r"^m=video \d+", "m=video notaport", sdp, flags=re.MULTILINE)
        http, ws, _hello = await open_ws(server.ws_url)
        replies = []
        for text in (bad, bad.replace("v=0", "v=1", 1), "v=0\r\nnot a line\r\n",
                     re.sub(r"^m=video \d+", "m=video 70000", sdp, flags=re.MULTILINE)):
            await ws.send_str(json.dumps({"type": "offer", "sdp": text}))
            replies.append(await ws.receive_json(timeout=10))
        await ws.send_str('{"type": "ping", "t": 1}')
        replies.append(await ws.receive_json(timeout=10))
        await http.close()
        return replies

    replies = asyncio.run(go())
    messages = [r.get("message") for r in replies[:4]]
    assert re.fullmatch(r"bad offer SDP: line \d+ 'm=video notaport UDP/TLS/RTP/SAVPF [0-9 ]+' "
                        r"is not 'm=<media> <port> <proto> <format> \.\.\.'", messages[0])
    assert messages[1] == "bad offer SDP: the SDP must start with the line 'v=0'"
    assert messages[2] == "bad offer SDP: line 2 'not a line' is not an SDP line (x=value)"
    assert re.fullmatch(r"bad offer SDP: line \d+ 'm=video 70000 .*' has a port above 65535",
                        messages[3])
    assert replies[4]["type"] == "pong"  # the session stays usable
    good.check()


# ---- what the server discloses ------------------------------------------------------------------
def test_the_answer_discloses_loopback_addresses_only(server: RunningServer,
                                                      good: GoodClient) -> None:
    answer = next(m for m in good.messages if m["type"] == "answer")["sdp"]
    candidates = [line.split()[4] for line in answer.splitlines()
                  if line.startswith("a=candidate:")]
    connections = [line.split()[2] for line in answer.splitlines() if line.startswith("c=")]
    assert candidates and set(candidates) <= {"127.0.0.1", "::1"}, candidates
    assert set(connections) <= {"127.0.0.1", "::1", "0.0.0.0"}, connections
    good.check()


def test_the_token_stays_out_of_logs_and_health(other_server: Any, good: GoodClient,
                                                caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-t0ken"
    guarded = other_server(token=secret)
    caplog.set_level(logging.DEBUG)

    async def go() -> list[Any]:
        async with aiohttp.ClientSession() as http:
            health = [await get_json(http, guarded.url.split("?")[0] + "health" + q)
                      for q in ("", "?token=wrong", f"?token={secret}")]
            async with http.get(guarded.url) as page:  # the page's address holds the token
                assert page.status == 200
            ws = await http.ws_connect(f"{guarded.ws_url}?token={secret}")
            assert (await ws.receive_json(timeout=10))["type"] == "hello"
            await ws.close()
        return health

    health = asyncio.run(go())
    assert health == [(200, {"status": "ok"}), (200, {"status": "ok"}),
                      (200, {"status": "ok", "sessions": 0, "max_sessions": 4})]
    assert wait_until(lambda: "GET /ws?token=REDACTED" in caplog.text), caplog.text
    assert secret not in caplog.text
    good.check()


def test_turn_credentials_go_to_authorised_sessions_only(other_server: Any, tmp_path: Path,
                                                         good: GoodClient) -> None:
    from streamer.webrtc.security import ice_server_urls

    file = tmp_path / "ice.txt"
    file.write_text("# TURN for remote users\nturn:alice:pa55w0rd@turn.example.org:3478\n")
    urls = ice_server_urls([], file, {"DVP_ICE_SERVERS": "stun:stun.example.org:3478"})
    guarded = other_server(token="t0k", ice_servers=urls)

    async def go() -> tuple[list[str], dict[str, Any]]:
        bodies = []
        async with aiohttp.ClientSession() as http:
            for url, headers in ((guarded.ws_url, {}), (guarded.ws_url + "?token=bad", {}),
                                 (guarded.ws_url + "?token=t0k", {"Origin": "https://evil.example"})):
                async with http.get(url, headers=headers) as reply:
                    assert reply.status in (401, 403)
                    bodies.append(await reply.text())
        http, _ws, hello = await open_ws(guarded.ws_url + "?token=t0k")
        await http.close()
        return bodies, hello

    bodies, hello = asyncio.run(go())
    assert not [b for b in bodies if "pa55w0rd" in b or "alice" in b]
    assert hello["ice_servers"] == [
        {"urls": "turn:turn.example.org:3478", "username": "alice", "credential": "pa55w0rd"},
        {"urls": "stun:stun.example.org:3478"}]
    good.check()


def test_serve_refuses_zero_sessions_and_bad_origins(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for args, message in (
            (["--max-sessions", "0"], "--max-sessions must be at least 1, got 0"),
            (["--allow-origin", "https://x.example/page"],
             ("--allow-origin: 'https://x.example/page' is not an origin: use "
             "scheme://host[:port], e.g. https://app.example.org:8443")),
            (["--ice-address", "eth0"],
             "--ice-address expects an IP address of this machine, got 'eth0'"),
            (["--ice-server-file", str(tmp_path / "none.txt")],
             (f"--ice-server-file: cannot read {tmp_path / 'none.txt'}: No such file or "
             "directory"))):
        assert main(["serve", str(tmp_path / "no-target"), *args]) == 1
        assert capsys.readouterr().err == f"dvp: error: {message}\n"
