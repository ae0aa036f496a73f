"""What `dvp serve` lets in: the checks between the network and a session.

docs/protocol.md ("Who can reach what") is the threat model these serve. In short:

- **Host** (`HostPolicy`): every request's `Host` must name this server: the loopback names
  when it listens on loopback, the address it listens on, this machine's host names, an IP
  literal when it listens on every interface, or the host of an `--allow-origin`. A page of
  another site that a DNS name pointed at 127.0.0.1 (DNS rebinding) sends its own name and
  is refused.
- **Origin** (`origin_allowed`): a WebSocket from a browser page carries the page's origin;
  only the server's own (`scheme://Host`) and the `--allow-origin` ones may open `/ws`.
  Clients that are not browsers send no Origin and are let through (the token, when there is
  one, still applies).
- **Headers** (`security_headers`): the page may only load its own script and style and
  connect back to its own server, may not be framed (`frame-ancestors 'none'`), and sends no
  Referer (the page's address can hold the token).
- **Logs** (`RedactedAccessLogger`): request lines are logged with `token=REDACTED`.
- **Signalling input** (`load_message`, `check_offer_sdp`): JSON numbers beyond what any
  field needs (integers of more than `MAX_INT_DIGITS` digits, floats beyond float range,
  NaN / Infinity) and SDP whose lines do not parse are refused with a message, before they
  reach Python's int-string limit, `math.isfinite` or aiortc's lenient parser.
- **ICE** (`restrict_ice_addresses`): a server listening on loopback gathers loopback host
  candidates only, so its answers disclose no other interface, unless `--ice-address` names
  the addresses to use. aioice offers no per-connection setting, so this holds for the whole
  process (one `dvp serve` per process).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import re
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse
from yarl import URL

log = logging.getLogger(__name__)

#: Integers in signalling JSON have at most this many digits (no field needs more; Python
#: refuses to convert strings of over 4300 digits, and converting long ones costs time).
MAX_INT_DIGITS = 18
#: Environment variable holding STUN/TURN URLs (whitespace or comma separated), so that
#: TURN passwords need not appear on the command line (the process list).
ICE_SERVERS_ENV = "DVP_ICE_SERVERS"
_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARD = ("", "0.0.0.0", "::")


class SignalError(ValueError):
    """A signalling message that is valid JSON text but not acceptable (a number too big)."""


# ---- Host and Origin ---------------------------------------------------------------------------
def split_host(value: str) -> tuple[str, int | None] | None:
    """`Host` header value -> (lower-case host name or IP literal, port or None); None when it
    is not a well-formed host[:port] (IPv6 literals in brackets)."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9._-]+)(?::(\d{1,5}))?", value.strip())
    if match is None:
        return None
    host = match.group(1).lower().strip("[]").rstrip(".")
    port = int(match.group(2)) if match.group(2) else None
    if port is not None and port > 65535:
        return None
    return host, port


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def normalise_origin(origin: str) -> str:
    """`scheme://host[:port]` in lower case without a default port; ValueError when `origin`
    is not an http(s) origin (a path, a query or a user part is not part of an origin)."""
    parts = urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username \
            or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{origin!r} is not an origin: use scheme://host[:port], e.g. "
                         "https://app.example.org:8443")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{origin!r} has a bad port") from None
    host = parts.hostname.lower()
    shown = f"[{host}]" if ":" in host else host
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{shown}" + (f":{port}" if port and port != default else "")


class HostPolicy:
    """The host names a request's `Host` may carry (see the module doc).

    bind: the address the server listens on; allowed_origins: normalised `--allow-origin`
    values (their hosts are allowed too). Ports are not compared: a TLS proxy in front may
    present another port; what DNS rebinding changes is the name.
    """

    def __init__(self, bind: str, allowed_origins: Iterable[str] = ()) -> None:
        bind = bind.strip("[]").lower()
        self.any_ip = bind in _WILDCARD
        names = {bind} if bind not in _WILDCARD else set()
        if bind in _LOOPBACK_NAMES or (is_ip_literal(bind) and
                                       ipaddress.ip_address(bind).is_loopback):
            names.update(_LOOPBACK_NAMES)
        else:
            names.update(_LOOPBACK_NAMES if self.any_ip else ())
            for name in (socket.gethostname(), socket.getfqdn()):
                if name:
                    names.add(name.lower())
        for origin in allowed_origins:
            host = urlsplit(origin).hostname
            if host:
                names.add(host.lower())
        self.names = frozenset(names)

    def allows(self, host_header: str | None) -> bool:
        """True when the `Host` header names this server."""
        if not host_header:
            return False
        parsed = split_host(host_header)
        if parsed is None:
            return False
        host = parsed[0]
        return host in self.names or (self.any_ip and is_ip_literal(host))


def origin_allowed(origin: str | None, host_header: str, scheme: str,
                   allowed: Iterable[str]) -> bool:
    """May a page of `origin` open the WebSocket? Yes without an Origin (not a browser), for
    the server's own origin (`scheme://Host`), and for the allowed (normalised) origins."""
    if origin is None:
        return True
    try:
        given = normalise_origin(origin)
        own = normalise_origin(f"{scheme}://{host_header}")
    except ValueError:  # "null" (sandboxed frames, file:) and anything malformed
        return False
    return given == own or given in set(allowed)


def security_headers(host_header: str, scheme: str) -> dict[str, str]:
    """Headers of every response: the page's Content-Security-Policy (own script, style and
    WebSocket only; no framing), no MIME sniffing, no Referer (the URL can hold the token)."""
    ws = "wss" if scheme == "https" else "ws"
    parsed = split_host(host_header)
    connect = "'self'"
    if parsed is not None:  # 'self' covers ws: in CSP 3; older browsers need it spelled out
        host, port = parsed
        shown = (f"[{host}]" if ":" in host else host) + (f":{port}" if port else "")
        connect += f" {ws}://{shown}"
    policy = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              f"media-src 'self' blob: mediastream:; connect-src {connect}; "
              "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return {"Content-Security-Policy": policy, "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
            "Cross-Origin-Opener-Policy": "same-origin"}


# ---- logs --------------------------------------------------------------------------------------
def redacted(url: URL) -> str:
    """The path and query of `url` with the value of `token` replaced by REDACTED."""
    url = url.relative() if url.is_absolute() else url
    if "token" not in url.query:
        return str(url)
    return str(url.with_query([(k, "REDACTED" if k == "token" else v)
                               for k, v in url.query.items()]))


class RedactedAccessLogger(AbstractAccessLogger):
    """aiohttp's access log without secrets: `REMOTE "METHOD PATH?QUERY" STATUS BYTES` with
    the token redacted."""

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        self.logger.info('%s "%s %s" %s %s %.3fs', request.remote, request.method,
                         redacted(request.rel_url), response.status, response.body_length,
                         time)


# ---- signalling input --------------------------------------------------------------------------
def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise SignalError(f"an integer of {digits} digits is out of range (at most "
                          f"{MAX_INT_DIGITS} digits)")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise SignalError(f"the number {text[:24]}{'...' if len(text) > 24 else ''} is out of "
                          "range")
    return value


def _no_constant(name: str) -> Any:
    raise SignalError(f"{name} is not a JSON number")


def load_message(text: str) -> Any:
    """Parse a signalling message. Raises ValueError (json.JSONDecodeError or SignalError)
    for text that is not JSON or holds numbers out of range, RecursionError when nested too
    deep."""
    return json.loads(text, parse_int=_bounded_int, parse_float=_finite_float,
                      parse_constant=_no_constant)


_SDP_LINE = re.compile(r"[a-z]=.*")
_SDP_MEDIA = re.compile(r"m=[A-Za-z0-9_-]+ (\d+)(?:/\d+)? [A-Za-z0-9/_.-]+( [A-Za-z0-9_.*-]+)+")
_SDP_CONNECTION = re.compile(r"c=IN IP[46] [0-9A-Za-z:._-]+(/\d+){0,2}")


def check_offer_sdp(sdp: str) -> None:
    """Refuse SDP that a strict parser would: ValueError naming the first bad line (`v=0`
    first, `x=value` lines, well-formed `m=` lines with a port in 0..65535, `c=` lines)."""
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line]
    if not lines or lines[0] != "v=0":
        raise ValueError("the SDP must start with the line 'v=0'")
    for number, line in enumerate(lines, 1):
        shown = line if len(line) <= 60 else line[:57] + "..."
        if not _SDP_LINE.fullmatch(line):
            raise ValueError(f"line {number} {shown!r} is not an SDP line (x=value)")
        if line.startswith("m="):
            match = _SDP_MEDIA.fullmatch(line)
            if match is None:
                raise ValueError(f"line {number} {shown!r} is not 'm=<media> <port> <proto> "
                                 "<format> ...'")
            if int(match.group(1)) > 65535:
                raise ValueError(f"line {number} {shown!r} has a port above 65535")
        elif line.startswith("c=") and not _SDP_CONNECTION.fullmatch(line):
            raise ValueError(f"line {number} {shown!r} is not 'c=IN IP4|IP6 <address>'")


# ---- ICE ---------------------------------------------------------------------------------------
_ice_override: list[str] | None = None


def ice_addresses_for(bind: str, configured: Iterable[str]) -> list[str] | None:
    """The addresses ICE may gather host candidates on: the configured ones, else loopback
    when the server listens on loopback, else None (every interface, aioice's choice)."""
    configured = list(configured)
    if configured:
        return configured
    bind = bind.strip("[]").lower()
    if bind in ("localhost", "127.0.0.1") or (is_ip_literal(bind) and bind != "::1"
                                               and ipaddress.ip_address(bind).is_loopback):
        return ["127.0.0.1"]
    if bind == "::1":
        return ["::1"]
    return None


def restrict_ice_addresses(addresses: list[str] | None) -> None:
    """Make aioice gather host candidates on `addresses` only (None: every interface, with
    127.0.0.1 where the machine has no other). Process-wide; see the module doc."""
    from aioice import ice

    global _ice_override
    _ice_override = list(addresses) if addresses is not None else None
    if getattr(ice.get_host_addresses, "_dvp_wrapper", False):
        return
    original = ice.get_host_addresses

    def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        if _ice_override is not None:
            return [a for a in _ice_override
                    if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]
        found = original(use_ipv4, use_ipv6)
        return found or (["127.0.0.1"] if use_ipv4 else [])

    host_addresses._dvp_wrapper = True  # type: ignore[attr-defined]
    ice.get_host_addresses = host_addresses  # type: ignore[assignment]


# ---- STUN/TURN servers from a file or the environment ------------------------------------------
def ice_server_urls(given: Iterable[str], file: Path | None = None,
                    environ: Mapping[str, str] = os.environ) -> list[str]:
    """STUN/TURN URLs from the command line, then `file` (one per line, `#` comments), then
    the `DVP_ICE_SERVERS` environment variable (whitespace or comma separated): the file and
    the environment keep TURN passwords out of the process list. OSError when the file
    cannot be read."""
    urls = list(given)
    if file is not None:
        for line in Path(file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                urls.append(line)
    urls += [u for u in re.split(r"[\s,]+", environ.get(ICE_SERVERS_ENV, "")) if u]
    return urls
