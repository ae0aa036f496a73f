"""FaceParams: .npz round trip and the messages that reject a wrong file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tracker.params import FaceParams, ParamsError

NAMES = [f"e{i}" for i in range(53)]


def _params(frames: int = 4) -> FaceParams:
    p = FaceParams.empty(frames, NAMES, (48, 64), focal=80.0)
    rng = np.random.default_rng(1)
    from dataclasses import replace

    return replace(p, expression=rng.uniform(size=(frames, 53)).astype(np.float32),
                   valid=np.asarray([True, False, True, True][:frames]))


def test_round_trip(tmp_path: Path) -> None:
    p = _params()
    path = p.save(tmp_path / "sub" / "p.npz")
    q = FaceParams.load(path)
    for key in ("identity", "expression", "rotation", "translation", "sh", "gaze", "focal",
                "principal_point", "image_size", "valid", "timestamps", "expression_names"):
        np.testing.assert_array_equal(getattr(p, key), getattr(q, key), err_msg=key)
    assert q.frames == 4 and q.image_size.tolist() == [48, 64]
    assert q.expression.dtype == np.float32 and q.valid.dtype == bool
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # nothing left aside


def test_select_keeps_shared_arrays() -> None:
    p = _params()
    q = p.select([0, 2])
    assert q.frames == 2 and q.valid.tolist() == [True, True]
    np.testing.assert_array_equal(q.identity, p.identity)


def test_missing_key_is_named(tmp_path: Path) -> None:
    p = _params()
    arrays = {k: getattr(p, k) for k in p.__dataclass_fields__}
    del arrays["gaze"]
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ParamsError, match=r"bad\.npz: missing key 'gaze'"):
        FaceParams.load(tmp_path / "bad.npz")


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    p = _params()
    arrays = {k: getattr(p, k) for k in p.__dataclass_fields__}
    arrays["sh"] = np.zeros((4, 9), np.float32)
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ParamsError,
                       match=r"bad\.npz: key 'sh' has shape \(4, 9\), expected \(T, 9, 3\)"):
        FaceParams.load(tmp_path / "bad.npz")


def test_inconsistent_frames_and_nan_are_rejected() -> None:
    p = _params()
    arrays = {k: getattr(p, k) for k in p.__dataclass_fields__}
    with pytest.raises(ParamsError, match=r"key 'rotation' has 3 frames, expected 4"):
        FaceParams(**{**arrays, "rotation": np.zeros((3, 3), np.float32)})
    bad = arrays["translation"].copy()
    bad[0, 0] = np.nan
    with pytest.raises(ParamsError, match=r"key 'translation' holds NaN or infinite values"):
        FaceParams(**{**arrays, "translation": bad})


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(ParamsError, match=r"x\.npz: not a parameters \.npz file"):
        FaceParams.load(tmp_path / "x.npz")
    with pytest.raises(ParamsError, match=r"nope\.npz: no such parameters file"):
        FaceParams.load(tmp_path / "nope.npz")
