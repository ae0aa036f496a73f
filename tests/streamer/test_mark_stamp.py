"""The visible synthetic mark, and frame ids stamped in pixels (for latency measurements)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamer.video.io import VideoWriter, read_video
from streamer.video.mark import draw_synthetic_mark, has_synthetic_mark, mark_layout, mark_scale
from streamer.video.stamp import ID_MODULO, read_stamp, stamp_region, write_stamp


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (256, 256), (512, 512), (1080, 1920)])
def test_mark_fits_and_is_found(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    assert not has_synthetic_mark(frame)
    original = frame.copy()
    assert draw_synthetic_mark(frame) is frame
    assert has_synthetic_mark(frame)
    (rows, cols), _ = mark_layout(*shape)
    assert rows.stop <= shape[0] and cols.stop <= shape[1]
    changed = np.any(frame != original, axis=2)
    assert not changed[: rows.start].any() and not changed[:, cols.stop:].any()  # a corner
    assert changed.mean() < (0.16 if min(shape) < 128 else 0.05)  # small
    assert mark_scale(*shape) == max(1, min(shape) // 200)


def test_mark_survives_video_coding(tmp_path: Path) -> None:
    frames = [np.full((64, 64, 3), 90 + i, np.uint8) for i in range(5)]
    with VideoWriter(tmp_path / "m.mp4", fps=10) as writer:
        for frame in frames:
            writer.write(draw_synthetic_mark(frame))
    decoded = read_video(tmp_path / "m.mp4")[0]
    assert all(has_synthetic_mark(f, contrast=30.0) for f in decoded)


def test_stamp_round_trip_and_blank_frames(tmp_path: Path) -> None:
    for value in (0, 1, 1234, ID_MODULO - 1):
        frame = np.full((64, 96, 3), 128, np.uint8)
        assert read_stamp(write_stamp(frame, value)) == value
    assert read_stamp(write_stamp(np.zeros((64, 96, 3), np.uint8), ID_MODULO + 5)) == 5
    assert read_stamp(np.zeros((64, 64, 3), np.uint8)) is None
    assert read_stamp(np.full((64, 64, 3), 255, np.uint8)) is None
    rows, cols = stamp_region(64, 96)
    assert rows.stop <= 64 and cols.stop <= 96
    with pytest.raises(ValueError, match="too small for a stamp"):
        write_stamp(np.zeros((8, 8, 3), np.uint8), 1)
    # stamps survive lossy coding
    rng = np.random.default_rng(1)
    with VideoWriter(tmp_path / "s.mp4", fps=10, crf=30) as writer:
        for i in range(6):
            writer.write(write_stamp(rng.integers(0, 256, (64, 96, 3), dtype=np.uint8),
                                     100 + i))
    assert [read_stamp(f) for f in read_video(tmp_path / "s.mp4")[0]] == list(range(100, 106))
