"""The partial-result sentence of `dvp track`, `dvp prepare` and `dvp reenact`."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamer.jobs.coverage import Coverage, PartialResultError, check_coverage


def test_the_sentence_has_the_figures() -> None:
    video = Path("v.mp4")
    assert Coverage(video, 125, True, 125, 125).shortfall() is None
    assert Coverage(video, 125, True, 36, 30).shortfall("held") == (
        "v.mp4: only 36 of 125 frames could be decoded (the file ends early or is damaged); "
        "a face was found in 30 of 36 frames (held)")
    assert Coverage(video, 10, True, 10, 0).shortfall() == (
        "v.mp4: no face was found in any of the 10 frames")


def test_an_estimated_frame_count_has_slack() -> None:
    video = Path("v.webm")
    assert Coverage(video, 5000, False, 4951, 4951).shortfall() is None  # 1 % off: an estimate
    assert Coverage(video, 5000, False, 4000, 4000).shortfall() == (
        "v.webm: only 4000 of about 5000 frames could be decoded (the file ends early or is "
        "damaged)")
    assert Coverage(video, 5000, True, 4999, 4999).shortfall() is not None  # exact: no slack


def test_strict_makes_it_an_error() -> None:
    partial = Coverage(Path("v.mp4"), 10, True, 8, 8)
    assert check_coverage(partial, False) == (
        "v.mp4: only 8 of 10 frames could be decoded (the file ends early or is damaged); "
        "--strict makes this an error")
    with pytest.raises(PartialResultError, match=r"^v.mp4: only 8 of 10 frames could be "
                                                 r"decoded .* \(--strict: nothing written\)$"):
        check_coverage(partial, True)
    assert check_coverage(Coverage(Path("v.mp4"), 10, True, 10, 10), True) is None
