"""A small OSC 1.0 encoder and decoder (messages and bundles), enough for the VMC protocol.

OSC (Open Sound Control) packets, as the VMC protocol sends them over UDP:

- a string is ASCII, NUL-terminated and padded with NULs to a multiple of 4 bytes;
- a message is an address ("/VMC/Ext/Blend/Val"), a type tag string (",sf"), then the
  arguments big-endian: `i` int32, `f` float32, `s` string, `T`/`F` true/false (no data);
- a bundle is "#bundle", an 8-byte NTP time tag (1 = "immediately"), then elements, each
  an int32 size followed by a message or a nested bundle.

`encode_message` / `encode_bundle` build packets; `decode` parses one (for tests and for
anyone debugging a feed) into `Message` and `Bundle` values.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tracker.errors import DvpError

#: Argument types the encoder takes: python bool, int, float, str.
OscArg = bool | int | float | str
#: Time tag meaning "immediately" (OSC 1.0).
IMMEDIATELY = 1


class OscError(DvpError):
    """An OSC packet or argument that cannot be encoded or decoded; the message says why."""


@dataclass(frozen=True)
class Message:
    """One OSC message: an address and its arguments (int, float, str or bool)."""

    address: str
    args: tuple[OscArg, ...] = ()


@dataclass(frozen=True)
class Bundle:
    """An OSC bundle: a time tag and its elements (messages or bundles)."""

    timetag: int
    elements: tuple[Message | Bundle, ...]


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _string(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise OscError(f"OSC strings must be ASCII, got {text!r}") from None
    if b"\0" in raw:
        raise OscError(f"OSC strings cannot hold NUL characters: {text!r}")
    return raw + b"\0" * (4 - len(raw) % 4)  # at least one NUL, then pad to 4


def encode_message(address: str, *args: OscArg) -> bytes:
    """One OSC message: `address` (starting with '/') and int/float/str/bool arguments.

    Raises OscError for an address without '/', a non-ASCII string, an int outside int32 or
    an argument of another type.
    """
    if not address.startswith("/"):
        raise OscError(f"OSC addresses start with '/', got {address!r}")
    tags = ","
    data = b""
    for arg in args:
        if isinstance(arg, bool):
            tags += "T" if arg else "F"
        elif isinstance(arg, int):
            if not -(2**31) <= arg < 2**31:
                raise OscError(f"OSC int argument {arg} does not fit in 32 bits")
            tags += "i"
            data += struct.pack(">i", arg)
        elif isinstance(arg, float):
            tags += "f"
            data += struct.pack(">f", arg)
        elif isinstance(arg, str):
            tags += "s"
            data += _string(arg)
        else:
            raise OscError(f"OSC arguments must be int, float, str or bool, got "
                           f"{type(arg).__name__}")
    return _string(address) + _string(tags) + data


def encode_bundle(elements: Iterable[bytes], timetag: int = IMMEDIATELY) -> bytes:
    """A bundle of already-encoded messages or bundles."""
    out = _string("#bundle") + struct.pack(">Q", timetag)
    for element in elements:
        if len(element) % 4:
            raise OscError("OSC bundle elements must be a multiple of 4 bytes long")
        out += struct.pack(">i", len(element)) + element
    return out


def pack_bundles(messages: Sequence[bytes], max_bytes: int = 1400) -> list[bytes]:
    """Messages grouped into as few bundles as keep each under `max_bytes` (one UDP datagram
    that needs no IP fragmentation on common links); order is kept."""
    header = 16
    bundles: list[bytes] = []
    group: list[bytes] = []
    size = header
    for message in messages:
        if group and size + 4 + len(message) > max_bytes:
            bundles.append(encode_bundle(group))
            group, size = [], header
        group.append(message)
        size += 4 + len(message)
    if group:
        bundles.append(encode_bundle(group))
    return bundles


def _read_string(data: bytes, pos: int) -> tuple[str, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        raise OscError(f"OSC string at byte {pos} is not NUL-terminated")
    try:
        text = data[pos:end].decode("ascii")
    except UnicodeDecodeError:
        raise OscError(f"OSC string at byte {pos} is not ASCII") from None
    return text, (end + 4) & ~3


def _decode_message(data: bytes) -> Message:
    address, pos = _read_string(data, 0)
    if not address.startswith("/"):
        raise OscError(f"not an OSC message: address {address!r} does not start with '/'")
    if pos >= len(data):
        return Message(address)  # old-style message without a type tag string
    tags, pos = _read_string(data, pos)
    if not tags.startswith(","):
        raise OscError(f"OSC type tags must start with ',', got {tags!r}")
    args: list[OscArg] = []
    for tag in tags[1:]:
        if tag in "if":
            if pos + 4 > len(data):
                raise OscError(f"OSC message {address} is truncated")
            args.append(struct.unpack_from(">i" if tag == "i" else ">f", data, pos)[0])
            pos += 4
        elif tag == "s":
            text, pos = _read_string(data, pos)
            args.append(text)
        elif tag in "TF":
            args.append(tag == "T")
        else:
            raise OscError(f"OSC type tag '{tag}' is not supported")
    return Message(address, tuple(args))


def decode(data: bytes) -> Message | Bundle:
    """Parse one OSC packet (message or bundle). Raises OscError on a malformed packet."""
    if len(data) % 4 or not data:
        raise OscError(f"OSC packets are a non-zero multiple of 4 bytes, got {len(data)}")
    if not data.startswith(b"#bundle\0"):
        return _decode_message(data)
    if len(data) < 16:
        raise OscError("OSC bundle is truncated")
    (timetag,) = struct.unpack_from(">Q", data, 8)
    pos = 16
    elements: list[Message | Bundle] = []
    while pos < len(data):
        if pos + 4 > len(data):
            raise OscError("OSC bundle element size is truncated")
        (size,) = struct.unpack_from(">i", data, pos)
        pos += 4
        if size <= 0 or pos + size > len(data):
            raise OscError(f"OSC bundle element of {size} bytes overruns the packet")
        elements.append(decode(data[pos:pos + size]))
        pos += size
    return Bundle(timetag, tuple(elements))


def flatten(packet: Message | Bundle) -> list[Message]:
    """Every message of a packet, depth first, in order."""
    if isinstance(packet, Message):
        return [packet]
    return [m for element in packet.elements for m in flatten(element)]
