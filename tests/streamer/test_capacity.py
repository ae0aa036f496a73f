"""The automatic session count's bounds (streamer.live.capacity)."""

from __future__ import annotations

from streamer.live.capacity import MAX_AUTO_SESSIONS, least_bound, process_sessions


def test_one_process_holds_two_sessions_at_30_fps_and_fewer_faster() -> None:
    assert process_sessions(30.0) == 2
    assert process_sessions(15.0) == 4
    assert process_sessions(60.0) == 1
    assert process_sessions(120.0) == 1  # never none


def test_the_least_bound_decides_and_is_named() -> None:
    assert least_bound({"GPU time": 40, "GPU memory": 100, "host cores": 8,
                        "one process": 2}) == (2, "one process")
    assert least_bound({"GPU time": 3, "GPU memory": 3, "one process": 4}) == (3, "GPU time")
    assert least_bound({"GPU time": 0, "one process": 2}) == (1, "GPU time")
    assert least_bound({"GPU time": 500, "host cores": 400}) == (
        MAX_AUTO_SESSIONS, f"the cap of {MAX_AUTO_SESSIONS}")
