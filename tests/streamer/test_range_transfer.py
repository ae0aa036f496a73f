"""The live transfer stage with a target that has pose ranges: ranges computed on load
(older targets) and read from ranges.npz, the `adapt` and `raw` settings, the source's
neutral from its first resting frames, the offline statistics, `--range` on the CLI."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from streamer.cli.config import load_config
from streamer.live.controls import Controls
from streamer.live.stages import LoadedTarget, TransferStage, source_statistics
from tests.actors import moving
from tests.streamer.stand_ins import ShadedDiskConditioner, make_target_dir
from tracker.params import FaceParams
from tracker.ranges import Ranges, RangesError, inside
from tracker.transfer import Neutral


@pytest.fixture(scope="module")
def moving_target_dir(tmp_path_factory: pytest.TempPathFactory, names: list[str]) -> Path:
    """A target whose tracked frames turn +-5 degrees and shift +-1 cm (no ranges.npz: a
    target made before they existed)."""
    root = make_target_dir(tmp_path_factory.mktemp("ranges") / "moving", names, frames=40)
    params = moving(names, 40, 0, yaw_deg=5.0, shift_cm=1.0, jaw=0.3)
    params = replace(params, image_size=np.asarray([64, 64]),
                     principal_point=np.asarray([32.0, 32.0], np.float32))
    params.save(root / "params.npz")
    Neutral.from_params(params).save(root / "neutral.npz")
    return root


def load(root: Path, face_model: Any, *overrides: str) -> LoadedTarget:
    return LoadedTarget(root, load_config(None, list(overrides)), torch.device("cpu"),
                        conditioner=ShadedDiskConditioner(64), face_model=face_model)


def frame(names: list[str], t: float, yaw_deg: float = 0.0, shift: float = 0.0,
          jaw: float = 0.0) -> FaceParams:
    p = FaceParams.empty(1, names, (480, 640), 800.0, timestamps=np.array([t]))
    expression = p.expression.copy()
    expression[0, names.index("jawOpen")] = jaw
    return replace(p, rotation=np.array([[0.0, np.radians(yaw_deg), 0.0]], np.float32),
                   translation=np.array([[shift, 0.0, 60.0]], np.float32),
                   expression=expression, valid=np.ones(1, bool))


def test_ranges_computed_on_load_then_read_from_the_file(moving_target_dir: Path,
                                                         face_model: Any) -> None:
    assert not (moving_target_dir / "ranges.npz").exists()
    target = load(moving_target_dir, face_model)
    assert target.ranges is not None
    assert target.ranges.frames == target.info.holdout_start  # the training frames only
    train = target.params.select(slice(0, target.info.holdout_start))
    expected = Ranges.from_params(train, target.neutral_params)
    np.testing.assert_allclose(target.ranges.rotation, expected.rotation)
    assert not (moving_target_dir / "ranges.npz").exists()  # computed, not written
    # a stored file is read as it is
    stored = replace(expected, rotation=expected.rotation * 0.5)
    stored.save(moving_target_dir / "ranges.npz")
    try:
        again = load(moving_target_dir, face_model)
        np.testing.assert_allclose(again.ranges.rotation, stored.rotation)
        (moving_target_dir / "ranges.npz").write_bytes(b"not a zip")
        with pytest.raises(Exception, match=r"ranges.npz: not a ranges .npz file .*delete "
                                            "it to have it computed again"):
            load(moving_target_dir, face_model)
    finally:
        (moving_target_dir / "ranges.npz").unlink()


def test_adapt_keeps_a_far_moving_source_inside_raw_does_not(moving_target_dir: Path,
                                                              face_model: Any,
                                                              names: list[str]) -> None:
    results = {}
    for setting in ("adapt", "raw"):
        target = load(moving_target_dir, face_model, f"transfer.range={setting}")
        stage = TransferStage(target, target.config)
        outs = []
        for i in range(300):  # 1 s at rest, then swings of +-30 degrees and +-8 cm
            t = i / 25.0
            swing = np.sin(2 * np.pi * (t - 1.0) / 3.0) if t >= 1.0 else 0.0
            outs.append(stage(frame(names, t, 30.0 * swing, 8.0 * swing), Controls()))
        seq = outs[0]
        seq = replace(seq, **{k: np.concatenate([getattr(o, k) for o in outs])
                              for k in ("rotation", "translation", "expression", "gaze", "sh",
                                        "valid", "timestamps")})
        results[setting] = inside(seq, target.neutral_params, target.ranges)
        if setting == "adapt":  # smooth: never a step larger than the source's own
            yaw = np.degrees(seq.rotation[:, 1] - target.neutral_params.rotation[1])
            step = 30.0 * 2 * np.pi / 3.0 / 25.0
            assert np.max(np.abs(np.diff(yaw))) <= step * 1.01
    assert results["adapt"].all()
    assert results["raw"].mean() < 0.5


def test_live_neutral_waits_for_a_resting_face(loaded_target: Any, names: list[str]) -> None:
    stage = TransferStage(loaded_target, load_config(None, []))
    # talking with the head turned away first, then resting: turned 5 deg, mouth closed
    for i in range(10):
        stage(frame(names, i * 0.04, yaw_deg=25.0 + i, jaw=0.5), Controls())
    assert not stage.neutral_settled  # nothing rested yet
    for i in range(10, 30):
        stage(frame(names, i * 0.04, yaw_deg=5.0, jaw=0.05), Controls())
    assert stage.neutral_settled
    assert np.degrees(stage.source_neutral.rotation[1]) == pytest.approx(5.0, abs=1e-3)
    out = stage(frame(names, 1.3, yaw_deg=5.0, jaw=0.05), Controls())
    np.testing.assert_allclose(out.rotation, loaded_target.rest.rotation, atol=1e-5)
    stage.set_neutral()
    for i in range(20):
        stage(frame(names, 2.0 + i * 0.04, yaw_deg=-3.0), Controls())
    assert np.degrees(stage.source_neutral.rotation[1]) == pytest.approx(-3.0, abs=1e-3)


def test_offline_statistics_from_the_whole_source(moving_target_dir: Path, face_model: Any,
                                                  names: list[str]) -> None:
    target = load(moving_target_dir, face_model)
    source = moving(names, 500, 3, yaw_deg=30.0, shift_cm=8.0, jaw=0.9)
    rot, trans, expr = source.rotation.copy(), source.translation.copy(), \
        source.expression.copy()
    rot[300:350] = [0.0, np.radians(2.0), 0.0]  # a rest in the middle, turned 2 degrees
    trans[300:350] = [0.0, 0.0, 60.0]
    expr[300:350] = 0.0
    source = replace(source, rotation=rot, translation=trans, expression=expr)
    neutral, spread = source_statistics(source, target.config)
    assert np.degrees(neutral.rotation[1]) == pytest.approx(2.0, abs=0.1)
    assert np.degrees(spread.rotation[:, 1]) == pytest.approx([-32.0, 28.0], abs=1.0)
    stage = TransferStage(target, target.config)
    stage.use_source_statistics(neutral, spread)
    outs = [stage(source.select([i]), Controls()) for i in range(0, 500, 5)]
    assert stage.source_neutral is neutral  # fixed: never collected again
    yaw = np.degrees([o.rotation[0, 1] for o in outs])
    lo, hi = np.degrees(target.ranges.rotation[:, 1] + target.neutral_params.rotation[1])
    assert lo <= yaw.min() and yaw.max() <= hi
    assert yaw.max() - yaw.min() > 0.7 * (hi - lo)  # the source's swing, scaled in


def test_bad_range_setting_is_named(loaded_target: Any) -> None:
    with pytest.raises(RangesError, match="transfer.range must be one of adapt, raw, got "
                                          "'wild'"):
        TransferStage(loaded_target, load_config(None, ["transfer.range=wild"]))


def test_range_flag_on_reenact_and_serve() -> None:
    from streamer.cli.main import build_parser

    parser = build_parser()
    for command in (["reenact", "T", "--source", "s.mp4", "-o", "o.mp4", "--range", "raw",
                     "--report", "r.json"], ["serve", "T", "--range", "raw"]):
        args = parser.parse_args(command)
        assert args.range == "raw"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "T", "--range", "wide"])
