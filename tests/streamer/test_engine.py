"""The live engine (streamer.live.engine): the same frames as the serial reference
(`LivePipeline.process`), sessions at once with their own frames, latest frame wins, the
output conversion on the device, nothing left behind after many sessions."""

from __future__ import annotations

import gc
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from streamer.cli.config import Config, load_config
from streamer.live.batch import bucket_of, bucket_sizes
from streamer.live.device import DeviceKit
from streamer.live.engine import LiveEngine
from streamer.live.output import finish_frames, rgb_to_yuv420p
from streamer.live.pipeline import LivePipeline, OutputFrame, SessionStages
from streamer.video.mark import draw_synthetic_mark, has_synthetic_mark
from streamer.video.stamp import read_stamp, write_stamp
from tests.streamer.stand_ins import FaceCueTracker, PoseRetarget

MEDIA = Path(__file__).resolve().parents[3] / "shared" / "media"
FRANCK = MEDIA / "franck_talking_200s.webm"
DRIVER = MEDIA / "webcam_driver_53s.mp4"


def face_frame(yaw_cue: int = 60, h: int = 48, w: int = 64) -> np.ndarray:
    frame = np.zeros((h, w, 3), np.uint8)
    frame[..., 0] = 100 + yaw_cue
    frame[..., 1] = 100
    frame[..., 2] = 100
    return frame


class Collector:
    """on_output that keeps the frames and lets a test wait for the n-th."""

    def __init__(self) -> None:
        self.frames: list[OutputFrame] = []
        self.cond = threading.Condition()

    def __call__(self, out: OutputFrame) -> None:
        with self.cond:
            self.frames.append(out)
            self.cond.notify_all()

    def wait(self, count: int, timeout: float = 60.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.frames) >= count, timeout)


def paced(session: Any, collector: Collector, frames: list[np.ndarray], fps: float = 25.0
          ) -> list[OutputFrame]:
    """Each frame submitted once the previous one came out (nothing dropped)."""
    start = len(collector.frames)
    for i, rgb in enumerate(frames):
        session.submit(rgb, i / fps)
        assert collector.wait(start + i + 1), f"frame {i} did not come out"
    return collector.frames[start:]


def clip(path: Path, count: int, step: int = 1) -> list[np.ndarray]:
    from streamer.video.io import read_frames

    return [np.ascontiguousarray(rgb) for k, (rgb, _) in
            enumerate(read_frames(path, max_frames=count * step)) if k % step == 0][:count]


def recording(stages: Any, seen: list[np.ndarray]) -> Any:
    """`stages` (SessionStages) with the points of every landmark call kept in `seen`."""
    find = stages.tracker.landmarks

    def landmarks(rgb: np.ndarray) -> Any:
        found = find(rgb)
        seen.append(np.array(found.points, copy=True))
        return found

    stages.tracker.landmarks = landmarks
    return stages


def recorded_stages(target: Any, config: Config, seen: list[np.ndarray]) -> Any:
    """A session's stages factory (real stages, landmarks kept in `seen`)."""
    from streamer.live.stages import make_session_stages

    return lambda: recording(make_session_stages(target, config), seen)


def reference(target: Any, config: Config, frames: list[np.ndarray], fps: float = 25.0,
              seen: list[np.ndarray] | None = None) -> list[OutputFrame]:
    stages = recorded_stages(target, config, [] if seen is None else seen)()
    pipeline = LivePipeline(target, stages, config,
                            eyelook=target.eyelook, eyelook_index=target.eyelook_index)
    try:
        return [pipeline.process(rgb, i / fps) for i, rgb in enumerate(frames)]
    finally:
        pipeline.close()


def real_config() -> Config:
    # calibration in the fit's own thread, so both paths calibrate at the same frame
    return load_config(None, ["tracker.calibration_seconds=0.4",
                              "tracker.calibrate_in_background=false"])


#: How far the two paths' tracked parameters may lie apart on CUDA: each captures its own
#: CUDA graphs of the landmark networks, and cuDNN (benchmark mode, which the engine turns
#: on) may pick other kernels for each, so the landmarks and then the fit differ in the last
#: bits (measured on an H200 in one run: expression weights up to 3.3e-4 apart, on a 0-1
#: scale). On the CPU both paths run the same kernels: 1e-4.
CUDA_PARAMS_ATOL = 1e-3


def assert_same_frames(engine_out: list[OutputFrame], ref: list[OutputFrame],
                       levels: int = 1, params_atol: float = 1e-4,
                       landmarks: tuple[list[np.ndarray], list[np.ndarray]] | None = None
                       ) -> None:
    """Pictures within `levels`, rotations and expression weights within `params_atol`;
    the message says how far apart they are (and the landmarks each path saw, if given)."""
    assert len(engine_out) == len(ref)
    assert [a.face for a in engine_out] == [b.face for b in ref]
    for a, b in zip(engine_out, ref):
        assert a.image is not None and b.image is not None
    apart = [int(np.abs(a.image.astype(np.int16) - b.image.astype(np.int16)).max())  # type: ignore[union-attr]
             for a, b in zip(engine_out, ref)]
    rotation = max(float(np.abs(a.params.rotation - b.params.rotation).max())
                   for a, b in zip(engine_out, ref))
    expression = max(float(np.abs(a.params.expression - b.params.expression).max())
                     for a, b in zip(engine_out, ref))
    seen = (f"pictures up to {max(apart)} levels apart (per frame {apart}), rotation up to "
            f"{rotation:.2e}, expression weights up to {expression:.2e}")
    if landmarks is not None:
        points = [float(np.abs(a - b).max()) for a, b in zip(*landmarks)]
        seen += (f"; landmarks of {len(landmarks[0])} / {len(landmarks[1])} frames, up to "
                 f"{max(points, default=0.0):.2e} px apart (per frame "
                 f"{[round(d, 4) for d in points]})")
    assert max(apart) <= levels and rotation <= params_atol and expression <= params_atol, seen


def engine_and_reference(target: Any, seen: tuple[list[np.ndarray], list[np.ndarray]]
                         ) -> tuple[list[OutputFrame], list[OutputFrame]]:
    """The same 16 franck frames through one engine session and through the serial
    reference (`LivePipeline.process`), with the real stages; the landmarks each path saw
    go to `seen` (engine, reference)."""
    config = real_config()
    frames = clip(FRANCK, 16, step=2)
    ref = reference(target, config, frames, seen=seen[1])
    engine = LiveEngine(target, config, max_sessions=1)
    got = Collector()
    session = engine.open_session(got, output="rgb",
                                  stages=recorded_stages(target, config, seen[0]))
    session.start()
    try:
        assert session.wait_ready(60) and session.setup_error is None
        out = paced(session, got, frames)
    finally:
        session.close()
        engine.close()
    return out, ref



# ---- the device output -----------------------------------------------------------------
def test_yuv420p_matches_libswscale() -> None:
    if FRANCK.is_file():  # a real frame
        rgb = clip(FRANCK, 1)[0][:288, :352]
    else:  # smooth colour ramps
        yy, xx = np.mgrid[0:64, 0:96].astype(np.float32)
        rgb = np.stack([xx * 2.6, yy * 3.9, 255 - xx * 1.3 - yy * 1.9], -1).astype(np.uint8)
    ours = rgb_to_yuv420p(torch.from_numpy(rgb)).numpy()
    theirs = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
        format="yuv420p").to_ndarray()
    assert ours.shape == theirs.shape == (rgb.shape[0] * 3 // 2, rgb.shape[1])
    h = rgb.shape[0]
    diff = np.abs(ours.astype(np.int16) - theirs.astype(np.int16))
    assert int(diff[:h].max()) <= 1  # luma: the same matrix
    assert float(diff[h:].mean()) < 1.0  # chroma: the filters differ a little
    # a batch converts frame by frame
    batch = torch.from_numpy(np.stack([rgb, rgb[::-1].copy()]))
    both = rgb_to_yuv420p(batch).numpy()
    np.testing.assert_array_equal(both[0], ours)
    with pytest.raises(ValueError, match="height divisible by 4 and an even width, got 6x6"):
        rgb_to_yuv420p(torch.zeros((6, 6, 3), dtype=torch.uint8))


def test_finish_frames_marks_and_stamps_as_the_reference() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    expected = images.copy()
    for k, stamp in enumerate([7, None, 4095]):
        draw_synthetic_mark(expected[k])
        if stamp is not None:
            write_stamp(expected[k], stamp)
    out = finish_frames(DeviceKit(torch.device("cpu")), torch.from_numpy(images.copy()),
                        [7, None, 4095], mark=True).numpy()
    np.testing.assert_array_equal(out, expected)
    assert read_stamp(out[0]) == 7 and read_stamp(out[2]) == 4095
    assert has_synthetic_mark(out[1])


def test_batch_sizes() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(6) == [1, 2, 4, 6]
    assert bucket_sizes(8) == [1, 2, 4, 8]
    assert bucket_of(3, [1, 2, 4, 6]) == 4 and bucket_of(5, [1, 2, 4, 6]) == 6
    with pytest.raises(ValueError, match="exceeds the largest graphed batch 6"):
        bucket_of(7, [1, 2, 4, 6])


# ---- sessions (stand-in stages) ------------------------------------------------------
def stand_in(target: Any) -> SessionStages:
    return SessionStages(FaceCueTracker(target.expression_names), PoseRetarget(target))


def test_sessions_run_on_their_slots_threads(loaded_target: Any) -> None:
    """Sessions one after another on one slot: their landmark loops all ran on the slot's
    thread, and they leave no thread of their own behind (cuBLAS keys its workspaces by
    the thread's handle: streamer.live.slots)."""
    engine = LiveEngine(loaded_target, load_config(None, []), max_sessions=1)
    ran_on: list[str] = []

    def stages() -> SessionStages:
        made = stand_in(loaded_target)
        find = made.tracker.landmarks

        def landmarks(rgb: np.ndarray) -> Any:
            ran_on.append(threading.current_thread().name)
            return find(rgb)

        made.tracker.landmarks = landmarks  # type: ignore[method-assign]
        return made

    threads = {t.name for t in threading.enumerate()}
    try:
        for i in range(3):
            got = Collector()
            session = engine.open_session(got, name=f"s{i}", output="rgb", stages=stages)
            session.start()
            assert session.wait_ready(10) and session.setup_error is None
            paced(session, got, [face_frame(), face_frame(-60)])
            session.close()
            assert not session.alive
        assert len(ran_on) == 6 and set(ran_on) == {"dvp-slot0-landmarks_0"}
        assert {t.name for t in threading.enumerate()} == threads
    finally:
        engine.close()


def test_a_session_without_a_free_slot_fails_its_setup(loaded_target: Any) -> None:
    engine = LiveEngine(loaded_target, load_config(None, []), max_sessions=1)
    try:
        first = engine.open_session(stages=lambda: stand_in(loaded_target))
        first.start()
        assert first.wait_ready(10) and first.setup_error is None
        second = engine.open_session(stages=lambda: stand_in(loaded_target))
        second.start()
        assert second.wait_ready(1)
        assert str(second.setup_error) == "all 1 session slots are in use"
        assert not second.alive
        second.close()
        first.close()
    finally:
        engine.close()


def test_engine_on_the_cpu_says_what_it_runs(loaded_target: Any) -> None:
    engine = LiveEngine(loaded_target, load_config(None, []))  # sessions: the CPU default
    try:
        assert engine.max_sessions == 2
        choices = engine.choices()
        assert choices["render"].chosen == "eager render, frame by frame"
        assert choices["render"].why == "CPU: no CUDA graphs"
        assert choices["generator"].chosen == "'cpu' runtime, batched"
        assert choices["sessions"].chosen == "2"
        assert choices["sessions"].why == "the CPU's default; --max-sessions changes it"
    finally:
        engine.close()


def test_the_engine_says_once_what_it_runs(loaded_target: Any,
                                          caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from tracker.choices import forget_choices

    forget_choices()
    engine = LiveEngine(loaded_target, load_config(None, []), max_sessions=1)
    try:
        with caplog.at_level(logging.INFO, logger="tracker.choices"):
            engine.report(stand_in(loaded_target))
            engine.report(stand_in(loaded_target))  # said once
    finally:
        engine.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "tracker.choices"]
    assert "live render: eager render, frame by frame (CPU: no CUDA graphs)" in lines
    assert "live fit: eager (CPU device)" in lines
    assert "live sessions: 1 (given)" in lines
    assert len(lines) == len(set(lines)) == 7


def test_yuv_and_rgb_sessions_get_marked_frames(loaded_target: Any) -> None:
    config = load_config(None, [])
    engine = LiveEngine(loaded_target, config, max_sessions=2)
    got_yuv, got_rgb = Collector(), Collector()
    a = engine.open_session(got_yuv, name="a", output="yuv420p",
                            stages=lambda: stand_in(loaded_target))
    b = engine.open_session(got_rgb, name="b", output="rgb",
                            stages=lambda: stand_in(loaded_target))
    try:
        for s in (a, b):
            s.start()
            assert s.wait_ready(10) and s.setup_error is None
        yuv = paced(a, got_yuv, [face_frame(80)])[0]
        rgb = paced(b, got_rgb, [face_frame(20)])[0]
    finally:
        a.close()
        b.close()
        engine.close()
    assert yuv.image is None and yuv.yuv is not None and yuv.yuv.shape == (96, 64)
    assert rgb.yuv is None and rgb.image is not None and rgb.image.shape == (64, 64, 3)
    assert has_synthetic_mark(rgb.image)
    shown = av.VideoFrame.from_ndarray(yuv.yuv, format="yuv420p").to_ndarray(format="rgb24")
    assert has_synthetic_mark(shown, contrast=30.0)
    assert {"landmarks", "fit", "transfer", "queue", "render", "window", "generator",
            "output", "download"} <= set(rgb.stage_ms)
    assert yuv.params.rotation[0, 1] == pytest.approx(80 / 255, abs=1e-6)
    assert rgb.params.rotation[0, 1] == pytest.approx(20 / 255, abs=1e-6)


class SlowCues(FaceCueTracker):
    """Stand-in landmarks taking `delay` seconds a frame."""

    def __init__(self, names: list[str], delay: float) -> None:
        super().__init__(names)
        self.delay = delay

    def landmarks(self, rgb: np.ndarray) -> Any:
        time.sleep(self.delay)
        return super().landmarks(rgb)


def test_slow_frames_are_dropped_not_queued_and_none_is_kept(loaded_target: Any) -> None:
    engine = LiveEngine(loaded_target, load_config(None, []), max_sessions=1)
    got = Collector()
    stages = SessionStages(SlowCues(loaded_target.expression_names, 0.05),
                           PoseRetarget(loaded_target))
    session = engine.open_session(got, output="rgb", stages=stages)
    session.start()
    assert session.wait_ready(10)
    frame = face_frame()
    ref = weakref.ref(frame)
    for i in range(40):  # 200 frames per second, four times what the landmarks take
        session.submit(frame if i == 0 else face_frame(), i / 200.0)
        if i == 0:
            del frame
        time.sleep(0.005)
    deadline = time.monotonic() + 10
    while session.stats()["processed"] + session.stats()["dropped"] < 40 \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = session.stats()
    session.close()
    engine.close()
    assert stats["submitted"] == 40 and stats["dropped"] > 10
    assert stats["processed"] + stats["dropped"] == 40
    indices = [o.index for o in got.frames]
    assert indices == sorted(indices) and indices[-1] == 39  # the last frame always made it
    assert max(o.latency_ms for o in got.frames) < 400
    gc.collect()
    assert ref() is None, "the engine kept a source frame"
    assert not session.alive and stages.tracker.closed  # type: ignore[attr-defined]


def test_a_session_whose_stages_fail_reports_it(loaded_target: Any) -> None:
    engine = LiveEngine(loaded_target, load_config(None, []), max_sessions=1)

    def broken() -> SessionStages:
        raise RuntimeError("no tracker here")

    session = engine.open_session(stages=broken)
    session.start()
    assert session.wait_ready(10)
    assert str(session.setup_error) == "no tracker here"
    session.close()
    # its slot came back: the next session gets it
    ok = engine.open_session(stages=lambda: stand_in(loaded_target))
    ok.start()
    assert ok.wait_ready(10) and ok.setup_error is None
    ok.close()
    engine.close()


# ---- real stages ---------------------------------------------------------------------
needs_franck = pytest.mark.skipif(not FRANCK.is_file(), reason=f"{FRANCK} is not there")


@needs_franck
def test_engine_equals_the_serial_reference(real_target: Any) -> None:
    """MediaPipe, FaceTracker, transfer, ConditioningRenderer, generator: the engine's
    frames are the reference's (`LivePipeline.process`) within one level."""
    seen: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    out, ref = engine_and_reference(real_target, seen)
    assert sum(o.face for o in out) >= 12
    assert_same_frames(out, ref, landmarks=seen)


def session_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("dvp-")]


def many_sessions(target: Any, config: Config, device_memory: bool) -> None:
    """20 sessions one after another with the real stages, each making frames: the
    engine's threads, slots and device memory are back where they started."""
    frames = clip(FRANCK, 3, step=5)
    engine = LiveEngine(target, config, max_sessions=2)
    gone: list[weakref.ref[Any]] = []
    try:
        def one(i: int) -> None:
            got = Collector()
            session = engine.open_session(got, name=f"s{i}", output="yuv420p")
            if i >= 0:  # the first one imports MediaPipe, which keeps an import-time
                gone.append(weakref.ref(session))  # error whose traceback holds its caller
            session.start()
            try:
                assert session.wait_ready(60) and session.setup_error is None
                paced(session, got, frames)
            finally:
                session.close()

        for warm in range(engine.slots.count):  # first use of each slot: imports, caches
            one(-1 - warm)  # (the mark's mask on the device, cuDNN, each stream's cuBLAS)
        gc.collect()
        threads = {t.name for t in session_threads()}
        memory = torch.cuda.memory_allocated(engine.kit.device) if device_memory else 0
        for i in range(20):
            one(i)
        time.sleep(0.2)  # the output thread hands its last frame over
        gc.collect()
        assert not [ref for ref in gone if ref() is not None], "a session outlived its close"
        assert {t.name for t in session_threads()} == threads
        assert engine.slots._free.qsize() == 2 and not engine._pending
        if device_memory:
            assert torch.cuda.memory_allocated(engine.kit.device) == memory
    finally:
        engine.close()
    assert not [t for t in session_threads() if t.name.startswith("dvp-engine")]


@needs_franck
def test_twenty_sessions_leave_nothing_behind(real_target: Any) -> None:
    many_sessions(real_target, real_config(), device_memory=False)


# ---- CUDA ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cuda_target(target_dir: Path, face_model: Any) -> Any:
    from streamer.live.stages import LoadedTarget

    return LoadedTarget(target_dir, real_config(), torch.device("cuda"), face_model=face_model)


@pytest.mark.gpu
@needs_franck
def test_cuda_engine_equals_the_serial_reference(cuda_target: Any) -> None:
    seen: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    out, ref = engine_and_reference(cuda_target, seen)
    assert_same_frames(out, ref, params_atol=CUDA_PARAMS_ATOL, landmarks=seen)


@pytest.mark.gpu
@pytest.mark.skipif(not (FRANCK.is_file() and DRIVER.is_file()), reason="media not there")
def test_two_cuda_sessions_at_once_get_their_own_frames(cuda_target: Any) -> None:
    config = real_config()
    clips = [clip(FRANCK, 24, step=2), clip(DRIVER, 24, step=2)]
    seen: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []), ([], [])]
    refs = [reference(cuda_target, config, c, seen=seen[k][1]) for k, c in enumerate(clips)]
    engine = LiveEngine(cuda_target, config, max_sessions=2)
    collectors = [Collector(), Collector()]
    sessions = [engine.open_session(c, name=f"s{k}", output="rgb",
                                    stages=recorded_stages(cuda_target, config, seen[k][0]))
                for k, c in enumerate(collectors)]
    outs: list[list[OutputFrame]] = [[], []]
    try:
        for s in sessions:
            s.start()
            assert s.wait_ready(60) and s.setup_error is None

        def drive(k: int) -> None:
            outs[k] = paced(sessions[k], collectors[k], clips[k])

        threads = [threading.Thread(target=drive, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        for s in sessions:
            s.close()
        engine.close()
    for k in range(2):
        # batches of two run another generator graph than the reference's batch of one:
        # fp16 rounding may move a pixel by a few levels, never the frame
        assert_same_frames(outs[k], refs[k], levels=8, params_atol=CUDA_PARAMS_ATOL,
                           landmarks=seen[k])
        mine = np.mean([np.abs(a.image.astype(float) - b.image).mean()
                        for a, b in zip(outs[k], refs[k])])
        assert mine < 0.5
        # and the other session's frames would not pass for this one's
        other = np.mean([np.abs(a.params.expression - b.params.expression).max()
                         for a, b in zip(outs[k], refs[1 - k])])
        assert other > 1e-3


@pytest.mark.gpu
@needs_franck
def test_twenty_cuda_sessions_leave_nothing_behind(cuda_target: Any) -> None:
    many_sessions(cuda_target, real_config(), device_memory=True)
