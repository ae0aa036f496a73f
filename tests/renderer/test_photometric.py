"""Inverse rendering: the fit recovers a known albedo and lighting from colour renders."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from renderer.conditioning import ConditioningRenderer, RendererError
from renderer.photometric import fit_photometric, skin_rows
from renderer.sh import AMBIENT_L00, ambient_sh, directional_sh
from renderer.synth import SynthActor
from tracker.params import FaceParams

S = 64


@pytest.fixture(scope="module")
def scene(face_model):
    rng = np.random.default_rng(0)
    t = 4
    p = FaceParams.empty(t, face_model.expression_names, (S, S), 2.2 * S)
    rot = np.stack([rng.uniform(-0.15, 0.15, t), np.linspace(-0.5, 0.5, t),
                    rng.uniform(-0.1, 0.1, t)], 1).astype(np.float32)
    tr = p.translation.copy()
    tr[:, 1], tr[:, 2] = -2.0, 60.0
    sh = np.stack([ambient_sh(0.6) + directional_sh([rng.uniform(-0.6, 0.6), -0.4, -1.0], 0.4)
                   for _ in range(t)])
    sh[:, 0] *= AMBIENT_L00 / sh[:, 0].mean(0)  # the fit's gauge: mean constant term white
    p = replace(p, rotation=rot, translation=tr, sh=sh.astype(np.float32))
    albedo = np.clip(SynthActor(face_model, seed=3, size=16, texture_size=64,
                                supersample=1).skin_texture * 0.9, 0, 1)
    r = ConditioningRenderer(face_model, albedo, S, "cpu")
    frames = (r.frames(p)[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    fit = fit_photometric(face_model, p, frames, albedo_size=64, steps=60, key_frames=4)
    return p, albedo, frames, fit


def test_fit_reproduces_the_frames(face_model, scene):
    p, _, frames, fit = scene
    assert fit.albedo.shape == (64, 128, 3) and fit.albedo.dtype == np.float32
    assert fit.sh.shape == (4, 9, 3) and fit.coverage.shape == (64, 128)
    assert fit.albedo_uint8().dtype == np.uint8
    assert fit.loss[-1] < fit.loss[0]
    assert np.nanmax(fit.rmse) < 0.02
    r = ConditioningRenderer(face_model, fit.albedo, S, "cpu")
    again = r.frames(replace(p, sh=fit.sh))[:, :3].permute(0, 2, 3, 1).numpy()
    mask = r.masks(p)[:, 0].numpy() > 0
    assert np.abs(again - frames / 255.0)[mask].mean() < 0.02


def test_fit_recovers_albedo_and_light(face_model, scene):
    """Up to the per-channel scale that albedo x light cannot tell apart."""
    p, albedo, frames, fit = scene
    seen = fit.coverage
    assert seen.mean() > 0.2
    k = np.median(fit.albedo[seen] / np.clip(albedo[seen], 0.05, None), 0)  # 3
    assert np.all(np.abs(k - 1) < 0.2)  # the gauge keeps the light near unit white
    assert np.median(np.abs(fit.albedo / k - albedo)[seen]) < 0.03
    r = ConditioningRenderer(face_model, None, S, "cpu")
    rows = skin_rows(r, p, frames, np.arange(p.frames), erode_px=1)
    true = (rows.basis[:, :, None] * torch.from_numpy(p.sh)[rows.frame]).sum(1)
    got = (rows.basis[:, :, None] * torch.from_numpy(fit.sh)[rows.frame]).sum(1)
    got = got * torch.from_numpy(k).float()
    assert ((got - true).abs() / true).median() < 0.07


def test_bad_inputs(face_model, scene):
    p, _, frames, _ = scene
    with pytest.raises(RendererError, match="3 frames but params have 4"):
        fit_photometric(face_model, p, frames[:3])
    with pytest.raises(RendererError, match=r"frames must be \(S, S, 3\)"):
        fit_photometric(face_model, p, frames[:, :, :10])
    hidden = replace(p, translation=np.tile([[0, 0, -50]], (4, 1)).astype(np.float32))
    with pytest.raises(RendererError, match="no skin pixels visible"):
        fit_photometric(face_model, hidden, frames, steps=1)


def _one_frame_light(basis, albedo, colour, prior, weight, huber, iterations=3):
    """The per-frame ridge + Huber least squares, written out for one frame (the reference
    of the batched solve_lights)."""
    n = basis.shape[0]
    ridge = torch.full((9,), weight, dtype=torch.float64)
    ridge[0] = weight * 0.01
    sh = prior.double().clone()
    w = torch.ones(n, 3, dtype=torch.float64)
    b, a, c = basis.double(), albedo.double(), colour.double()
    for _ in range(iterations):
        for ch in range(3):
            d = b * a[:, ch:ch + 1]
            lhs = d.t() @ (d * w[:, ch:ch + 1]) / n + torch.diag(ridge)
            rhs = (d * w[:, ch:ch + 1]).t() @ c[:, ch] / n + ridge * prior[:, ch].double()
            sh[:, ch] = torch.linalg.solve(lhs, rhs)
        resid = a * (b @ sh).clamp_min(0.0) - c
        w = torch.where(resid.abs() <= huber, torch.ones_like(resid), huber / resid.abs())
    resid = a * (b @ sh).clamp_min(0.0) - c
    return sh.float(), float(resid.pow(2).mean().sqrt())


def test_all_frames_lit_at_once_equal_each_frame_lit_alone():
    from renderer.photometric import solve_lights

    g = torch.Generator().manual_seed(3)
    counts = [40, 0, 7, 25, 60]  # a frame without skin, one with too few pixels
    frame = torch.cat([torch.full((k,), i) for i, k in enumerate(counts)])
    frame = frame[torch.randperm(len(frame), generator=g)]  # rows in any order
    n = len(frame)
    basis = torch.rand(n, 9, generator=g) - 0.3
    basis[:, 0] = 0.9
    albedo = 0.3 + 0.5 * torch.rand(n, 3, generator=g)
    colour = (0.6 * torch.rand(n, 3, generator=g)).clamp(0, 1)
    colour[::9] = 1.0  # outliers for the Huber weights
    prior = 0.2 * torch.rand(9, 3, generator=g)
    sh, rmse = solve_lights(frame, basis, albedo, colour, len(counts), prior, 0.05, 0.02)
    assert sh.shape == (5, 9, 3) and rmse.shape == (5,)
    for i, k in enumerate(counts):
        rows = frame == i
        if k < 9:
            torch.testing.assert_close(sh[i], prior)
            assert torch.isnan(rmse[i])
            continue
        want_sh, want_rmse = _one_frame_light(basis[rows], albedo[rows], colour[rows], prior,
                                              0.05, 0.02)
        torch.testing.assert_close(sh[i], want_sh, atol=1e-4, rtol=1e-4)
        assert abs(float(rmse[i]) - want_rmse) < 1e-5
