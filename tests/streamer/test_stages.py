"""LoadedTarget: a target directory with the real conditioning renderer and generator
runtime; the rest pose; load errors that name the problem."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from generator.errors import CheckpointError, TargetError
from streamer.cli.config import load_config
from streamer.live.pipeline import LivePipeline
from streamer.live.stages import LoadedTarget, rest_params
from tests.streamer.stand_ins import make_target_dir, stand_in_stages


def test_real_renderer_and_runtime_make_a_frame(target_dir: Path, face_model: Any) -> None:
    config = load_config(None, [])
    target = LoadedTarget(target_dir, config, torch.device("cpu"), face_model=face_model)
    assert (target.size, target.n_w, target.fps) == (64, 11, 30.0)
    assert target.backend == "cpu"
    cond = target.render(target.rest)
    assert cond.shape == (9, 64, 64) and cond.dtype == torch.float32
    assert 0.0 <= float(cond.min()) and float(cond.max()) <= 1.0
    assert float(cond[:3].sum(0).gt(0).float().mean()) > 0.05  # the face is drawn
    frame = target.generate(torch.cat([cond] * target.n_w))
    assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
    colour = target.colour_image(cond)
    assert colour.shape == (64, 64, 3) and colour.dtype == np.uint8
    # and through a pipeline, one frame
    pipeline = LivePipeline(target, stand_in_stages(target, config), config,
                            eyelook=target.eyelook, eyelook_index=target.eyelook_index)
    out = pipeline.process(np.full((48, 64, 3), 150, np.uint8), 0.0)
    assert out.image.shape == (64, 64, 3)
    pipeline.close()


def test_rest_pose_from_neutral_npz(loaded_target: Any) -> None:
    rest = loaded_target.rest
    assert rest.frames == 1 and bool(rest.valid[0])
    np.testing.assert_allclose(rest.translation, [[0, 0, 50]])
    np.testing.assert_allclose(rest.expression, 0.0)
    params = loaded_target.params
    partial = rest_params(params, {"rotation": np.array([[0.1, 0.0, 0.0]], np.float32),
                                   "gaze": np.full((2, 2), 0.2, np.float32)},
                          loaded_target.eyelook_index)
    np.testing.assert_allclose(partial.rotation, [[0.1, 0.0, 0.0]])
    np.testing.assert_allclose(partial.translation, np.median(params.translation, 0)[None])
    np.testing.assert_allclose(partial.expression[:, loaded_target.eyelook_index],
                               loaded_target.eyelook(partial.gaze))


def test_load_errors_name_the_problem(tmp_path: Path, target_dir: Path, names: list[str],
                                      face_model: Any) -> None:
    config = load_config(None, [])
    untrained = tmp_path / "untrained"
    shutil.copytree(target_dir, untrained)
    shutil.rmtree(untrained / "checkpoints")
    (untrained / "checkpoints").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoint in .*run 'dvp train"):
        LoadedTarget(untrained, config, torch.device("cpu"), face_model=face_model)
    other = make_target_dir(tmp_path / "other", names, size=32)
    shutil.copy(next((other / "checkpoints").iterdir()), untrained / "checkpoints")
    with pytest.raises(TargetError, match="holds a generator for 32 px and a window of 11, "
                                          "but the target is 64 px"):
        LoadedTarget(untrained, config, torch.device("cpu"), face_model=face_model)
    with pytest.raises(TargetError, match="is not a target directory"):
        LoadedTarget(tmp_path / "none", config, torch.device("cpu"), face_model=face_model)

