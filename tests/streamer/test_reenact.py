"""Offline reenactment, the frame-at-a-time reference path (`reenact_serial`, stand-in
stages): layouts, audio kept, the synthetic mark and tag, full-frame checks. The batched
path (`dvp reenact`) is tested in test_offline.py with the same layouts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
import torch

from streamer.cli.config import load_config
from streamer.jobs.reenact import ReenactError, reenact_serial
from streamer.video.io import probe, read_video
from streamer.video.mark import has_synthetic_mark
from tests.streamer.stand_ins import ShadedDiskConditioner, make_target_dir, stand_in_stages


def write_source(path: Path, frames: int = 12, h: int = 96, w: int = 128, fps: int = 15,
                 audio: bool = True) -> Path:
    """A small H.264 video (a bright "face" patch that moves) with a 440 Hz AAC tone."""
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = w, h, "yuv420p"
        sound = out.add_stream("aac", rate=48000, layout="mono") if audio else None
        t = 0
        for i in range(frames):
            rgb = np.full((h, w, 3), (110 + 5 * i, 100, 90), np.uint8)
            rgb[20:60, 10 + 4 * i:50 + 4 * i] = 220
            for packet in video.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in video.encode(None):
            out.mux(packet)
        if sound is not None:
            samples = int(48000 * frames / fps)
            tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 48000) * 32767)
            pcm = tone.astype(np.int16)
            for start in range(0, samples, 1024):
                chunk = pcm[start:start + 1024][None]
                frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
                frame.sample_rate, frame.pts = 48000, t
                t += chunk.shape[1]
                for packet in sound.encode(frame):
                    out.mux(packet)
            for packet in sound.encode(None):
                out.mux(packet)
    return path


def run(target: Any, source: Path, output: Path, overrides: tuple[str, ...] = (),
        **kwargs: Any) -> dict[str, Any]:
    config = load_config(None, list(overrides))
    return reenact_serial(target, source, output, config,
                         stages=lambda: stand_in_stages(target, config), progress=False,
                         **kwargs)


def test_reenact_keeps_timing_and_audio_and_marks(loaded_target: Any, tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4")
    out = tmp_path / "out.mp4"
    summary = run(loaded_target, source, out, mode="face")
    assert summary["frames"] == 12 and summary["faces"] == 12
    assert set(summary["stage_ms"]) >= {"render", "generator"}
    info = probe(out)
    assert (info.width, info.height, info.frame_count) == (64, 64, 12)
    assert info.fps == pytest.approx(15.0)
    assert info.has_audio
    with av.open(str(out)) as container:
        assert container.metadata.get("synthetic") == "true"
        assert container.metadata.get("comment", "").startswith("synthetic:")
    frames = read_video(out)[0]
    assert all(has_synthetic_mark(f, contrast=30.0) for f in frames)


def test_side_by_side_layout(loaded_target: Any, tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", audio=False)
    out = tmp_path / "sbs.mp4"
    run(loaded_target, source, out, side_by_side=True)
    frames = read_video(out)[0]
    assert frames.shape[1:] == (64, 86 + 64 + 64, 3)  # 128 x 96 scaled to 86 x 64
    assert has_synthetic_mark(frames[0][:, -64:], contrast=30.0)  # on the output panel
    assert not has_synthetic_mark(frames[0][:, :86], contrast=30.0)  # not on the source
    conditioning = frames[0][:, 86:150].astype(float)
    assert conditioning.std() > 5  # the colour rendering is shown


def test_mark_off_by_config_but_the_tag_stays(loaded_target: Any, tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", frames=4, audio=False)
    out = tmp_path / "plain.mp4"
    run(loaded_target, source, out, overrides=("streamer.synthetic_mark=false",))
    assert not any(has_synthetic_mark(f, contrast=30.0) for f in read_video(out)[0])
    with av.open(str(out)) as container:
        assert container.metadata.get("synthetic") == "true"


@pytest.fixture()
def full_frame_target(tmp_path: Path, names: list[str], face_model: Any) -> Any:
    from streamer.live.stages import LoadedTarget

    video = write_source(tmp_path / "target-video.mp4", frames=8, h=120, w=160, audio=False)
    root = make_target_dir(tmp_path / "ff-target", names, source_video=video,
                           crop=(40, 20, 64))
    return LoadedTarget(root, load_config(None, []), torch.device("cpu"),
                        conditioner=ShadedDiskConditioner(64), face_model=face_model)


def test_full_frame_pastes_into_the_target_video(full_frame_target: Any,
                                                 tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", frames=10, audio=False)
    out = tmp_path / "full.mp4"
    run(full_frame_target, source, out, full_frame=True)
    frames = read_video(out)[0]
    assert frames.shape == (10, 120, 160, 3)
    background = read_video(Path(full_frame_target.info.source_video))[0]
    outside = np.abs(frames[0, :100, :36].astype(int) - background[0, :100, :36]).mean()
    assert outside < 4  # left of the crop (above the mark): the target's own frame
    inside = np.abs(frames[0, 28:76, 48:96].astype(int) - background[0, 28:76, 48:96]).mean()
    assert inside > 10  # the crop shows the reenacted portrait
    assert has_synthetic_mark(frames[0], contrast=30.0)


def test_full_frame_needs_the_unchanged_target_video(full_frame_target: Any,
                                                     tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", frames=3, audio=False)
    video = Path(full_frame_target.info.source_video)
    with open(video, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ReenactError, match="has changed since 'dvp prepare' made"):
        run(full_frame_target, source, tmp_path / "a.mp4", full_frame=True)
    video.unlink()
    with pytest.raises(ReenactError, match=r"--full-frame needs the target's source video, "
                                           r"but .*target-video.mp4 \(source_video in"):
        run(full_frame_target, source, tmp_path / "b.mp4", full_frame=True)
    assert not (tmp_path / "a.mp4").exists() and not (tmp_path / "b.mp4").exists()


def test_unknown_mode_and_conflicting_layouts(loaded_target: Any, tmp_path: Path) -> None:
    source = write_source(tmp_path / "src.mp4", frames=2, audio=False)
    with pytest.raises(ReenactError, match="unknown mode 'wild'"):
        run(loaded_target, source, tmp_path / "x.mp4", mode="wild")
    with pytest.raises(ReenactError, match="exclude each other"):
        run(loaded_target, source, tmp_path / "x.mp4", side_by_side=True, full_frame=True)


def write_plain(path: Path, frames: int, dark: tuple[int, ...] = ()) -> Path:
    """A silent video (written with the index up front, as dvp writes them) whose frames
    have a "face" for the stand-in tracker, but for the `dark` ones."""
    from streamer.video.io import VideoWriter

    rng = np.random.default_rng(1)
    with VideoWriter(path, fps=15.0) as writer:
        for i in range(frames):
            level = 5 if i in dark else 120
            writer.write(rng.integers(level, level + 10, (96, 128, 3), dtype=np.uint8), i / 15)
    return path


def test_a_truncated_source_is_reported_and_strict_refuses_it(loaded_target: Any,
                                                             tmp_path: Path) -> None:
    from streamer.jobs.coverage import PartialResultError

    source = write_plain(tmp_path / "src.mp4", 40)
    data = source.read_bytes()
    source.write_bytes(data[:len(data) * 4 // 10])  # the end of the file is lost
    summary = run(loaded_target, source, tmp_path / "out.mp4")
    decoded = summary["frames"]
    assert 0 < decoded < 40
    assert summary["warning"] == (f"{source}: only {decoded} of 40 frames could be decoded (the "
                                  "file ends early or is damaged); --strict makes this an error")
    with pytest.raises(PartialResultError) as err:
        run(loaded_target, source, tmp_path / "strict.mp4", strict=True)
    assert str(err.value) == (f"{source}: only {decoded} of 40 frames could be decoded (the file "
                              "ends early or is damaged) (--strict: nothing written)")
    assert not (tmp_path / "strict.mp4").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mp4", "src.mp4"]


def test_frames_without_a_face_are_reported(loaded_target: Any, tmp_path: Path) -> None:
    some = run(loaded_target, write_plain(tmp_path / "some.mp4", 6, dark=(2, 3, 4)),
               tmp_path / "a.mp4")
    assert some["warning"] == (f"{tmp_path / 'some.mp4'}: a face was found in 3 of 6 frames "
                               "(they show the target at rest); --strict makes this an error")
    none = run(loaded_target, write_plain(tmp_path / "none.mp4", 4, dark=(0, 1, 2, 3)),
               tmp_path / "b.mp4")
    assert none["warning"] == (f"{tmp_path / 'none.mp4'}: no face was found in any of the 4 "
                               "frames (they show the target at rest); --strict makes this an "
                               "error")
    whole = run(loaded_target, write_plain(tmp_path / "whole.mp4", 4), tmp_path / "c.mp4")
    assert whole["warning"] is None
