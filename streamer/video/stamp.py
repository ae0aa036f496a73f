"""Frame ids stamped in the pixels, for measuring latency through lossy video links.

A 12-bit id plus a 4-bit check (the id's three nibbles and 0xA XORed, so an all-black or
all-white corner reads as no stamp) as 16 black/white square blocks
in two rows of 8 at the frame's top-left corner, each block `block_size(width)` px (at most
16): big enough to survive VP8/H.264 at ordinary bit rates. `read_stamp` gives the id back,
or None when the check fails (no stamp, or too damaged to trust).

The benchmark (bench/latency.py) stamps source frames; with `streamer.echo_stamp: true` the
live pipeline copies the stamp of each source frame onto the reenacted frame made from it.
"""

from __future__ import annotations

import numpy as np

ID_BITS = 12
ID_MODULO = 1 << ID_BITS
_COLS, _ROWS = 8, 2


def block_size(width: int) -> int:
    """Side of one block for a frame `width` px wide."""
    return max(4, min(16, width // 10))


def _bits(frame_id: int) -> list[int]:
    value = frame_id % ID_MODULO
    check = (value ^ (value >> 4) ^ (value >> 8) ^ 0xA) & 0xF  # 0xA: a blank frame fails
    word = (value << 4) | check
    return [(word >> (15 - i)) & 1 for i in range(16)]


def stamp_region(height: int, width: int) -> tuple[slice, slice]:
    """The rows and columns the stamp covers."""
    b = block_size(width)
    return slice(0, _ROWS * b), slice(0, _COLS * b)


def stamp_patch(width: int, frame_id: int) -> np.ndarray:
    """The stamp of `frame_id` for a frame `width` px wide: `(2b, 8b, 3)` uint8 black and
    white blocks (b = `block_size(width)`), what goes at the frame's top-left corner."""
    b = block_size(width)
    patch = np.empty((_ROWS * b, _COLS * b, 3), np.uint8)
    for i, bit in enumerate(_bits(frame_id)):
        r, c = divmod(i, _COLS)
        patch[r * b:(r + 1) * b, c * b:(c + 1) * b] = 255 if bit else 0
    return patch


def write_stamp(frame: np.ndarray, frame_id: int) -> np.ndarray:
    """Stamp `frame_id` (taken modulo 4096) into `frame` `(H, W, 3)` uint8 in place; returns it."""
    rows, cols = stamp_region(frame.shape[0], frame.shape[1])
    if frame.shape[0] < rows.stop or frame.shape[1] < cols.stop:
        raise ValueError(f"frame {frame.shape[1]}x{frame.shape[0]} is too small for a stamp")
    frame[rows, cols] = stamp_patch(frame.shape[1], frame_id)
    return frame


def read_stamp(frame: np.ndarray) -> int | None:
    """The id stamped in `frame`, or None when there is none (the check bits disagree)."""
    b = block_size(frame.shape[1])
    if frame.shape[0] < _ROWS * b or frame.shape[1] < _COLS * b:
        return None
    inner = max(1, b // 4)
    bits = []
    for i in range(16):
        r, c = divmod(i, _COLS)
        patch = frame[r * b + inner:(r + 1) * b - inner, c * b + inner:(c + 1) * b - inner]
        bits.append(1 if float(patch.mean()) > 127.5 else 0)
    word = 0
    for bit in bits:
        word = (word << 1) | bit
    value = word >> 4
    return value if _bits(value) == bits else None
