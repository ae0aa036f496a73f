"""The landmark regressor: reproducible training, the weights cache, first guesses."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tracker.regressor import (
    RegressorError,
    RegressorSettings,
    cache_path,
    load,
    load_or_train,
    save,
    train,
)

TINY = RegressorSettings(samples=1500, epochs=2, components=16, hidden=32)


def test_training_is_reproducible(landmark_model) -> None:  # type: ignore[no-untyped-def]
    a, report = train(landmark_model, TINY)
    b, _ = train(landmark_model, TINY)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=k)
    assert report["seconds"] > 0 and np.isfinite(report["rotation_deg"])


def test_cache_round_trip_and_damage(tmp_path: Path, landmark_model) -> None:  # type: ignore[no-untyped-def]
    net, _ = train(landmark_model, TINY)
    path = save(net, tmp_path / "r.npz")
    back = load(path)
    x = torch.randn(3, 936)
    torch.testing.assert_close(net(x), back(x))
    path.write_bytes(b"not an npz")
    with pytest.raises(RegressorError, match="damaged regressor weights"):
        load(path)
    # load_or_train retrains over a damaged cache file
    cached = cache_path(landmark_model, TINY, tmp_path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(b"junk")
    reg = load_or_train(landmark_model, TINY, home=tmp_path)
    assert load(cached) is not None and reg.n_free == 45


def test_first_guess_of_pose(regressor, sequence) -> None:  # type: ignore[no-untyped-def]
    from tracker.rotation import axis_angle_to_matrix, matrix_to_axis_angle

    obs = torch.as_tensor(sequence.noisy)
    h, w = sequence.image_size
    focal = torch.full((sequence.frames,), sequence.focal)
    principal = torch.tensor([[w / 2, h / 2]]).expand(sequence.frames, 2)
    guess = regressor.predict(obs, focal, principal)
    truth = axis_angle_to_matrix(torch.as_tensor(sequence.rotation))
    err = np.degrees(np.linalg.norm(matrix_to_axis_angle(
        (guess.rotation @ truth.transpose(1, 2)).numpy()), axis=1))
    assert np.median(err) < 8.0
    assert guess.expression.shape == (sequence.frames, 53)
    assert float(guess.expression.min()) >= 0 and float(guess.expression.max()) <= 1
    assert guess.identity.shape == (sequence.frames, 100)
    # garbage in (all points on one spot): a finite guess
    flat = regressor.predict(torch.full((1, 478, 2), 100.0), focal[:1], principal[:1])
    assert torch.isfinite(flat.rotation).all() and torch.isfinite(flat.identity).all()


def test_moving_a_shared_regressor_leaves_the_original_where_it_was(  # type: ignore[no-untyped-def]
        regressor) -> None:
    """A regressor shared by trackers on several devices (the live server's sessions on the
    GPU, the re-tracking monitor on the CPU): `.to()` copies, never moves the shared network
    in place (seen on an H200: a CPU tracker moved the GPU sessions' network back)."""
    assert regressor.to(regressor.device) is regressor
    moved = regressor.to("meta")
    assert moved.device == torch.device("meta")
    assert {p.device.type for p in moved.net.parameters()} == {"meta"}
    assert {p.device.type for p in regressor.net.parameters()} == {regressor.device.type}
    assert regressor.net.pca_mean.device == regressor.device
