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


def test_more_sessions_than_one_process_holds_are_warned_about(loaded_target, caplog) -> None:  # type: ignore[no-untyped-def]
    import logging

    from streamer.cli.config import load_config
    from streamer.live.engine import LiveEngine

    config = load_config(None, [])
    for sessions, warned in ((2, False), (3, True)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="streamer.live.engine"):
            engine = LiveEngine(loaded_target, config, max_sessions=sessions)
            engine.close()
        said = [r.getMessage() for r in caplog.records if "in one process" in r.getMessage()]
        assert bool(said) == warned
        if warned:
            assert said == [("3 sessions in one process: one holds about 2 at 30 fps (its "
                             "sessions share one interpreter lock); for more, run 'dvp serve "
                             "TDIR --ray local --workers-per-gpu K'")]
