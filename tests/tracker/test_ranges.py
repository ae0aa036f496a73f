"""Pose ranges (tracker/ranges.py): the soft limit, the per-axis scale, the ranges file,
the inside check, the transfer's `adapt` setting, the live spread estimate, and the
source's neutral from its resting frames (tracker/transfer.py)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.actors import moving
from tracker.config import TransferConfig
from tracker.face_model import EYELOOK_NAMES, gaze_to_eyelook
from tracker.ranges import (
    RangeMap,
    Ranges,
    RangesError,
    SpreadEstimate,
    check_range_setting,
    inside,
    range_scale,
    relative_pose,
    soft_limit,
)
from tracker.transfer import Neutral, TransferError, rest_frames, rest_scores, transfer


@pytest.fixture(scope="module")
def names(face_model) -> list[str]:  # type: ignore[no-untyped-def]
    return list(face_model.expression_names)


def zero_neutral(names: list[str], depth: float = 60.0) -> Neutral:
    return Neutral.zero(len(names), depth)


def test_soft_limit_is_smooth_bounded_and_keeps_the_middle() -> None:
    x = np.linspace(-10, 10, 4001)
    y = soft_limit(x, -1.0, 2.0, knee=0.8)
    middle = (x >= -0.8) & (x <= 1.6)
    np.testing.assert_allclose(y[middle], x[middle])  # the identity inside the knee
    assert y.max() <= 2.0 and y.min() >= -1.0  # never past the extremes
    assert y.max() > 1.99 and y.min() < -0.99  # but bends toward them
    near = np.abs(x) <= 3.0
    assert y[near].max() < 2.0 and y[near].min() > -1.0
    assert np.all(np.diff(y) >= 0)  # monotonic
    slope = np.diff(y) / np.diff(x)
    assert np.max(np.abs(np.diff(slope))) < 0.05  # no kink (a hard clip: a step of 1)
    assert soft_limit(np.asarray(0.0), -1.0, 2.0) == 0.0
    # a side of zero width: that way stays at the neutral, the other is untouched
    np.testing.assert_allclose(soft_limit(np.asarray([-3.0, 0.5]), 0.0, 5.0), [0.0, 0.5])


def test_scale_compresses_a_wider_source_and_never_amplifies() -> None:
    np.testing.assert_allclose(range_scale(np.array([2.0, 2.0, 2.0]),
                                           np.array([4.0, 1.0, 0.0])), [0.5, 1.0, 1.0])
    np.testing.assert_allclose(range_scale(np.array([2.0]), None), [1.0])


def test_ranges_from_params_save_load_and_errors(names: list[str], tmp_path: Path) -> None:
    p = moving(names, 400, 0, yaw_deg=10.0, shift_cm=2.0, jaw=0.4)
    neutral = zero_neutral(names)
    r = Ranges.from_params(p, neutral)
    assert r.frames == 400
    assert np.degrees(r.rotation[:, 1]) == pytest.approx([-10.0, 10.0], abs=0.1)
    assert r.translation[:, 0] == pytest.approx([-2.0, 2.0], abs=0.02)
    assert r.expression[:, names.index("jawOpen")] == pytest.approx([0.0, 0.4], abs=0.01)
    loaded = Ranges.load(r.save(tmp_path / "ranges.npz"))
    for key in ("rotation", "translation", "expression", "gaze"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(r, key))
    assert loaded.matches(neutral)
    assert not loaded.matches(Neutral.zero(len(names), 70.0))
    with pytest.raises(RangesError, match="no such ranges file"):
        Ranges.load(tmp_path / "none.npz")
    np.savez(tmp_path / "bad.npz", rotation=np.zeros((2, 3)))
    with pytest.raises(RangesError, match=r"bad.npz: missing key 'translation'"):
        Ranges.load(tmp_path / "bad.npz")
    with pytest.raises(RangesError, match="cannot measure ranges: no frame has a face"):
        Ranges.from_params(replace(p, valid=np.zeros(400, bool)), neutral)
    with pytest.raises(RangesError, match="ranges 'rotation' has a low end above its high"):
        replace(r, rotation=r.rotation[::-1])
    with pytest.raises(RangesError, match="transfer.range must be one of adapt, raw, "
                                          "got 'wide'"):
        check_range_setting("wide")


def test_inside_widens_by_a_tenth_of_the_spread(names: list[str]) -> None:
    target = moving(names, 400, 0, yaw_deg=10.0, shift_cm=2.0, jaw=0.4)
    neutral = zero_neutral(names)
    r = Ranges.from_params(target, neutral)
    probe = target.select(np.zeros(5, np.int64))
    hi, lo = float(r.translation[1, 0]), float(r.translation[0, 0])
    spread = float(r.rotation[1, 1] - r.rotation[0, 1])
    rot = np.zeros((5, 3), np.float32)
    rot[:, 1] = [0.0, r.rotation[1, 1] + 0.09 * spread, r.rotation[1, 1] + 0.11 * spread,
                 0.0, 0.0]
    trans = np.tile(neutral.translation, (5, 1))
    trans[3:, 0] += [lo - 0.09 * (hi - lo), lo - 0.11 * (hi - lo)]
    ok = inside(replace(probe, rotation=rot, translation=trans), neutral, r)
    assert ok.tolist() == [True, True, False, True, False]


def test_adapt_keeps_a_wide_source_inside_the_target(names: list[str]) -> None:
    target = moving(names, 500, 0, yaw_deg=5.0, shift_cm=1.0, jaw=0.3)
    source = moving(names, 500, 1, yaw_deg=30.0, shift_cm=8.0, jaw=0.9)
    tn, sn = zero_neutral(names), zero_neutral(names)
    t_ranges, s_spread = Ranges.from_params(target, tn), Ranges.from_params(source, sn)
    raw = transfer(source, sn, target.select([0]), tn, "full")
    assert inside(raw, tn, t_ranges).mean() < 0.5
    rmap = RangeMap(t_ranges, s_spread, narrow=0.5, knee=0.8)
    out = transfer(source, sn, target.select([0]), tn, "full", ranges=rmap)
    assert inside(out, tn, t_ranges, widen=0.0).all()  # inside the target's own range
    rot, trans = relative_pose(out, tn)
    # scaled by spread (about 5 / 30) first: the motion keeps its shape, not clipped flat
    assert np.corrcoef(rot[:, 1], source.rotation[:, 1])[0, 1] > 0.99
    assert np.corrcoef(trans[:, 0], source.translation[:, 0])[0, 1] > 0.99
    assert np.ptp(rot[:, 1]) > 0.8 * np.ptp(t_ranges.rotation[:, 1])
    jaw = names.index("jawOpen")
    assert out.expression[:, jaw].max() <= t_ranges.expression[1, jaw] + 1e-6
    assert np.corrcoef(out.expression[:, jaw], source.expression[:, jaw])[0, 1] > 0.99
    # a coefficient with a wide target range passes as in raw; eyeLook follows gaze
    wide = RangeMap(t_ranges, s_spread, narrow=0.2)
    np.testing.assert_allclose(
        transfer(source, sn, target.select([0]), tn, "full", ranges=wide).expression[:, jaw],
        raw.expression[:, jaw], atol=1e-6)
    idx = [names.index(n) for n in EYELOOK_NAMES]
    np.testing.assert_allclose(out.expression[:, idx], gaze_to_eyelook(out.gaze), atol=1e-6)
    assert np.all(out.gaze >= t_ranges.gaze[0] - 1e-6) and \
        np.all(out.gaze <= t_ranges.gaze[1] + 1e-6)
    # the source at its neutral is the target at its neutral, in both settings
    at_rest = replace(source.select([0]), rotation=np.zeros((1, 3), np.float32),
                      translation=sn.translation[None].copy(),
                      expression=sn.expression[None].copy(), gaze=sn.gaze[None].copy())
    rest = transfer(at_rest, sn, target.select([0]), tn, "full", ranges=rmap)
    np.testing.assert_allclose(rest.rotation, 0.0, atol=1e-6)
    np.testing.assert_allclose(rest.translation[0], tn.translation, atol=1e-5)


def test_live_spread_estimate_eases_in(names: list[str]) -> None:
    target = moving(names, 500, 0, yaw_deg=5.0, shift_cm=1.0, jaw=0.3)
    tn = zero_neutral(names)
    t_ranges = Ranges.from_params(target, tn)
    source = moving(names, 500, 1, yaw_deg=20.0, shift_cm=4.0, jaw=0.3)
    est = SpreadEstimate(window_seconds=60.0, min_seconds=5.0, smoothing_seconds=2.0)
    yaw = []
    for i in range(source.frames):
        est.add(source.select([i]))
        yaw.append(float(est.scales(t_ranges, tn, 1.0, float(source.timestamps[i]))
                         ["rotation"][1]))
    yaw_scale = np.asarray(yaw)
    assert np.all(yaw_scale[:125] == 1.0)  # fewer than 5 s seen: the soft limit only
    assert np.max(np.abs(np.diff(yaw_scale))) < 0.05  # eases, never jumps
    assert yaw_scale[-1] == pytest.approx(0.25, abs=0.03)  # 5 deg / 20 deg


def test_neutral_from_the_resting_frames(names: list[str]) -> None:
    cfg = TransferConfig()
    p = moving(names, 250, 2, yaw_deg=25.0, shift_cm=3.0, jaw=0.6)
    rest = slice(150, 180)  # still, frontal, mouth closed, turned 3 deg (its own neutral)
    rot, trans, expr = p.rotation.copy(), p.translation.copy(), p.expression.copy()
    rot[rest] = [0.0, np.radians(3.0), 0.0]
    trans[rest] = [0.5, 0.0, 60.0]
    expr[rest, names.index("jawOpen")] = 0.05
    p = replace(p, rotation=rot, translation=trans, expression=expr)
    scores = rest_scores(p, cfg)
    chosen = rest_frames(p, cfg)
    assert set(range(151, 179)) <= set(chosen.tolist())  # the ends jump: not still
    assert scores[60] > 1.0  # mid-swing: fast, turned, mouth open
    n = Neutral.from_rest(p, cfg)
    assert np.degrees(n.rotation[1]) == pytest.approx(3.0, abs=0.3)
    assert n.translation[0] == pytest.approx(0.5, abs=0.05)
    assert n.expression[names.index("jawOpen")] == pytest.approx(0.05, abs=0.01)
    # a face that never rests: the frames nearest to rest
    never = replace(p, expression=np.full_like(p.expression, 0.7))
    assert len(rest_frames(never, cfg)) == 5
    # the first frame with a face has no neighbour before it, a lone face none at all
    lone = replace(p, valid=np.eye(1, 250, 100, dtype=bool)[0])
    assert np.isinf(rest_scores(lone, cfg)).all()
    with pytest.raises(TransferError, match="cannot estimate a neutral: no frame has a face"):
        Neutral.from_rest(replace(p, valid=np.zeros(250, bool)), cfg)
