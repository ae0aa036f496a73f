"""No silent slow paths: what `auto` picks is logged once, with why a faster one was not
used, and the CLI shows it at its default log level."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from tracker.choices import forget_choices, report_choice

LOGGER = "tracker.choices"


@pytest.fixture(autouse=True)
def fresh() -> Iterator[None]:
    forget_choices()
    yield
    forget_choices()


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_choice_is_reported_once(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert report_choice("thing", "slow", "fast one absent: install it")
        assert not report_choice("thing", "slow", "fast one absent: install it")
        assert report_choice("thing", "fast")
    assert lines(caplog) == ["thing: slow (fast one absent: install it)", "thing: fast"]


def test_device_rasterizer_runtime_and_landmarks_say_what_auto_chose(
        caplog: pytest.LogCaptureFixture) -> None:
    from generator.runtime import make_runtime
    from generator.unet import UNet
    from renderer.raster import resolve_backend
    from tracker.config import TrackerConfig
    from tracker.device import pick_device
    from tracker.landmarks import make_landmark_detector

    cpu = torch.device("cpu")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        if not torch.cuda.is_available():
            assert pick_device("auto") == cpu
        assert resolve_backend("auto", cpu) == "reference"
        assert resolve_backend("auto", cpu) == "reference"  # once
        assert make_runtime(UNet(size=32, n_w=2, ngf=4), "auto", cpu).backend == "cpu"
        make_landmark_detector(TrackerConfig(), cpu).close()
        resolve_backend("reference", cpu)  # asked for by name: nothing to report
    got = lines(caplog)
    expected = [
        "rasterizer: reference (plain torch on cpu; the CuPy kernel needs a CUDA device)",
        ("generator runtime: cpu (fp32 on cpu; 'torch' (fp16, CUDA graphs) and 'tensorrt' "
        "need a CUDA device)"),
        ("landmarks: mediapipe (CPU) (auto on the CPU, where MediaPipe is faster than the "
        "torch port)"),
    ]
    if not torch.cuda.is_available():
        expected.insert(0, "device: cpu (no CUDA GPU visible to torch, everything runs on "
                           "the CPU, slowly)" if torch.version.cuda else
                           "device: cpu (this torch is a CPU build: install a CUDA build of "
                           "torch to use a GPU)")
    assert got == expected


def test_the_cli_shows_the_choices_at_its_default_level(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, face_model: object) -> None:
    from streamer.cli.main import main
    from tracker.params import FaceParams

    params = FaceParams.empty(2, list(face_model.expression_names), (64, 64),  # type: ignore[attr-defined]
                              focal=150.0)
    params.save(tmp_path / "p.npz")
    assert logging.getLogger().getEffectiveLevel() == logging.WARNING  # as in `dvp`
    try:
        assert main(["render", str(tmp_path / "p.npz"), "-o", str(tmp_path / "c.mp4"),
                     "--res", "64", "--device", "cpu"]) == 0
        assert logging.getLogger(LOGGER).getEffectiveLevel() == logging.INFO
    finally:
        logging.getLogger(LOGGER).setLevel(logging.NOTSET)
    got = lines(caplog)
    assert "rasterizer: reference (plain torch on cpu; the CuPy kernel needs a CUDA device)" \
        in got
    assert not [r for r in caplog.records if r.levelno < logging.WARNING
                and r.name != LOGGER]


def test_regressor_training_shows_a_progress_bar(tmp_path: Path, face_model: object,
                                                 capsys: pytest.CaptureFixture[str],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from tracker.regressor import RegressorSettings, cache_path, load_or_train

    tiny = RegressorSettings(samples=1500, epochs=2, components=16, hidden=32)
    with caplog.at_level(logging.WARNING, logger="tracker.regressor"):
        load_or_train(face_model, tiny, home=tmp_path)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert re.search(r"regressor: +\d+%\|.*\| \d+/10 ", err)  # 1500 samples / 256 x 2 epochs
    assert "training the landmark regressor (1500 samples, 2 epochs; once, cached at" in \
        caplog.text
    assert cache_path(__import__("tracker.fitting").fitting.LandmarkModel(face_model),  # type: ignore[arg-type]
                      tiny, tmp_path).is_file()
    caplog.clear()
    load_or_train(face_model, tiny, home=tmp_path)  # type: ignore[arg-type]
    assert "training" not in caplog.text and "regressor:" not in capsys.readouterr().err


def test_assets_install_trains_the_regressor(dvp_home: Path, assets_dir: Path,
                                             face_model: object,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from streamer.cli.main import main
    from tracker.fitting import LandmarkModel
    from tracker.regressor import RegressorSettings, cache_path

    settings = RegressorSettings(samples=1600, epochs=1, seed=int(np.uint16(12345)))
    path = cache_path(LandmarkModel(face_model), settings, dvp_home)  # type: ignore[arg-type]
    path.unlink(missing_ok=True)
    assert main(["assets", "install", "--from", str(assets_dir),
                 "--set", "tracker.regressor_samples=1600", "--set",
                 "tracker.regressor_epochs=1", "--set", "tracker.regressor_seed=12345"]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == str(dvp_home / "face-model-v3")
    assert re.search(r"regressor: +\d+%\|.*\| \d+/6 ", out.err)  # 1600 / 256 x 1 epoch
    assert path.is_file()
    path.unlink()
