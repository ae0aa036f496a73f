"""`dvp prepare`: a synthetic actor's video -> a complete target directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from streamer.cli.main import main

FAST = ["--set", "renderer.photometric_steps=10", "--set", "renderer.albedo_size=32",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def synth_video(dvp_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "actor"
    assert main(["synth", "-o", str(out), "--frames", "14", "--res", "128", "--seed", "5",
                 "--device", "cpu"]) == 0
    return out / "video.mp4"


def test_prepare_writes_a_target(synth_video: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from generator.target import TargetDir
    from tracker.transfer import Neutral

    out = tmp_path / "target"
    assert main(["prepare", str(synth_video), "-o", str(out), "--consent",
                 "synthetic actor, no real person", "--res", "256", *FAST]) == 0
    assert capsys.readouterr().out.strip().endswith("target")
    target = TargetDir(out)
    meta = yaml.safe_load((out / "target.yaml").read_text())
    assert meta["consent"] == "synthetic actor, no real person"
    assert meta["frames"] == 14 and meta["holdout_start"] == 13 and meta["resolution"] == 256
    x, y, size = meta["crop"]["x"], meta["crop"]["y"], meta["crop"]["size"]
    assert 0 <= x and 0 <= y and x + size <= 128 and y + size <= 128
    params = target.params()
    assert params.valid.all()
    assert params.image_size.tolist() == [256, 256]
    assert np.abs(params.sh).sum() > 0
    assert len(list((out / "frames").iterdir())) == 14
    assert target.frames().shape == (14, 256, 256, 3)
    Neutral.load(out / "neutral.npz")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing aside


def test_prepare_refuses_bad_input(synth_video: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prepare", str(synth_video), "-o", str(tmp_path / "t"), "--consent", " ",
                 *FAST]) == 1
    assert "--consent must record the consent" in capsys.readouterr().err
    (tmp_path / "exists").mkdir()
    assert main(["prepare", str(synth_video), "-o", str(tmp_path / "exists"), "--consent",
                 "ok", *FAST]) == 1
    assert "already exists: choose a new target directory" in capsys.readouterr().err
    assert main(["prepare", str(synth_video), "-o", str(tmp_path / "short"), "--consent",
                 "ok", "--set", "renderer.window=20", *FAST]) == 1
    assert ("the video has 14 frames, fewer than the window of 20"
            in capsys.readouterr().err)
    assert not (tmp_path / "short").exists()


def test_crops_written_on_threads_equal_those_written_on_one(tmp_path: Path) -> None:
    """dvp prepare's crop+write stage (decode in this thread, crop and PNG on threads) gives
    the bytes of the one-thread path, frame for frame, in order."""
    from generator.prepare import write_crops
    from generator.target import TargetWriter

    rng = np.random.default_rng(2)
    video = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(19)]
    written = {}
    for threads in (1, 3):
        counted: list[int] = []
        with TargetWriter(tmp_path / f"t{threads}") as writer:
            write_crops(writer, iter(video), (8, 4, 40), 32, threads, counted.append)
            written[threads] = [p.read_bytes()
                                for p in sorted((writer.staging / "frames").iterdir())]
        assert counted == [1] * 19
    assert len(written[1]) == 19 and written[3] == written[1]
