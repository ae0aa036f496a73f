"""Colour conversion through a kept libswscale context (streamer.video.convert) gives what
PyAV's per-frame calls give."""

from __future__ import annotations

import threading

import av
import numpy as np

from streamer.video.convert import frame_to_rgb, frame_to_yuv420p, rgb_to_yuv420p


def ramps(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w]
    return [np.stack([(xx * 4 + k) % 256, (yy * 5 + 2 * k) % 256, (xx + yy + 3 * k) % 256],
                     -1).astype(np.uint8) for k in range(n)]


def test_conversions_equal_pyav_per_frame_calls() -> None:
    for rgb in ramps(4) + ramps(2, 32, 40):  # a size change on the way
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        want_601 = frame.reformat(format="yuv420p").to_ndarray()
        want_709 = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
            format="yuv420p", dst_colorspace="itu709", dst_color_range="MPEG").to_ndarray()
        np.testing.assert_array_equal(rgb_to_yuv420p(rgb).to_ndarray(), want_601)
        np.testing.assert_array_equal(rgb_to_yuv420p(rgb, bt709=True).to_ndarray(), want_709)
        yuv = av.VideoFrame.from_ndarray(want_601, format="yuv420p")
        assert frame_to_yuv420p(yuv) is yuv  # already yuv420p: passed as is
        np.testing.assert_array_equal(frame_to_rgb(yuv), yuv.to_ndarray(format="rgb24"))


def test_each_thread_converts_with_its_own_context() -> None:
    frames = ramps(6)
    want = [rgb_to_yuv420p(f).to_ndarray() for f in frames]
    got: dict[int, list[np.ndarray]] = {}

    def convert(k: int) -> None:
        got[k] = [rgb_to_yuv420p(f).to_ndarray() for f in frames * 20]

    threads = [threading.Thread(target=convert, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(3):
        for i, out in enumerate(got[k]):
            np.testing.assert_array_equal(out, want[i % len(frames)])
