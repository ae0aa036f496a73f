"""The target directory: writing it aside, loading it, and the exact errors of a bad one."""

import os
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from generator.errors import TargetError
from generator.target import (
    FORMAT_VERSION,
    TargetDir,
    TargetInfo,
    TargetWriter,
    holdout_start_for,
    software_versions,
)
from tracker.params import FaceParams

NAMES = [f"e{i}" for i in range(53)]


def make_target(root: Path, frames: int = 12, size: int = 32) -> TargetDir:
    rng = np.random.default_rng(0)
    with TargetWriter(root) as w:
        for _ in range(frames):
            w.add_frame(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        w.write_params(FaceParams.empty(frames, NAMES, (size, size), 40.0))
        w.write_albedo(np.full((16, 16, 3), 128, np.uint8))
        w.write_neutral({"rotation": np.zeros(3, np.float32),
                         "expression": np.zeros(53, np.float32)})
        info = TargetInfo(
            source_video="in.mp4", source_sha256="0" * 64, crop=(10, 20, 300),
            resolution=size, window=11, preset="tiny", holdout_start=holdout_start_for(frames),
            frames=frames, fps=30.0, consent="the actor agreed", software=software_versions())
        return w.commit(info)


def test_written_target_loads_with_its_info(tmp_path):
    target = make_target(tmp_path / "t")
    again = TargetDir(tmp_path / "t")
    assert again.info == target.info
    assert again.info.crop == (10, 20, 300) and again.info.holdout_start == 11
    meta = yaml.safe_load((tmp_path / "t" / "target.yaml").read_text())
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["source_video"] == {"path": "in.mp4", "sha256": "0" * 64}
    assert {"dvp", "python", "torch", "numpy"} <= set(meta["software"])
    assert sorted(os.listdir(tmp_path / "t")) == [
        "albedo.png", "checkpoints", "engine", "frames", "neutral.npz", "params.npz",
        "samples", "target.yaml"]
    assert sorted(os.listdir(tmp_path)) == ["t"]  # no staging folder left
    frames = again.frames()
    assert frames.shape == (12, 32, 32, 3) and frames.dtype == np.uint8
    assert np.array_equal(frames[3], again.frame(3))
    assert again.params().frames == 12


def test_missing_files_are_named(tmp_path):
    make_target(tmp_path / "t")
    (tmp_path / "t" / "albedo.png").unlink()
    (tmp_path / "t" / "frames" / "000004.png").unlink()
    (tmp_path / "t" / "frames" / "000009.png").unlink()
    with pytest.raises(TargetError) as err:
        TargetDir(tmp_path / "t")
    assert str(err.value) == (f"target directory {tmp_path / 't'} is incomplete: missing "
                              "albedo.png, frames/000004.png (and 1 more frames)")


def test_wrong_format_version(tmp_path):
    make_target(tmp_path / "t")
    meta = tmp_path / "t" / "target.yaml"
    data = yaml.safe_load(meta.read_text())
    data["format_version"] = 7
    meta.write_text(yaml.safe_dump(data))
    with pytest.raises(TargetError) as err:
        TargetDir(tmp_path / "t")
    assert str(err.value) == (f"{meta} has format_version 7; this dvp reads format_version 1 "
                              "(make the target again with 'dvp prepare')")


def test_not_a_target_directory(tmp_path):
    with pytest.raises(TargetError) as err:
        TargetDir(tmp_path)
    assert str(err.value) == (f"{tmp_path} is not a target directory: target.yaml is missing "
                              "(make one with 'dvp prepare')")


def test_missing_keys_are_named(tmp_path):
    make_target(tmp_path / "t")
    meta = tmp_path / "t" / "target.yaml"
    data = yaml.safe_load(meta.read_text())
    del data["fps"], data["consent"]
    meta.write_text(yaml.safe_dump(data))
    with pytest.raises(TargetError, match=re.escape(f"{meta} is missing key(s): fps, consent")):
        TargetDir(tmp_path / "t")


def test_a_failed_prepare_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="tracking failed"), TargetWriter(tmp_path / "t") as w:
        w.add_frame(np.zeros((32, 32, 3), np.uint8))
        raise RuntimeError("tracking failed")
    assert os.listdir(tmp_path) == []


def test_an_existing_directory_is_not_overwritten(tmp_path):
    (tmp_path / "t").mkdir()
    with pytest.raises(TargetError) as err:
        TargetWriter(tmp_path / "t")
    assert str(err.value) == f"{tmp_path / 't'} already exists: choose a new target directory"


def test_holdout_is_the_last_tenth():
    assert holdout_start_for(1500) == 1350
    assert holdout_start_for(12) == 11
    assert holdout_start_for(5) == 4


def test_frames_written_on_threads_equal_those_written_one_at_a_time(tmp_path):
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(17)]
    with TargetWriter(tmp_path / "serial") as one:
        for rgb in frames:
            one.add_frame(rgb)
        serial = {p.name: p.read_bytes() for p in (one.staging / "frames").iterdir()}
    written: list[int] = []
    with TargetWriter(tmp_path / "threads") as many:
        assert many.add_frames(iter(frames), threads=3, progress=written.append) == 17
        threaded = {p.name: p.read_bytes() for p in (many.staging / "frames").iterdir()}
    assert many.n_frames == 17 and written == [1] * 17
    assert len(serial) == 17 and threaded == serial  # same names, same bytes: order kept


def test_a_frame_that_cannot_be_written_is_named(tmp_path):
    def frames(writer: TargetWriter):
        (writer.staging / "frames").rmdir()  # the disk loses the folder under the writes
        for _ in range(5):
            yield np.zeros((8, 8, 3), np.uint8)

    with pytest.raises(TargetError) as err, TargetWriter(tmp_path / "t") as w:
        w.add_frames(frames(w), threads=2)
    assert str(err.value).startswith("cannot write frame 000000.png of the target ([Errno 2] "
                                     "No such file or directory")
    assert os.listdir(tmp_path) == []


def test_a_frame_of_another_size_stops_the_threaded_writes(tmp_path):
    sizes = [16, 16, 16, 20, 16]
    with pytest.raises(ValueError) as err, TargetWriter(tmp_path / "t") as w:
        w.add_frames((np.zeros((s, s, 3), np.uint8) for s in sizes), threads=2)
    assert str(err.value) == "frame 3 is 20 px, others 16 px"
    assert os.listdir(tmp_path) == []
