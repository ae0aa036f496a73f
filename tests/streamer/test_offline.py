"""Offline at GPU speed, on the CPU: `dvp reenact` batched (determinism, layouts, the same
frames as the frame-at-a-time path) and the landmarks of a video over worker processes."""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from streamer.cli.config import Config, load_config
from streamer.jobs.reenact import ReenactError, generate_frames, reenact_video
from streamer.live.controls import Controls
from streamer.live.pipeline import LivePipeline, SessionStages
from streamer.video.io import (
    ChunkError,
    VideoWriter,
    read_chunk,
    read_frames,
    read_video,
    split_video,
)
from streamer.video.mark import has_synthetic_mark
from tests.streamer.test_reenact import write_source
from tracker.params import FaceParams
from tracker.transfer import TransferError

#: ../shared/media beside the repository (DVP_TEST_MEDIA overrides).
MEDIA = Path(os.environ.get("DVP_TEST_MEDIA",
                            Path(__file__).resolve().parents[3] / "shared" / "media"))
FRANCK = MEDIA / "franck_talking_200s.webm"
MEGAMIND = MEDIA / "megamind.avi"
needs_franck = pytest.mark.skipif(not FRANCK.is_file(), reason=f"{FRANCK} is not there")

#: Quick tracking: the tests' small regressor, few keyframes and calibration iterations.
QUICK = ("tracker.regressor_samples=6000", "tracker.regressor_epochs=8", "tracker.keyframes=4",
         "tracker.iterations_calibration=5", "streamer.reenact_batch=4")


def quick_config(*more: str) -> Config:
    return load_config(None, [*QUICK, *more])


@pytest.fixture(scope="module")
def face_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 10 frames of the franck clip (a real face) with a tone as audio."""
    if not FRANCK.is_file():
        pytest.skip(f"{FRANCK} is not there")
    root = tmp_path_factory.mktemp("clip")
    tone = write_source(root / "tone.mp4", frames=12, audio=True)
    clip = root / "face.mp4"
    with VideoWriter(clip, fps=25.0, audio_from=tone) as writer:
        for frame, t in read_frames(FRANCK, max_frames=10):
            writer.write(frame, t)
    return clip


# ---- dvp reenact, batched ------------------------------------------------------------------
def test_reenact_is_deterministic_and_marks_keeps_audio(real_target: Any, face_clip: Path,
                                                         tmp_path: Path) -> None:
    config = quick_config()
    first = reenact_video(real_target, face_clip, tmp_path / "a.mp4", config, progress=False)
    second = reenact_video(real_target, face_clip, tmp_path / "b.mp4", config, progress=False)
    assert first["frames"] == second["frames"] == 10
    assert first["faces"] == 10
    assert set(first["stage_ms"]) >= {"landmarks", "fit", "transfer", "render", "window",
                                      "generator", "output"}
    a, b = read_video(tmp_path / "a.mp4")[0], read_video(tmp_path / "b.mp4")[0]
    assert a.shape == (10, 64, 64, 3)
    np.testing.assert_array_equal(a, b)  # the same output, frame for frame
    assert all(has_synthetic_mark(f, contrast=30.0) for f in a)
    with av.open(str(tmp_path / "a.mp4")) as container:
        assert container.metadata.get("synthetic") == "true"
        assert container.streams.audio  # the source's audio is kept


@pytest.mark.gpu
def test_reenact_is_deterministic_on_cuda(target_dir: Path, face_model: Any, face_clip: Path,
                                          tmp_path: Path) -> None:
    from streamer.live.stages import LoadedTarget

    config = quick_config()
    target = LoadedTarget(target_dir, config, torch.device("cuda"), face_model=face_model)
    outs = [tmp_path / "a.mp4", tmp_path / "b.mp4"]
    for out in outs:
        assert reenact_video(target, face_clip, out, config, progress=False)["faces"] == 10
    np.testing.assert_array_equal(read_video(outs[0])[0], read_video(outs[1])[0])


def test_reenact_layouts_on_the_batched_path(real_target: Any, face_clip: Path,
                                             tmp_path: Path) -> None:
    summary = reenact_video(real_target, face_clip, tmp_path / "sbs.mp4", quick_config(),
                            side_by_side=True, progress=False)
    assert summary["frames"] == 10 and summary["size"] == [64, 80 + 64 + 64]
    frames = read_video(tmp_path / "sbs.mp4")[0]
    assert frames.shape[1:] == (64, 80 + 64 + 64, 3)  # source 360 x 288 | conditioning | output
    assert has_synthetic_mark(frames[0][:, -64:], contrast=30.0)
    assert not has_synthetic_mark(frames[0][:, :80], contrast=30.0)
    assert frames[0][:, 80:144].astype(float).std() > 5  # the colour rendering is shown
    reenact_video(real_target, face_clip, tmp_path / "plain.mp4",
                  quick_config("streamer.synthetic_mark=false"), progress=False)
    assert not any(has_synthetic_mark(f, contrast=30.0)
                   for f in read_video(tmp_path / "plain.mp4")[0])


def test_a_source_without_a_face_is_refused_and_writes_nothing(real_target: Any,
                                                               tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", frames=4, audio=False)  # no face in it
    with pytest.raises(TransferError, match="no frame of the source video has a face"):
        reenact_video(real_target, source, tmp_path / "x.mp4", quick_config(), progress=False)
    assert not (tmp_path / "x.mp4").exists()


def test_reenact_refuses_bad_requests_before_any_work(real_target: Any, tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", frames=2, audio=False)
    with pytest.raises(ReenactError, match="unknown mode 'wild'"):
        reenact_video(real_target, source, tmp_path / "x.mp4", quick_config(), mode="wild")
    with pytest.raises(ReenactError, match="exclude each other"):
        reenact_video(real_target, source, tmp_path / "x.mp4", quick_config(),
                      side_by_side=True, full_frame=True)
    with pytest.raises(ReenactError, match="--full-frame needs the target's source video"):
        reenact_video(real_target, source, tmp_path / "x.mp4", quick_config(),
                      full_frame=True)
    with pytest.raises(ReenactError, match="streamer.reenact_batch must be at least 1"):
        reenact_video(real_target, source, tmp_path / "x.mp4",
                      quick_config("streamer.reenact_batch=0"), progress=False)
    assert not (tmp_path / "x.mp4").exists()


class ReplayStages:
    """The source tracker and transfer of the frame-at-a-time path, replaying given target
    parameters by timestamp (so both paths get the same per-frame parameters)."""

    def __init__(self, params: FaceParams, times: list[float]) -> None:
        self.by_time = {t: i for i, t in enumerate(times)}
        self.params = params
        self.tracker = self.track
        self.retarget = self

    def track(self, rgb: np.ndarray, t: float, stage_ms: dict[str, float]) -> FaceParams:
        return self.params.select([self.by_time[t]])

    def __call__(self, source: FaceParams, controls: Controls) -> FaceParams:
        return source

    def rest(self, controls: Controls) -> FaceParams:
        return self.params.select([0])


def test_batched_frames_equal_the_frame_at_a_time_path(real_target: Any) -> None:
    """Render, window and generator in batches of 4 give the frames that the live
    `LivePipeline.process` gives one at a time for the same parameters (within one level):
    tracking and the source neutral differ between the paths by design (whole video vs
    live calibration), so the comparison starts from the same target parameters."""
    rest = real_target.rest
    n = 9
    times = [0.0, 0.04, 0.08, 0.2, 0.24, 0.28, 0.32, 0.5, 0.54]  # gaps: dropped frames
    yaw = np.linspace(-0.3, 0.3, n, dtype=np.float32)
    params = FaceParams.concat([replace(
        rest, rotation=rest.rotation + np.array([[0.0, y, 0.05 * y]], np.float32),
        expression=np.clip(rest.expression + 0.1 * k, 0, 1).astype(np.float32),
        timestamps=np.array([t], np.float32)) for k, (y, t) in enumerate(zip(yaw, times))])
    batched = np.concatenate([b.images for b in generate_frames(real_target, params, times, 4)])
    config = load_config(None, ["streamer.synthetic_mark=false"])
    replay = ReplayStages(params, times)
    stages = SessionStages(tracker=replay.track, retarget=replay)  # type: ignore[arg-type]
    stages.close = lambda: None  # type: ignore[method-assign]
    pipeline = LivePipeline(real_target, stages, config, name="serial")
    serial = np.stack([pipeline.process(np.zeros((8, 8, 3), np.uint8), t).image
                       for t in times])
    assert batched.shape == serial.shape == (n, 64, 64, 3)
    assert int(np.abs(batched.astype(int) - serial.astype(int)).max()) <= 1
    assert len({frame.tobytes() for frame in serial}) == n  # the frames do differ


# ---- landmarks over worker processes -------------------------------------------------------
@needs_franck
def test_chunks_read_the_frames_of_read_frames() -> None:
    chunks, why = split_video(FRANCK, 3, max_frames=30)
    assert why == "" and [(c.start, c.stop) for c in chunks] == [(0, 10), (10, 20), (20, 30)]
    frames, times, _ = read_video(FRANCK, max_frames=30)
    for chunk in chunks:
        got = list(read_chunk(chunk))
        assert len(got) == len(chunk)
        for k, (frame, t) in enumerate(got):
            np.testing.assert_array_equal(frame, frames[chunk.start + k])
            assert t == times[chunk.start + k]


@pytest.mark.skipif(not MEGAMIND.is_file(), reason=f"{MEGAMIND} is not there")
def test_a_chunk_that_does_not_decode_as_planned_is_refused() -> None:
    chunks, _ = split_video(MEGAMIND, 2, max_frames=40)  # an AVI with shuffled timestamps
    with pytest.raises(ChunkError, match=r"megamind.avi: frame \d+ has pts \d+, expected"):
        for chunk in chunks:
            list(read_chunk(chunk))


@needs_franck
def test_worker_chunks_are_tracked_each_from_its_own_start(caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    from streamer.jobs.landmarks import video_landmarks
    from tracker.choices import forget_choices
    from tracker.landmarks import make_landmark_detector

    forget_choices()
    config = load_config(None, ["streamer.landmark_workers=2"])
    with caplog.at_level(logging.INFO, logger="tracker.choices"):
        found = video_landmarks(FRANCK, config, torch.device("cpu"), 24, max_frames=24)
    assert found.workers == 2 and found.chunks == [0, 12]
    assert "landmark workers: 2 processes (streamer.landmark_workers=2)" in caplog.text
    frames, times, _ = read_video(FRANCK, max_frames=24)
    assert found.timestamps == times.tolist()
    for start in found.chunks:  # each chunk: a fresh stream started at its first frame
        with make_landmark_detector(config.tracker, "cpu") as detector:  # type: ignore[attr-defined]
            expected = [detector(f) for f in frames[start:start + 12]]
        for k, lm in enumerate(expected):
            got = found.landmarks[start + k]
            assert got.presence == lm.presence == 1.0
            np.testing.assert_array_equal(got.points, lm.points)


def test_worker_count_rule() -> None:
    from streamer.jobs.landmarks import worker_count

    assert worker_count(0, 1510, cores=16) == (16, ("auto: 16 usable cores, at least 50 "
                                                   "frames each"))
    assert worker_count(0, 250, cores=16)[0] == 1  # too short to pay for the processes
    assert worker_count(0, 5000, cores=1) == (1, "auto: 1 usable core")
    assert worker_count(3, 2, cores=16) == (2, "streamer.landmark_workers=3")
    with pytest.raises(Exception, match="streamer.landmark_workers must be 0 .auto. or more"):
        worker_count(-1, 10)


def test_a_failure_while_generating_leaves_no_file(real_target: Any, face_clip: Path,
                                                   tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    source = face_clip
    class Failing:  # the real runtime, then a failure on the second batch
        def __init__(self, runtime: Any) -> None:
            self.runtime, self.device, self.backend = runtime, runtime.device, "failing"
            self.calls: list[int] = []

        def __call__(self, window: torch.Tensor) -> torch.Tensor:
            self.calls.append(window.shape[0])
            if len(self.calls) == 2:
                raise RuntimeError("the GPU fell off")
            return self.runtime(window)

    failing = Failing(real_target.runtime)
    monkeypatch.setattr(real_target, "runtime", failing)
    with pytest.raises(RuntimeError, match="the GPU fell off"):
        reenact_video(real_target, source, tmp_path / "x.mp4", quick_config(), progress=False)
    assert failing.calls == [4, 4]  # batches of 4 (streamer.reenact_batch)
    assert not (tmp_path / "x.mp4").exists()
    assert not list(tmp_path.glob(".x*partial*"))
