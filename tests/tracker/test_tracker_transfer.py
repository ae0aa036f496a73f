"""Transfer modes relative to each actor's neutral, and the neutral file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tracker.face_model import EYELOOK_NAMES, gaze_to_eyelook
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix, matrix_to_axis_angle
from tracker.transfer import Edit, Neutral, TransferError, mode_mask, transfer


def _names(face_model) -> list[str]:  # type: ignore[no-untyped-def]
    return list(face_model.expression_names)


def _params(names: list[str], frames: int, seed: int) -> FaceParams:
    rng = np.random.default_rng(seed)
    p = FaceParams.empty(frames, names, (480, 640), 600.0)
    gaze = rng.uniform(-0.2, 0.2, (frames, 2, 2)).astype(np.float32)
    expr = rng.uniform(0.0, 0.6, (frames, len(names))).astype(np.float32)
    idx = [names.index(n) for n in EYELOOK_NAMES]
    expr[:, idx] = gaze_to_eyelook(gaze)
    return replace(p, rotation=rng.uniform(-0.3, 0.3, (frames, 3)).astype(np.float32),
                   translation=(np.asarray([0, 0, 60.0]) + rng.uniform(-3, 3, (frames, 3))
                                ).astype(np.float32),
                   expression=expr, gaze=gaze, valid=np.ones(frames, bool),
                   identity=rng.standard_normal(100).astype(np.float32))


def _neutral(p: FaceParams, i: int) -> Neutral:
    return Neutral(p.rotation[i], p.translation[i], p.expression[i], p.gaze[i])


def _mat(r: np.ndarray) -> np.ndarray:
    return axis_angle_to_matrix(torch.as_tensor(np.asarray(r, np.float64))).numpy()


@pytest.fixture(scope="module")
def actors(face_model):  # type: ignore[no-untyped-def]
    names = _names(face_model)
    src = _params(names, 6, 1)
    tgt = _params(names, 6, 2)
    return names, src, _neutral(src, 0), tgt, _neutral(tgt, 3)


def _eyelook_ok(p: FaceParams, names: list[str]) -> None:
    idx = [names.index(n) for n in EYELOOK_NAMES]
    np.testing.assert_allclose(p.expression[:, idx], gaze_to_eyelook(p.gaze), atol=1e-6)


def test_full_maps_rest_to_rest_and_moves_relative(actors) -> None:  # type: ignore[no-untyped-def]
    names, src, sn, tgt, tn = actors
    out = transfer(src, sn, tgt, tn, "full")
    # frame 0 is the source's neutral: the target's neutral comes out
    np.testing.assert_allclose(out.rotation[0], tn.rotation, atol=1e-5)
    np.testing.assert_allclose(out.translation[0], tn.translation, atol=1e-4)
    np.testing.assert_allclose(out.gaze[0], tn.gaze, atol=1e-6)
    mask = ~np.isin(names, EYELOOK_NAMES)
    np.testing.assert_allclose(out.expression[0][mask], tn.expression[mask], atol=1e-6)
    # other frames: the source's rotation from its neutral, in the head frame
    for i in range(1, 6):
        want = _mat(tn.rotation) @ _mat(sn.rotation).T @ _mat(src.rotation[i])
        np.testing.assert_allclose(_mat(out.rotation[i]), want, atol=1e-5)
        ratio = tn.translation[2] / sn.translation[2]
        np.testing.assert_allclose(out.translation[i], tn.translation + ratio * (
            src.translation[i] - sn.translation), atol=1e-4)
        np.testing.assert_allclose(out.gaze[i], tn.gaze + src.gaze[i] - sn.gaze, atol=1e-6)
        e = np.clip(tn.expression + src.expression[i] - sn.expression, 0, 1)
        np.testing.assert_allclose(out.expression[i][mask], e[mask], atol=1e-6)
    _eyelook_ok(out, names)
    assert out.valid.all()
    np.testing.assert_array_equal(out.identity, tgt.identity)
    np.testing.assert_array_equal(out.timestamps, src.timestamps)


@pytest.mark.parametrize("mode", ["face", "gaze", "dub"])
def test_partial_modes_keep_the_rest_of_the_target(actors, mode) -> None:  # type: ignore[no-untyped-def]
    names, src, sn, tgt, tn = actors
    out = transfer(src, sn, tgt, tn, mode)
    full = transfer(src, sn, tgt, tn, "full")
    sel = mode_mask(mode, names)
    moved = np.asarray(sel["expression"])
    eyelook = np.isin(names, EYELOOK_NAMES)
    np.testing.assert_allclose(out.expression[:, moved], full.expression[:, moved], atol=1e-6)
    keep = ~moved & ~eyelook
    np.testing.assert_allclose(out.expression[:, keep], tgt.expression[:, keep], atol=1e-6)
    np.testing.assert_allclose(out.rotation, tgt.rotation, atol=1e-6)
    np.testing.assert_allclose(out.translation, tgt.translation, atol=1e-6)
    np.testing.assert_allclose(out.gaze, full.gaze if mode == "gaze" else tgt.gaze, atol=1e-6)
    _eyelook_ok(out, names)
    blinks = np.isin(names, ["eyeBlink_L", "eyeBlink_R"])
    jaw = np.asarray(names) == "jawOpen"
    if mode == "dub":  # mouth and jaw only; the target's own blinks and gaze
        assert moved[jaw].all() and not moved[blinks].any()
        assert all(n.startswith(("jaw", "mouth", "cheekPuff")) for n in np.asarray(names)[moved])
    if mode == "gaze":
        assert moved[blinks].all() and moved.sum() == 2
    if mode == "face":
        assert moved[jaw].all() and moved[blinks].all() and not moved[eyelook].any()


def test_edit_gains_and_offsets(actors) -> None:  # type: ignore[no-untyped-def]
    names, src, sn, tgt, tn = actors
    still = transfer(src, sn, tgt, tn, "edit",
                     Edit(rotation_gain=0, translation_gain=0, expression_gain=0, gaze_gain=0))
    np.testing.assert_allclose(still.rotation, np.broadcast_to(tn.rotation, (6, 3)), atol=1e-5)
    np.testing.assert_allclose(still.gaze, np.broadcast_to(tn.gaze, (6, 2, 2)), atol=1e-6)
    double = transfer(src, sn, tgt, tn, "edit", Edit(expression_gain=2.0, gaze_gain=2.0,
                                                     gaze_offset=np.asarray([0.1, -0.05])))
    np.testing.assert_allclose(double.gaze, tn.gaze + 2 * (src.gaze - sn.gaze)
                               + np.asarray([0.1, -0.05]), atol=1e-6)
    jaw = names.index("jawOpen")
    np.testing.assert_allclose(double.expression[:, jaw], np.clip(
        tn.expression[jaw] + 2 * (src.expression[:, jaw] - sn.expression[jaw]), 0, 1),
        atol=1e-6)
    turned = transfer(src, sn, tgt, tn, "edit", Edit(rotation_offset=np.asarray([0, 0.2, 0])))
    want = _mat(tn.rotation) @ _mat([0, 0.2, 0]) @ _mat(sn.rotation).T @ _mat(src.rotation[2])
    np.testing.assert_allclose(_mat(turned.rotation[2]), want, atol=1e-5)
    # edit settings do nothing outside mode 'edit'
    full = transfer(src, sn, tgt, tn, "full", Edit(expression_gain=0))
    np.testing.assert_allclose(full.expression, transfer(src, sn, tgt, tn).expression)
    _eyelook_ok(double, names)


def test_lost_source_frames_keep_the_target(actors) -> None:  # type: ignore[no-untyped-def]
    _, src, sn, tgt, tn = actors
    src = replace(src, valid=np.asarray([True, False, True, True, False, True]))
    out = transfer(src, sn, tgt.select([2]), tn, "full")  # one target frame for all
    np.testing.assert_array_equal(out.valid, src.valid)
    np.testing.assert_allclose(out.rotation[1], tgt.rotation[2])
    np.testing.assert_allclose(out.expression[4], tgt.expression[2])
    assert out.frames == 6


def test_bad_requests_say_why(actors) -> None:  # type: ignore[no-untyped-def]
    _, src, sn, tgt, tn = actors
    with pytest.raises(TransferError) as err:
        transfer(src, sn, tgt, tn, "dance")
    assert str(err.value) == "unknown transfer mode 'dance': use one of full, face, gaze, " \
        "dub, edit"
    with pytest.raises(TransferError) as err:
        transfer(src, sn, tgt.select([0, 1]), tn)
    assert str(err.value) == "target has 2 frames; expected 1 or 6 (the source's)"


def test_neutral_file_round_trip_and_errors(tmp_path: Path, actors) -> None:  # type: ignore[no-untyped-def]
    sn = actors[2]
    path = sn.save(tmp_path / "neutral.npz")
    back = Neutral.load(path)
    for key in ("rotation", "translation", "expression", "gaze"):
        np.testing.assert_array_equal(getattr(back, key), getattr(sn, key))
    np.savez(tmp_path / "bad.npz", rotation=np.zeros(3), translation=np.zeros(3),
             expression=np.zeros(53))
    with pytest.raises(TransferError) as err:
        Neutral.load(tmp_path / "bad.npz")
    assert str(err.value) == f"{tmp_path / 'bad.npz'}: missing key 'gaze'"
    np.savez(tmp_path / "shape.npz", rotation=np.zeros(4), translation=np.zeros(3),
             expression=np.zeros(53), gaze=np.zeros((2, 2)))
    with pytest.raises(TransferError) as err:
        Neutral.load(tmp_path / "shape.npz")
    assert str(err.value) == f"{tmp_path / 'shape.npz'}: neutral 'rotation' has shape (4,), " \
        "expected (3,)"
    with pytest.raises(TransferError) as err:
        Neutral.load(tmp_path / "none.npz")
    assert str(err.value) == f"{tmp_path / 'none.npz'}: no such neutral file"


def test_neutral_from_a_tracked_sequence(face_model) -> None:  # type: ignore[no-untyped-def]
    names = _names(face_model)
    p = _params(names, 40, 5)
    rest = np.asarray([0.05, -0.1, 0.02], np.float32)
    rot = matrix_to_axis_angle(_mat(rest)[None] @ _mat(
        np.random.default_rng(0).normal(0, 0.02, (40, 3))))
    jaw = names.index("jawOpen")
    expr = p.expression.copy()
    expr[:, jaw] = np.r_[np.zeros(30), np.full(10, 0.8)]  # speaks a quarter of the time
    valid = np.ones(40, bool)
    valid[:3] = False
    p = replace(p, rotation=rot, expression=expr, valid=valid)
    n = Neutral.from_params(p)
    assert np.degrees(np.linalg.norm(matrix_to_axis_angle(
        _mat(n.rotation).T @ _mat(rest)))) < 2.0
    assert n.expression[jaw] == pytest.approx(0.0, abs=1e-6)
    _eyelook_ok(replace(p.select([0]), expression=n.expression[None], gaze=n.gaze[None]),
                names)
    with pytest.raises(TransferError) as err:
        Neutral.from_params(replace(p, valid=np.zeros(40, bool)))
    assert str(err.value) == "cannot estimate a neutral: no frame has a face (valid)"
