"""`dvp serve`: the live server. An aiohttp app with the page and a signalling WebSocket;
an aiortc peer connection and a live-engine session per browser (a session).

Signalling (docs/protocol.md has the whole of it): JSON text messages on `/ws`
(`/ws?token=T` when the server has a token). The client sends `offer` (SDP, with its webcam
video, optionally its microphone, and a data channel labelled `params`); the server answers
`answer`; `control` messages change the mode, set the neutral and move the editing sliders;
bad messages get `error` and the connection stays; a full server says `busy` and closes.
The server also sends `hello` on connect and `stats` once a second.

Two halves: `SignalServer` is the front door (page, `/ws`, token, TLS, the session cap, the
validation of every message: `Session`); each session's media (`SessionMedia`) is where its
peer connection lives. `DvpServer` keeps the media in this process
(streamer.webrtc.peer.PeerSession on one live engine, streamer.live.engine); under
`dvp serve --ray` the front (streamer.cluster.front) relays it to a cluster worker.

Threads: the asyncio loop does signalling and hands frames between aiortc and the live
engine (its sessions' threads and its shared device and output threads do the model work,
latest frame wins at every hand-over). Closing a session (the WebSocket closes, the peer
connection fails, or the server stops) stops its engine session and frees its peer
connection; nothing of a session outlives it.

Who may connect (docs/protocol.md, "Who can reach what"; the checks are in
`streamer.webrtc.security`): every request's Host must name this server; `/ws` takes browser
pages of its own origin and of `--allow-origin` only; the token, when set, is checked before
a slot is given; a session must send its offer, and its peer connection must connect, within
`streamer.negotiation_seconds` each, or it is closed and its slot freed.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import WSCloseCode, WSMsgType, web

from streamer.cli.config import Config
from streamer.live.controls import MODES, ControlError, Controls
from streamer.live.engine import LiveEngine
from streamer.live.pipeline import SessionStages
from streamer.live.session import EngineSession
from streamer.webrtc.echo import EchoPipeline
from streamer.webrtc.peer import OfferError, PeerSession
from streamer.webrtc.security import (
    HostPolicy,
    RedactedAccessLogger,
    check_offer_sdp,
    ice_addresses_for,
    load_message,
    normalise_origin,
    origin_allowed,
    restrict_ice_addresses,
    security_headers,
)
from streamer.webrtc.tasks import cancel_others, spawn
from tracker.errors import DvpError

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
#: Messages larger than the configured limit but below this many times it get an error reply;
#: larger ones make aiohttp close the connection (code 1009) before they are read whole.
HARD_LIMIT_FACTOR = 16
#: Seconds an offer waits for closing sessions to give back their engine slots.
SETTLE_TIMEOUT = 5.0


class ServeError(DvpError):
    """A server option that cannot work (token, TLS, address)."""


@dataclass
class ServeOptions:
    """How `dvp serve` listens (see the CLI's help)."""

    host: str = "127.0.0.1"
    port: int = 8080
    cert: Path | None = None
    key: Path | None = None
    token: str | None = None
    max_sessions: int = 4
    ice_servers: list[str] = field(default_factory=list)
    vmc: tuple[str, int] | None = None
    #: Origins (scheme://host[:port]) besides the server's own whose pages may open /ws.
    allow_origins: list[str] = field(default_factory=list)
    #: Local addresses ICE gathers host candidates on (default: loopback when listening on
    #: loopback, else every interface).
    ice_addresses: list[str] = field(default_factory=list)

    def check(self) -> None:
        """Raise ServeError for options that cannot be used together."""
        if (self.cert is None) != (self.key is None):
            raise ServeError("--cert and --key go together: give both for TLS, or neither")
        for path in (self.cert, self.key):
            if path is not None and not Path(path).is_file():
                raise ServeError(f"TLS file not found: {path}")
        if not is_loopback(self.host) and not self.token:
            raise ServeError(f"--token is required to serve on {self.host}, which is not a "
                             "loopback address (anyone who can reach it could drive the "
                             "target); e.g. --token " + secrets.token_urlsafe(12))
        if not 0 <= self.port <= 65535:
            raise ServeError(f"--port must lie in 0..65535 (0: any free port), got {self.port}")
        if self.max_sessions < 1:
            raise ServeError(f"--max-sessions must be at least 1, got {self.max_sessions}")
        if self.token is not None and not self.token:
            raise ServeError("--token must not be empty")
        for url in self.ice_servers:
            ice_server(url)
        try:
            self.allow_origins = [normalise_origin(o) for o in self.allow_origins]
        except ValueError as err:
            raise ServeError(f"--allow-origin: {err}") from None
        for address in self.ice_addresses:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ServeError(f"--ice-address expects an IP address of this machine, got "
                                 f"{address!r}") from None

    @property
    def scheme(self) -> str:
        return "https" if self.cert else "http"


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ice_server(url: str) -> dict[str, Any]:
    """A STUN/TURN URL as an RTCIceServer dict. Credentials go before an '@':
    `turn:USER:PASSWORD@host:3478` (also turns:...; stun needs none)."""
    scheme, sep, rest = url.partition(":")
    if not sep or scheme not in ("stun", "stuns", "turn", "turns") or not rest:
        raise ServeError(f"--ice-server expects stun:HOST[:PORT] or "
                         f"turn:USER:PASSWORD@HOST[:PORT], got {url!r}")
    out: dict[str, Any] = {"urls": url}
    if "@" in rest:
        creds, host = rest.rsplit("@", 1)
        user, sep, password = creds.partition(":")
        if not sep:
            raise ServeError(f"--ice-server {url!r}: credentials must be USER:PASSWORD")
        out = {"urls": f"{scheme}:{host}", "username": user, "credential": password}
    return out


class SessionMedia(Protocol):
    """Where a session's peer connection lives: in this process (PeerSession) or on a
    cluster worker (streamer.cluster.front). The Session has checked every field."""

    async def open(self, sdp: str, controls: Controls) -> str:
        """Answer the offer `sdp` (returns the answer's SDP) and start the session with
        `controls`; OfferError (its message goes to the client) leaves it usable."""

    async def control(self, controls: Controls, neutral: bool) -> None:
        """Take new controls; `neutral`: calibrate the neutral from the next frames."""

    async def close(self) -> None:
        """Free what the session holds. Idempotent."""


class Session:
    """One client's WebSocket: the signalling messages, checked here, and its media."""

    def __init__(self, server: SignalServer, ws: web.WebSocketResponse, sid: str) -> None:
        self.server = server
        self.ws = ws
        self.id = sid
        self.media: SessionMedia | None = None
        self.offered = False
        self.controls = Controls()
        self.closed = False
        #: the WebSocket's close code when the server ends the session
        self.close_code: int = WSCloseCode.OK
        self.started = time.monotonic()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.finished = asyncio.Event()  # close() has freed everything
        self._spawn(self._offer_deadline())

    # -- messages --
    async def send(self, message: dict[str, Any]) -> None:
        if self.ws.closed:
            return
        try:
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))
        except (ConnectionError, RuntimeError) as err:
            log.debug("session %s: send failed: %s", self.id, err)

    async def error(self, message: str) -> None:
        await self.send({"type": "error", "message": message})

    async def handle_text(self, text: str) -> None:
        limit = self.server.config.streamer.max_message_bytes
        size = len(text.encode("utf-8", "surrogatepass"))
        if size > limit:
            await self.error(f"message of {size} bytes exceeds the limit of {limit} bytes")
            return
        try:
            message = load_message(text)
        except (ValueError, RecursionError) as err:
            await self.error(f"malformed JSON: {err}")
            return
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            await self.error("a message must be a JSON object with a string 'type'")
            return
        kind = message["type"]
        if kind == "offer":
            await self.on_offer(message)
        elif kind == "control":
            await self.on_control(message)
        elif kind == "ping":
            await self.send({"type": "pong", "t": message.get("t"), "server": time.time()})
        else:
            await self.error(f"unknown message type {kind!r} (expected offer, control or ping)")

    async def on_control(self, message: dict[str, Any]) -> None:
        if not self.offered or self.media is None:
            await self.error("control before offer: send an offer first")
            return
        try:
            controls = self.controls.updated(message, self.server.expression_names)
        except ControlError as err:
            await self.error(str(err))
            return
        if "neutral" in message and message["neutral"] is not True:
            await self.error("control 'neutral' must be true (it sets the neutral now)")
            return
        await self.media.control(controls, "neutral" in message)
        self.controls = controls
        await self.send({"type": "state", "controls": controls.as_dict()})

    async def on_offer(self, message: dict[str, Any]) -> None:
        if self.offered:
            await self.error("this session already has a peer connection: open a new "
                             "WebSocket for another")
            return
        sdp, mode = message.get("sdp"), message.get("mode", "full")
        if not isinstance(sdp, str) or not sdp.strip():
            await self.error("offer needs 'sdp', the offer's SDP text")
            return
        if mode not in MODES:
            await self.error(f"offer 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
            return
        try:
            check_offer_sdp(sdp)
        except ValueError as err:
            await self.error(f"bad offer SDP: {err}")
            return
        self.offered = True
        await self.server.closing_settled()  # their engine slots back before this one starts
        if self.closed or self.media is None:
            return
        controls = Controls(mode=mode)
        try:
            answer = await self.media.open(sdp, controls)
        except OfferError as err:
            self.offered = False
            await self.error(str(err))
            return
        self.controls = controls
        await self.send({"type": "answer", "sdp": answer})

    def _spawn(self, coro: Any) -> None:
        spawn(self.tasks, coro)

    async def _offer_deadline(self) -> None:
        """End the session unless the client has sent its offer within
        `streamer.negotiation_seconds` of connecting: an idle client must not hold a slot
        (the media's own deadline covers the connection after the answer)."""
        seconds = self.server.config.streamer.negotiation_seconds
        await asyncio.sleep(seconds)
        if self.closed or self.offered:
            return
        why = f"no offer within {seconds:g} s of connecting"
        log.info("session %s: %s: closing", self.id, why)
        await self.error(f"{why}: closing the session")
        await self.server.end_session(self)

    async def close(self) -> None:
        """Free everything the session holds. Idempotent."""
        if self.closed:
            return
        self.closed = True
        cancel_others(self.tasks)
        try:
            if self.media is not None:
                await self.media.close()
            if not self.ws.closed:
                await self.ws.close(code=self.close_code)
        finally:
            self.finished.set()


class SignalServer:
    """The front door of `dvp serve`: the page, `/ws` signalling (Session), `/health`, the
    token, TLS and the session cap. Subclasses say where sessions' media go (`admit`), what
    the `hello` says of the target (`target_facts`), and may add routes (`_make_app`)."""

    def __init__(self, config: Config, options: ServeOptions) -> None:
        options.check()
        self.config = config
        self.options = options
        self.sessions: dict[str, Session] = {}
        self._closing: set[Session] = set()  # sessions whose close() is under way
        self.busy = 0  # connections answered `busy`
        self.hosts = HostPolicy(options.host, options.allow_origins)
        self.app = self._make_app()
        self.runner: web.AppRunner | None = None
        self.url: str | None = None

    # -- what subclasses say --
    def admit(self, session: Session) -> SessionMedia | None:
        """The media of a new session below the cap, or None when there is no room."""
        raise NotImplementedError

    def session_cap(self) -> int:
        """Sessions at once; more get `busy`."""
        return self.options.max_sessions

    def target_facts(self) -> dict[str, Any]:
        """`target` (name), `resolution` (S) and `expression_names` for `hello`."""
        raise NotImplementedError

    @property
    def expression_names(self) -> list[str]:
        return list(self.target_facts()["expression_names"])

    def health(self) -> dict[str, Any]:
        """The `/health` reply to an authorised request."""
        return {"status": "ok", "sessions": self._open_sessions(),
                "max_sessions": self.session_cap()}

    def _open_sessions(self) -> int:
        """Sessions holding a slot: a session whose WebSocket has closed holds none while it
        frees the rest, so a client that reconnects at once is not told `busy`."""
        return sum(not s.closed and not s.ws.closed for s in self.sessions.values())

    def _make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.on_response_prepare.append(self._add_security_headers)
        app.router.add_get("/", self._index)
        app.router.add_get("/app.js", self._static("app.js", "text/javascript"))
        app.router.add_get("/style.css", self._static("style.css", "text/css"))
        app.router.add_get("/ws", self._websocket)
        app.router.add_get("/health", self._health)
        app.on_shutdown.append(self._on_shutdown)
        return app

    # -- http --
    @web.middleware
    async def _guard(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Refuse a request whose Host does not name this server (DNS rebinding)."""
        if not self.hosts.allows(request.headers.get("Host")):
            log.info("refused a request for Host %r from %s", request.headers.get("Host"),
                     request.remote)
            return web.json_response({"type": "error", "message": (
                f"Host {request.headers.get('Host')!r} is not a name of this server: open it "
                "by its address, or start dvp serve with --allow-origin for that name")},
                status=403)
        return await handler(request)

    async def _add_security_headers(self, request: web.Request,
                                    response: web.StreamResponse) -> None:
        response.headers.update(security_headers(request.headers.get("Host", ""),
                                                 self.options.scheme))

    async def _index(self, request: web.Request) -> web.Response:
        return web.FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    def _static(self, name: str, content_type: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.FileResponse(WEB_DIR / name, headers={"Cache-Control": "no-cache",
                                                            "Content-Type": content_type})
        return handler

    async def _health(self, request: web.Request) -> web.Response:
        """`{"status": "ok"}`; with the token (or without one set) also the session counts."""
        if not self._authorised(request):
            return web.json_response({"status": "ok"})
        return web.json_response(self.health())

    def _origin_refusal(self, request: web.Request) -> str | None:
        """Why a browser page may not open /ws (its Origin), or None."""
        origin = request.headers.get("Origin")
        if origin_allowed(origin, request.headers.get("Host", ""), self.options.scheme,
                          self.options.allow_origins):
            return None
        return (f"pages of origin {origin!r} may not connect: only this server's own page "
                "may (start dvp serve with --allow-origin ORIGIN to let another in)")

    def _authorised(self, request: web.Request) -> bool:
        """No token, or the token in `?token=T` (or `Authorization: Bearer T`)."""
        token = self.options.token
        if not token:
            return True
        given = request.query.get("token", "")
        header = request.headers.get("Authorization", "")
        if not given and header.startswith("Bearer "):
            given = header[len("Bearer "):]
        return hmac.compare_digest(given.encode(), token.encode())

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        refusal = self._origin_refusal(request)
        if refusal is not None:
            log.info("refused a WebSocket from %s: %s", request.remote, refusal)
            return web.json_response({"type": "error", "message": refusal}, status=403)
        if not self._authorised(request):
            return web.json_response({"type": "error", "message": "missing or wrong token: "
                                      "connect to /ws?token=TOKEN"}, status=401)
        limit = self.config.streamer.max_message_bytes
        ws = web.WebSocketResponse(max_msg_size=limit * HARD_LIMIT_FACTOR, heartbeat=20.0)
        await ws.prepare(request)
        sid = secrets.token_hex(4)
        session = Session(self, ws, sid)
        media = self.admit(session) if self._open_sessions() < self.session_cap() else None
        if media is None:
            self.busy += 1
            await ws.send_str(json.dumps({"type": "busy"}))
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"busy")
            return ws
        session.media = media
        self.sessions[sid] = session
        log.info("session %s: connected from %s (%d open)", sid, request.remote,
                 len(self.sessions))
        try:
            await session.send(self._hello(sid))
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await session.handle_text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    await session.error("binary messages are not part of the protocol: "
                                        "send JSON text")
                elif msg.type == WSMsgType.ERROR:
                    await session.error(f"connection error: {ws.exception()}")
                    break
        finally:
            await self.end_session(session)
        return ws

    def _hello(self, sid: str) -> dict[str, Any]:
        facts = self.target_facts()
        return {
            "type": "hello",
            "session": sid,
            "target": facts["target"],
            "resolution": facts["resolution"],
            "modes": list(MODES),
            "expression_names": list(facts["expression_names"]),
            "ice_servers": self.ice_servers(),
            "max_message_bytes": self.config.streamer.max_message_bytes,
            "controls": Controls().as_dict(),
            "synthetic_mark": self.config.streamer.synthetic_mark,
        }

    def ice_servers(self) -> list[dict[str, Any]]:
        """The STUN/TURN servers as RTCIceServer dicts (for the client and the server)."""
        return [ice_server(u) for u in self.options.ice_servers]

    async def end_session(self, session: Session) -> None:
        if self.sessions.get(session.id) is session:  # the slot is free from now on
            del self.sessions[session.id]
            log.info("session %s: closed (%d open)", session.id, len(self.sessions))
        self._closing.add(session)
        try:
            await session.close()
        finally:
            if session.finished.is_set():
                self._closing.discard(session)

    async def closing_settled(self) -> None:
        """Wait (at most SETTLE_TIMEOUT) until the sessions being closed have given back
        their engine slots: their seats are free as soon as their WebSocket closes, so a
        client reconnecting at once is let in and starts once they are gone."""
        waits = [asyncio.ensure_future(s.finished.wait()) for s in list(self._closing)]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=SETTLE_TIMEOUT)
        for task in pending:
            task.cancel()

    async def _on_shutdown(self, app: web.Application) -> None:
        await asyncio.gather(*(self.end_session(s) for s in list(self.sessions.values())))

    # -- running --
    def ssl_context(self) -> ssl.SSLContext | None:
        if self.options.cert is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(str(self.options.cert), str(self.options.key))
        except (ssl.SSLError, OSError) as err:
            raise ServeError(f"cannot load the TLS certificate {self.options.cert} and key "
                             f"{self.options.key}: {err}") from err
        return context

    async def start(self) -> str:
        """Listen; returns the page's address (with the token, when there is one)."""
        context = self.ssl_context()
        self.runner = web.AppRunner(self.app, handle_signals=False,
                                    access_log_class=RedactedAccessLogger)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.options.host, self.options.port,
                           ssl_context=context)
        try:
            await site.start()
        except OSError as err:
            await self.runner.cleanup()
            raise ServeError(f"cannot listen on {self.options.host}:{self.options.port}: "
                             f"{err}") from err
        server = getattr(site, "_server", None)
        port = server.sockets[0].getsockname()[1] if server and server.sockets \
            else self.options.port
        self.port = port
        host = self.options.host
        shown = f"[{host}]" if ":" in host else host
        self.url = f"{self.options.scheme}://{shown}:{port}/"
        if self.options.token:
            self.url += f"?token={self.options.token}"
        return self.url

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class DvpServer(SignalServer):
    """The live server of one loaded target, every session's media in this process.

    `stage_factory(target, config) -> SessionStages` makes one session's tracker and
    transfer (default: streamer.live.stages.make_session_stages); it runs in the session's fit
    thread. `engine`: the target's LiveEngine, made beforehand (`dvp serve` makes it, to
    size `--max-sessions`); default: one made here for `options.max_sessions` sessions. The
    server closes it. In the echo configuration (`streamer.echo`) there is no engine.
    """

    def __init__(self, target: Any, config: Config, options: ServeOptions,
                 stage_factory: Callable[[Any, Config], SessionStages] | None = None,
                 engine: LiveEngine | None = None) -> None:
        super().__init__(config, options)
        self.target = target
        if stage_factory is None:
            from streamer.live.stages import make_session_stages

            stage_factory = make_session_stages
        self.stage_factory = stage_factory
        self.engine: LiveEngine | None = None if config.streamer.echo else (
            engine or LiveEngine(target, config, options.max_sessions,
                                 stage_factory=stage_factory))
        self._facts = target_facts(target)
        self._vmc = options.vmc

    def target_facts(self) -> dict[str, Any]:
        return self._facts

    def admit(self, session: Session) -> SessionMedia:
        def end() -> Any:
            return self.end_session(session)

        return PeerSession(session.id, self.open_pipeline, self._facts["expression_names"],
                           self.ice_servers(), session.send, end,
                           self.config.streamer.negotiation_seconds)

    def open_pipeline(self, peer: PeerSession) -> EngineSession | EchoPipeline:
        """A new session of the engine for `peer` (its VMC feed when `--vmc` is given); in
        the echo configuration, frames straight back."""
        if self.engine is None:
            return EchoPipeline(peer.echo)
        return open_engine_session(self.engine, self.stage_factory, self.config,
                                   peer.on_output, f"session-{peer.id}", self._vmc)

    async def start(self) -> str:
        # the media is here: loopback-only ICE on a loopback server (security module)
        restrict_ice_addresses(ice_addresses_for(self.options.host, self.options.ice_addresses))
        return await super().start()

    async def close(self) -> None:
        await super().close()
        if self.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.engine.close)


def target_facts(target: Any) -> dict[str, Any]:
    """What `hello` says of a loaded target: `target` (its directory's name), `resolution`
    (S) and `expression_names` (the 53 ICT names)."""
    return {"target": target.root.name if hasattr(target, "root") else "target",
            "resolution": int(target.size),
            "expression_names": list(target.expression_names)}


def open_engine_session(engine: LiveEngine, stage_factory: Callable[[Any, Config],
                                                                    SessionStages],
                        config: Config, on_output: Callable[[Any], None], name: str,
                        vmc: tuple[str, int] | None) -> EngineSession:
    """A new yuv420p session of `engine` whose stages `stage_factory` makes (in the session's
    fit thread), with its own VMC feed to `vmc` (HOST, PORT) when given."""
    sender = None
    if vmc is not None:
        from streamer.vmc.feed import VmcSender

        sender = VmcSender(*vmc)
    target = engine.target
    return engine.open_session(on_output=on_output, name=name, vmc=sender, output="yuv420p",
                               stages=lambda: stage_factory(target, config))
