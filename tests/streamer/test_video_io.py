"""Video I/O: round trips, timing, audio pass-through, metadata, bad input, no half files."""

from __future__ import annotations

import logging
import re
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from streamer.video.io import VideoError, VideoWriter, probe, read_frames, read_video

H, W = 48, 64
MEGAMIND = Path(__file__).parents[3] / "shared" / "media" / "megamind.avi"  # [2] = repo root


def colours(n: int) -> list[np.ndarray]:
    """n flat frames of distinct colours, (H, W, 3) uint8, with a white top-left quadrant."""
    frames = []
    for i in range(n):
        rgb = ((37 * i + 20) % 236, (255 - 19 * i) % 236 + 10, (90 + 53 * i) % 236)
        frame = np.empty((H, W, 3), np.uint8)
        frame[:] = rgb
        frame[: H // 2, : W // 2] = 235
        frames.append(frame)
    return frames


def write_clip(path: Path, frames: list[np.ndarray], timestamps=None, fps=25.0, **kw) -> None:
    with VideoWriter(path, fps, **kw) as writer:
        for i, frame in enumerate(frames):
            writer.write(frame, None if timestamps is None else timestamps[i])


def make_source(
    path: Path,
    *,
    seconds: float = 1.0,
    fps: int = 25,
    video: bool = True,
    audio_codec: str | None = "aac",
    sample_rate: int = 16000,
) -> None:
    """A test file written with PyAV directly: flat grey video and/or a 440 Hz sine."""
    container = av.open(str(path), mode="w")
    vstream = astream = None
    if video:
        vstream = container.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = W, H, "yuv420p"
    if audio_codec is not None:
        astream = container.add_stream(audio_codec, rate=sample_rate, layout="mono")
    if vstream is not None:
        for i in range(round(seconds * fps)):
            frame = av.VideoFrame.from_ndarray(np.full((H, W, 3), 128, np.uint8), format="rgb24")
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in vstream.encode(frame):
                container.mux(packet)
        for packet in vstream.encode(None):
            container.mux(packet)
    if astream is not None:
        t = np.arange(round(seconds * sample_rate)) / sample_rate
        samples = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
        for start in range(0, len(samples), 1000):
            chunk = samples[start : start + 1000][None]
            frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
            frame.sample_rate = sample_rate
            frame.pts = start
            frame.time_base = Fraction(1, sample_rate)
            for packet in astream.encode(frame):
                container.mux(packet)
        for packet in astream.encode(None):
            container.mux(packet)
    container.close()


def audio_seconds(path: Path) -> tuple[str, float]:
    """(codec name, decoded duration in s) of a file's audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = sum(frame.samples for frame in container.decode(stream))
        return stream.codec_context.name, samples / stream.codec_context.sample_rate


# --- round trips -----------------------------------------------------------------------------


def test_round_trip_constant_rate(tmp_path: Path) -> None:
    frames = colours(12)
    out = tmp_path / "clip.mp4"
    write_clip(out, frames, fps=25.0)

    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (W, H, 12)
    assert info.fps == pytest.approx(25.0)
    assert info.duration == pytest.approx(12 / 25, abs=1e-3)
    assert info.has_audio is False

    video, times, fps = read_video(out)
    assert video.shape == (12, H, W, 3) and video.dtype == np.uint8
    assert times.shape == (12,) and times.dtype == np.float64
    np.testing.assert_allclose(times, np.arange(12) / 25, atol=1e-4)
    assert fps == pytest.approx(25.0)
    for got, want in zip(video, frames):
        diff = np.abs(got.astype(int) - want.astype(int))
        assert diff.mean() < 4.0
        # away from the quadrant's edge (where 4:2:0 chroma blurs) every pixel is close
        assert diff[H // 2 + 2 :, W // 2 + 2 :].max() <= 8
        assert diff[: H // 2 - 2, : W // 2 - 2].max() <= 8


def test_variable_frame_timing_is_kept(tmp_path: Path) -> None:
    timestamps = [0.0, 0.04, 0.1, 0.13, 0.2, 0.26, 0.27, 0.4, 0.55, 0.56]
    out = tmp_path / "vfr.mp4"
    write_clip(out, colours(len(timestamps)), timestamps, fps=25.0)

    got = [t for _, t in read_frames(out)]
    np.testing.assert_allclose(got, timestamps, atol=1e-4)


def test_ntsc_rate_timestamps_are_exact_multiples(tmp_path: Path) -> None:
    out = tmp_path / "ntsc.mp4"
    write_clip(out, colours(6), fps=30000 / 1001)

    _, times, fps = read_video(out)
    assert fps == pytest.approx(29.97, abs=1e-2)
    np.testing.assert_allclose(times, np.arange(6) * 1001 / 30000, atol=1e-6)


def test_missing_timestamps_follow_the_previous_frame(tmp_path: Path) -> None:
    out = tmp_path / "mixed.mp4"
    write_clip(out, colours(4), [0.0, 0.3, None, None], fps=10.0)

    _, times, _ = read_video(out)
    np.testing.assert_allclose(times, [0.0, 0.3, 0.4, 0.5], atol=1e-4)


def test_read_frames_max_frames(tmp_path: Path) -> None:
    out = tmp_path / "clip.mp4"
    write_clip(out, colours(12))

    items = list(read_frames(out, max_frames=3))
    assert len(items) == 3
    frame, t = items[2]
    assert frame.shape == (H, W, 3) and frame.dtype == np.uint8
    assert t == pytest.approx(2 / 25, abs=1e-4)
    video, times, _ = read_video(out, max_frames=5)
    assert video.shape == (5, H, W, 3) and times.shape == (5,)


def test_odd_frame_size_is_padded_by_repeating_the_edge(tmp_path: Path) -> None:
    frame = np.zeros((21, 33, 3), np.uint8)
    frame[:, :, 0] = 200  # red everywhere
    frame[:, -1] = (20, 200, 20)  # last column green
    out = tmp_path / "odd.mp4"
    write_clip(out, [frame, frame])

    video, _, _ = read_video(out)
    assert video.shape == (2, 22, 34, 3)
    assert np.abs(video[0, :21, :30].astype(int) - frame[:, :30]).max() <= 6
    # the added row repeats the last row (red), the added column the last column (green)
    assert np.abs(video[0, 21, :30].astype(int) - (200, 0, 0)).max() <= 8
    assert np.abs(video[0, :, 33].astype(int) - (20, 200, 20)).max() <= 8


def test_metadata_tags_are_written(tmp_path: Path) -> None:
    out = tmp_path / "tagged.mp4"
    write_clip(out, colours(2), metadata={"comment": "synthetic: made by dvp reenact"})
    with av.open(str(out)) as container:
        assert container.metadata["comment"] == "synthetic: made by dvp reenact"

    custom = tmp_path / "custom.mp4"
    write_clip(custom, colours(2), metadata={"comment": "synthetic", "dvp_synthetic": "1"})
    with av.open(str(custom)) as container:
        assert container.metadata["comment"] == "synthetic"
        assert container.metadata["dvp_synthetic"] == "1"


# --- audio -----------------------------------------------------------------------------------


def test_audio_is_copied_through_without_reencoding(tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    make_source(source, seconds=1.0)
    assert probe(source).has_audio

    out = tmp_path / "out.mp4"
    frames, times, fps = read_video(source)
    with VideoWriter(out, fps, audio_from=source) as writer:
        for frame, t in zip(frames, times):
            writer.write(frame, t)

    assert probe(out).has_audio
    codec, seconds = audio_seconds(out)
    assert codec == "aac"
    assert seconds == pytest.approx(1.0, abs=0.1)
    # remuxed, not re-encoded: the compressed packets are the source's
    with av.open(str(source)) as a, av.open(str(out)) as b:
        src = [bytes(p) for p in a.demux(a.streams.audio[0]) if p.size]
        dst = [bytes(p) for p in b.demux(b.streams.audio[0]) if p.size]
    assert dst == src


def test_audio_past_the_last_frame_is_dropped(tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    make_source(source, seconds=1.0)
    out = tmp_path / "short.mp4"
    write_clip(out, colours(10), fps=25.0, audio_from=source)  # 0.4 s of video

    _, seconds = audio_seconds(out)
    assert 0.35 < seconds < 0.55


def test_audio_that_mp4_players_do_not_take_is_transcoded_to_aac(tmp_path: Path) -> None:
    wav = tmp_path / "voice.wav"
    make_source(wav, seconds=1.0, video=False, audio_codec="pcm_s16le")
    out = tmp_path / "dub.mp4"
    write_clip(out, colours(25), fps=25.0, audio_from=wav)

    codec, seconds = audio_seconds(out)
    assert codec == "aac"
    assert seconds == pytest.approx(1.0, abs=0.1)


def test_audio_from_a_file_without_audio_gives_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    silent = tmp_path / "silent.mp4"
    make_source(silent, audio_codec=None)
    out = tmp_path / "out.mp4"
    with caplog.at_level(logging.WARNING, logger="streamer.video.io"):
        write_clip(out, colours(3), audio_from=silent)
    assert f"{silent} has no audio stream; the output will have none" in caplog.text
    assert probe(out).has_audio is False


# --- bad input -------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.mp4"
    message = re.escape(f"video file not found: {missing}")
    with pytest.raises(VideoError, match=message):
        probe(missing)
    with pytest.raises(VideoError, match=message):
        read_frames(missing)  # raised by the call, before iterating
    with pytest.raises(VideoError, match=message):
        read_video(missing)
    with pytest.raises(VideoError, match=message):
        VideoWriter(tmp_path / "out.mp4", 25.0, audio_from=missing)
    assert list(tmp_path.iterdir()) == []


def test_a_text_file_is_not_a_video(tmp_path: Path) -> None:
    notes = tmp_path / "notes.mp4"
    notes.write_text("this is not a video\n")
    with pytest.raises(
        VideoError,
        match=re.escape(f"cannot open {notes} as a video: Invalid data found when processing"),
    ):
        probe(notes)
    with pytest.raises(VideoError, match="cannot open .*notes.mp4 as a video"):
        read_video(notes)


def test_an_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(VideoError, match=re.escape(f"{empty} is empty (0 bytes)")):
        read_video(empty)


def test_zero_frame_videos(tmp_path: Path) -> None:
    for name in ("zero.avi", "zero.mp4"):
        path = tmp_path / name
        container = av.open(str(path), mode="w")
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        container.start_encoding()
        container.close()
    with pytest.raises(VideoError, match=re.escape(f"{tmp_path / 'zero.avi'} has no video frames")):
        probe(tmp_path / "zero.avi")
    with pytest.raises(VideoError, match=re.escape(f"{tmp_path / 'zero.avi'} has no video frames")):
        read_video(tmp_path / "zero.avi")
    with pytest.raises(
        VideoError,
        match=re.escape(f"{tmp_path / 'zero.mp4'} has no video frames (it holds no streams)"),
    ):
        read_video(tmp_path / "zero.mp4")


def test_an_audio_only_file_has_no_video_stream(tmp_path: Path) -> None:
    wav = tmp_path / "voice.wav"
    make_source(wav, video=False, audio_codec="pcm_s16le")
    with pytest.raises(VideoError, match=re.escape(f"{wav} has no video stream")):
        probe(wav)


def test_write_rejects_a_wrong_dtype_or_shape(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with (
        pytest.raises(
            VideoError,
            match=re.escape(
                f"{out}: frame 0 must be a uint8 array of shape (H, W, 3), "
                "got a float32 array of shape (48, 64, 3)"
            ),
        ),
        VideoWriter(out, 25.0) as writer,
    ):
        writer.write(np.zeros((H, W, 3), np.float32))
    with (
        pytest.raises(
            VideoError,
            match=re.escape(
                f"{out}: frame 0 must be a uint8 array of shape (H, W, 3), "
                "got a uint8 array of shape (48, 64)"
            ),
        ),
        VideoWriter(out, 25.0) as writer,
    ):
        writer.write(np.zeros((H, W), np.uint8))
    with (
        pytest.raises(
            VideoError,
            match=re.escape(
                f"{out}: frame 1 must be a uint8 array of shape (48, 64, 3) (the first frame's "
                "shape), got a uint8 array of shape (48, 62, 3)"
            ),
        ),
        VideoWriter(out, 25.0) as writer,
    ):
        writer.write(np.zeros((H, W, 3), np.uint8))
        writer.write(np.zeros((H, W - 2, 3), np.uint8))
    with (
        pytest.raises(
            VideoError,
            match=re.escape(f"{out}: frame 0 must be a uint8 array of shape (H, W, 3), got list"),
        ),
        VideoWriter(out, 25.0) as writer,
    ):
        writer.write([[0, 0, 0]])  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_timestamps_that_do_not_increase(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    frame = colours(1)[0]
    with (
        pytest.raises(
            VideoError,
            match=re.escape(
                f"{out}: frame 2 timestamp 0.100000 s is not after the previous frame's 0.200000 s"
            ),
        ),
        VideoWriter(out, 25.0) as writer,
    ):
        writer.write(frame, 0.0)
        writer.write(frame, 0.2)
        writer.write(frame, 0.1)
    with (
        pytest.raises(
            VideoError,
            match=re.escape(f"{out}: frame 0 timestamp must be a finite number >= 0 s, got -1.0"),
        ),
        VideoWriter(out, 25.0) as writer,
    ):
        writer.write(frame, -1.0)
    assert list(tmp_path.iterdir()) == []


def test_writer_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(VideoError, match=re.escape("fps must be a positive number, got 0")):
        VideoWriter(tmp_path / "out.mp4", 0)
    nowhere = tmp_path / "no" / "such" / "out.mp4"
    with pytest.raises(
        VideoError,
        match=re.escape(f"cannot write {nowhere}: directory {nowhere.parent} does not exist"),
    ):
        VideoWriter(nowhere, 25.0)
    with pytest.raises(VideoError, match=re.escape("unknown video format '.xyz'")):
        VideoWriter(tmp_path / "out.xyz", 25.0)
    assert list(tmp_path.iterdir()) == []


# --- never a half-written file ---------------------------------------------------------------


def test_partial_file_is_renamed_on_close(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with VideoWriter(out, 25.0) as writer:
        assert writer.partial_path == tmp_path / ".out.partial.mp4"
        for frame in colours(5):
            writer.write(frame)
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4"]
    assert probe(out).frame_count == 5


def test_an_exception_in_the_with_block_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "source.mp4"
    make_source(source, seconds=0.4)
    out = tmp_path / "out.mp4"
    out.write_bytes(b"previous result")
    with (
        pytest.raises(RuntimeError, match="tracking failed"),
        VideoWriter(out, 25.0, audio_from=source) as writer,
    ):
        frame = colours(1)[0]
        for _ in range(100):  # until the encoder's look-ahead lets packets reach the file
            writer.write(frame)
            if writer.partial_path.exists():
                break
        assert writer.partial_path.exists()
        raise RuntimeError("tracking failed")
    assert not writer.partial_path.exists()
    assert out.read_bytes() == b"previous result"  # the target is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "source.mp4"]


def test_closing_without_frames_saves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out.mp4"
    with (
        pytest.raises(
            VideoError, match=re.escape(f"no frames were written to {out}; nothing was saved")
        ),
        VideoWriter(out, 25.0),
    ):
        pass
    assert list(tmp_path.iterdir()) == []
    writer = VideoWriter(out, 25.0)
    writer.write(colours(1)[0])
    writer.close()
    with pytest.raises(VideoError, match=re.escape(f"{out}: write after the writer was closed")):
        writer.write(colours(1)[0])


# --- the shared sample video -----------------------------------------------------------------


@pytest.mark.skipif(not MEGAMIND.exists(), reason=f"{MEGAMIND} not present")
def test_reads_the_shared_megamind_clip() -> None:
    info = probe(MEGAMIND)
    assert (info.width, info.height) == (720, 528)
    assert info.fps == pytest.approx(23.976, abs=1e-3)
    assert info.frame_count == 270
    assert info.duration == pytest.approx(270 / 23.976, abs=0.01)
    assert info.has_audio

    frames, times, fps = read_video(MEGAMIND, max_frames=6)
    assert frames.shape == (6, 528, 720, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(23.976, abs=1e-3)
    # the AVI's first frame carries pts 1 (of 125/2997 s); its packed B-frames attach the
    # timestamps out of order, which the reader sorts back: strictly one period apart
    np.testing.assert_allclose(times, (np.arange(6) + 1) * 125 / 2997, atol=1e-6)
