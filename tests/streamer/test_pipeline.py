"""LivePipeline: latest frame wins, the window, easing on a lost face, the mark, per-stage
times, no source frame kept."""

from __future__ import annotations

import gc
import itertools
import json
import threading
import time
import weakref
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from streamer.cli.config import load_config
from streamer.live.controls import Controls
from streamer.live.pipeline import (
    STAGES,
    LatestSlot,
    LivePipeline,
    SessionStages,
    blend_params,
    params_message,
)
from streamer.video.mark import has_synthetic_mark
from tests.streamer.stand_ins import FaceCueTracker, PoseRetarget, stand_in_stages


def face_frame(yaw_cue: int = 60, h: int = 48, w: int = 64) -> np.ndarray:
    """A frame the stand-in tracker sees a face in, with yaw (red - blue) / 255."""
    frame = np.zeros((h, w, 3), np.uint8)
    frame[..., 0] = 100 + yaw_cue
    frame[..., 1] = 100
    frame[..., 2] = 100
    return frame


def make_pipeline(target: Any, **kwargs: Any) -> LivePipeline:
    config = kwargs.pop("config", load_config(None, []))
    return LivePipeline(target, stand_in_stages(target, config), config,
                        eyelook=target.eyelook, eyelook_index=target.eyelook_index, **kwargs)


def test_latest_slot_replaces_the_waiting_item() -> None:
    slot = LatestSlot()
    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.dropped == 2
    assert slot.wait_taken(0.01) is False
    assert slot.get(0) == 3
    assert slot.wait_taken(0.01) is True
    assert slot.get(0.01) is None
    slot.close()
    assert slot.get(None) is None  # closed: never blocks


def test_pipeline_makes_marked_frames_with_stage_times(loaded_target: Any) -> None:
    pipeline = make_pipeline(loaded_target)
    out = pipeline.process(face_frame(), 0.0)
    assert out.image.shape == (64, 64, 3) and out.image.dtype == np.uint8
    assert out.face is True
    assert set(out.stage_ms) == set(STAGES)
    assert has_synthetic_mark(out.image)
    assert out.params.frames == 1
    assert out.params.rotation[0, 1] == pytest.approx(60 / 255, abs=1e-6)
    message = json.loads(params_message(out, loaded_target.expression_names))
    assert message["type"] == "params" and message["face"] is True
    assert set(message) >= {"frame", "t", "rotation", "translation", "gaze", "expression",
                            "stage_ms", "latency_ms", "mode"}
    assert len(message["expression"]) == 53
    pipeline.close()


def test_mark_is_off_only_by_the_config_switch(loaded_target: Any) -> None:
    config = load_config(None, ["streamer.synthetic_mark=false"])
    pipeline = make_pipeline(loaded_target, config=config)
    out = pipeline.process(face_frame(), 0.0)
    assert not has_synthetic_mark(out.image)
    pipeline.close()


class SlowTracker(FaceCueTracker):
    """The stand-in tracker taking `delay` seconds per frame."""

    def __init__(self, names: list[str], delay: float) -> None:
        super().__init__(names)
        self.delay = delay

    def __call__(self, rgb: np.ndarray, timestamp: float, stage_ms: dict[str, float]) -> Any:
        time.sleep(self.delay)
        return super().__call__(rgb, timestamp, stage_ms)


def test_slow_frames_are_dropped_not_queued(loaded_target: Any) -> None:
    outputs: list[Any] = []
    config = load_config(None, [])
    stages = SessionStages(SlowTracker(loaded_target.expression_names, 0.05),
                           PoseRetarget(loaded_target))
    pipeline = LivePipeline(loaded_target, stages, config, on_output=outputs.append)
    pipeline.start()
    assert pipeline.wait_ready(10)
    for i in range(40):  # 200 frames per second, four times what the worker can do
        pipeline.submit(face_frame(), i / 200.0)
        time.sleep(0.005)
    deadline = time.monotonic() + 10
    while pipeline.stats()["processed"] + pipeline.stats()["dropped"] < 40 \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = pipeline.stats()
    pipeline.close()
    assert stats["submitted"] == 40
    assert stats["dropped"] > 10
    assert stats["processed"] + stats["dropped"] == 40
    indices = [o.index for o in outputs]
    assert indices == sorted(indices) and indices[-1] == 39  # the last frame always made it
    # a frame waits at most for the one in progress: latency stays near one frame's work
    assert max(o.latency_ms for o in outputs) < 400
    assert not pipeline.alive
    assert stages.tracker.closed


def test_no_source_frame_is_kept(loaded_target: Any) -> None:
    pipeline = make_pipeline(loaded_target)
    done = threading.Event()
    pipeline.on_output = lambda out: done.set()
    pipeline.start()
    frame = face_frame()
    ref = weakref.ref(frame)
    pipeline.submit(frame, 0.0)
    del frame
    assert done.wait(10)
    time.sleep(0.05)
    gc.collect()
    assert ref() is None, "the pipeline kept a source frame"
    pipeline.close()


def test_lost_face_holds_then_eases_to_neutral_and_comes_back(loaded_target: Any) -> None:
    config = load_config(None, ["streamer.ease_seconds=1.0"])
    pipeline = make_pipeline(loaded_target, config=config)
    rest_yaw = float(loaded_target.rest.rotation[0, 1])
    yaw = 80 / 255
    for i in range(5):
        out = pipeline.process(face_frame(80), i * 0.1)
    assert out.params.rotation[0, 1] == pytest.approx(yaw, abs=1e-5)
    black = np.zeros((48, 64, 3), np.uint8)
    yaws = []
    for i in range(5, 20):  # no face from t = 0.5 s on
        out = pipeline.process(black, i * 0.1)
        assert out.face is False
        assert out.image.shape == (64, 64, 3) and out.image.std() > 1.0  # the stream goes on
        yaws.append(float(out.params.rotation[0, 1]))
    assert yaws[0] == pytest.approx(yaw, abs=1e-5)  # held at first
    assert all(a >= b - 1e-6 for a, b in itertools.pairwise(yaws))  # then eases monotonically
    assert rest_yaw < yaws[5] < yaw  # halfway through the second it lies between
    assert yaws[-1] == pytest.approx(rest_yaw, abs=1e-5)  # at neutral after ease_seconds
    back = [float(pipeline.process(face_frame(80), 2.0 + i * 0.1).params.rotation[0, 1])
            for i in range(4)]
    # the face is back: from where the output was, blended in over ease_seconds / 4
    assert back[0] == pytest.approx(rest_yaw, abs=1e-5) and rest_yaw < back[1] < yaw
    assert back[-1] == pytest.approx(yaw, abs=1e-5)
    pipeline.close()


def test_no_face_from_the_start_gives_the_target_at_rest(loaded_target: Any) -> None:
    pipeline = make_pipeline(loaded_target)
    out = pipeline.process(np.zeros((48, 64, 3), np.uint8), 0.0)
    assert out.face is False
    np.testing.assert_allclose(out.params.rotation, loaded_target.rest.rotation)
    np.testing.assert_allclose(out.params.expression, loaded_target.rest.expression)
    pipeline.close()


def test_blend_recomputes_eyelook_from_gaze(loaded_target: Any) -> None:
    rest = loaded_target.rest
    looking = replace(rest, gaze=np.full((1, 2, 2), 0.3, np.float32))
    mid = blend_params(rest, looking, 0.5, loaded_target.eyelook, loaded_target.eyelook_index)
    np.testing.assert_allclose(mid.gaze, 0.15, atol=1e-6)
    np.testing.assert_allclose(mid.expression[:, loaded_target.eyelook_index],
                               loaded_target.eyelook(mid.gaze), atol=1e-6)


def test_controls_and_neutral_reach_the_stages(loaded_target: Any) -> None:
    pipeline = make_pipeline(loaded_target)
    pipeline.set_controls(Controls(mode="dub"))
    pipeline.set_neutral()
    out = pipeline.process(face_frame(), 0.0)
    assert out.mode == "dub"
    assert pipeline.stages is not None
    assert pipeline.stages.retarget.neutral_calls == 1  # type: ignore[attr-defined]
    pipeline.close()


def test_vmc_feed_from_the_pipeline(loaded_target: Any) -> None:
    import socket

    from streamer.vmc import osc
    from streamer.vmc.feed import VmcSender

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    receiver.settimeout(5)
    pipeline = make_pipeline(loaded_target, vmc=VmcSender(*receiver.getsockname()))
    pipeline.process(face_frame(80), 0.0)
    messages = []
    while not any(m.address == "/VMC/Ext/Blend/Apply" for m in messages):
        messages += osc.flatten(osc.decode(receiver.recv(65536)))
    receiver.close()
    pipeline.close()
    head = next(m for m in messages if m.address == "/VMC/Ext/Bone/Pos")
    assert head.args[0] == "Head"
    qy = head.args[5]
    assert qy == pytest.approx(np.sin(80 / 255 / 2), abs=1e-4)
    blends = [m for m in messages if m.address == "/VMC/Ext/Blend/Val"]
    assert len(blends) == 52
