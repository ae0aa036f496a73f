"""The photometric refinement: its differentiable rendering agrees with the rasterizer and
the conditioning's texture sampling, its Jacobian with finite differences, and it pulls a
perturbed pose back onto frames rendered with a known albedo and light."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from renderer.conditioning import ConditioningRenderer, sample_texture
from renderer.raster import rasterize
from renderer.refine import (
    FaceCrops,
    Refiner,
    RefineSettings,
    _bilinear,
    crop_boxes,
    crop_frame,
    face_crops,
    refine,
)
from renderer.sh import AMBIENT_L00, ambient_sh, directional_sh
from renderer.synth import SynthActor
from tracker.config import TrackerConfig
from tracker.fitting import LandmarkModel, params_landmarks
from tracker.params import FaceParams
from tracker.rotation import axis_angle_to_matrix_np, matrix_to_axis_angle

S = 96
R = 64  # crop side


@pytest.fixture(scope="module")
def scene(face_model):
    """4 frames rendered by the conditioning renderer (albedo x SH) with a known albedo."""
    rng = np.random.default_rng(1)
    t = 4
    p = FaceParams.empty(t, face_model.expression_names, (S, S), 1.8 * S,
                         np.arange(t, dtype=np.float32) / 25)
    rot = np.stack([rng.uniform(-0.1, 0.1, t), np.linspace(-0.3, 0.3, t),
                    rng.uniform(-0.05, 0.05, t)], 1).astype(np.float32)
    tr = p.translation.copy()
    tr[:, 1], tr[:, 2] = -1.0, 50.0
    expr = p.expression.copy()
    expr[:, face_model.expression_index("jawOpen")] = [0.0, 0.2, 0.4, 0.1]
    sh = np.stack([ambient_sh(0.7) + directional_sh([0.4, -0.4, -1.0], 0.3)] * t)
    sh[:, 0] *= AMBIENT_L00 / sh[:, 0].mean(0)
    p = replace(p, rotation=rot, translation=tr, expression=expr, sh=sh.astype(np.float32),
                valid=np.ones(t, bool))
    albedo = SynthActor(face_model, seed=3, size=16, texture_size=64,
                        supersample=1).skin_texture
    r = ConditioningRenderer(face_model, albedo, S, "cpu")
    frames = (r.frames(p)[:, :3].permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    landmarks = params_landmarks(LandmarkModel(face_model), p)
    return p, albedo, frames, landmarks


@pytest.fixture(scope="module")
def refiner(face_model):
    return Refiner(face_model, TrackerConfig(), RefineSettings(size=R, albedo_size=64), "cpu")


def _crops(face_model, p, frames) -> FaceCrops:
    return face_crops(frames, crop_boxes(face_model, p, 1.3), R)


def test_bilinear_sampling_is_the_conditioning_texture_lookup():
    gen = torch.Generator().manual_seed(0)
    tile = torch.rand(3, 16, 16, generator=gen)
    full = torch.cat([tile, torch.zeros(3, 16, 16)], 2)[None]  # face tile on the left
    uv = torch.rand(200, 2, generator=gen) * 0.9 + 0.05
    uv[:, 0] *= 0.95  # away from the tile's right edge, where grid_sample blends tile 1 in
    np.testing.assert_allclose(_bilinear(tile, uv).numpy(), sample_texture(full, uv).numpy(),
                               atol=1e-5)


def test_crops_pad_outside_the_frame_and_map_the_camera(face_model, scene):
    p, _, frames, landmarks = scene
    crop, inside = crop_frame(frames[0], np.asarray([-20, -10, 60]), 30)
    assert crop.shape == (30, 30, 3) and inside.shape == (30, 30)
    assert not inside[:5, :].any() and not inside[:, :10].any() and inside[10:, 15:].all()
    assert (crop[~inside] == 0).all()
    crops = _crops(face_model, p, frames)
    idx = np.arange(p.frames)
    cam = crops.camera(torch.tensor(float(p.focal[0])), p.principal_point, idx, "cpu")
    lm = LandmarkModel(face_model)
    # the model's landmarks projected by the crop cameras = the source pixels mapped in
    from tracker.fitting import project
    from tracker.rotation import axis_angle_to_matrix

    pts = lm.points(torch.as_tensor(p.identity)[None].expand(4, -1),
                    torch.as_tensor(p.expression))
    mine = project(pts, axis_angle_to_matrix(torch.as_tensor(p.rotation)),
                   torch.as_tensor(p.translation), cam).numpy()
    np.testing.assert_allclose(mine, crops.to_crop(landmarks, idx), atol=1e-3)
    box = crops.boxes[0]
    assert crops.to_crop(landmarks, idx)[:, :468].min() > 0  # the face inside its crop
    assert crops.to_crop(landmarks, idx)[:, :468].max() < R and box[2] > 0


def test_barycentrics_at_pixel_centres_are_the_rasterizer_s(face_model, scene, refiner):
    p, _, frames, _ = scene
    crops = _crops(face_model, p, frames)
    idx = np.arange(p.frames)
    state = refiner._state(p, idx)
    cam = crops.camera(torch.tensor(float(p.focal[0])), p.principal_point, idx, "cpu")
    face = refiner.face
    verts = face.vertices(torch.as_tensor(p.identity), state.expression)
    xc = verts @ state.rotation.transpose(1, 2) + state.translation[:, None]
    scr = face.screen(xc, cam)
    px = face.pixels(scr, torch.as_tensor(crops.images), torch.as_tensor(crops.inside), 0)
    assert int(px.mask.sum()) > 500
    # a texture linear in u and v: the sampled albedo is the interpolated uv
    a = 64
    ramp = (torch.arange(a) + 0.5) / a
    tex = torch.stack([ramp[None].expand(a, a), ramp.flip(0)[:, None].expand(a, a),
                       torch.zeros(a, a)])
    _, albedo, _ = face.colour(scr, face.normals(xc), tex, None, px)
    raster = rasterize(scr.contiguous(), face.tris32, R, R, backend="reference")
    bary = raster.bary.view(p.frames, -1, 3).gather(1, px.index[..., None].expand(-1, -1, 3))
    uv = (face.uv[px.tri] * bary[..., None]).sum(-2)
    keep = (px.mask > 0) & (uv > 0.5 / a).all(-1) & (uv < 1 - 0.5 / a).all(-1)
    np.testing.assert_allclose(albedo[..., :2][keep].numpy(), uv[keep].numpy(), atol=2e-4)


def test_jacobian_is_the_derivative_of_the_colour(face_model, scene, refiner):
    p, albedo, frames, _ = scene
    crops = _crops(face_model, p, frames)
    idx = np.arange(2)
    state = refiner._state(p, idx)
    ident = torch.as_tensor(p.identity)
    cam = crops.camera(torch.tensor(float(p.focal[0])), p.principal_point, idx, "cpu")
    face = refiner.face
    tex = torch.as_tensor(albedo[:, :64]).permute(2, 0, 1).contiguous()
    sh = torch.as_tensor(p.sh[idx])
    verts = face.vertices(ident, state.expression)
    xc = verts @ state.rotation.transpose(1, 2) + state.translation[:, None]
    normals = face.normals(xc)
    px = face.pixels(face.screen(xc, cam), torch.as_tensor(crops.images[idx]),
                     torch.as_tensor(crops.inside[idx]), 1)
    jac, _ = refiner._jacobian(state, ident, cam, tex, sh, normals, px)
    assert jac.shape == (2, px.tri.shape[1], 3, 51)
    fitter = refiner.fitter

    def colour(k: int, delta: float) -> torch.Tensor:
        step = torch.zeros(2, 51)
        step[:, k] = delta
        moved = fitter.apply_step(state, step)
        v = face.vertices(ident, moved.expression)
        x = v @ moved.rotation.transpose(1, 2) + moved.translation[:, None]
        return face.colour(face.screen(x, cam), normals, tex, sh, px)[0]

    for k, eps in ((0, 2e-4), (4, 2e-3), (5, 5e-3), (6 + 10, 5e-3)):
        # central differences; one-sided for expressions (held at 0 by their box)
        low = -1.0 if k < 6 else 0.0
        numeric = (colour(k, eps) - colour(k, low * eps)) / ((1.0 - low) * eps)
        analytic = jac[..., k]
        m = px.mask > 0
        err = (numeric - analytic)[m].norm() / analytic[m].norm().clamp_min(1e-9)
        assert float(err) < 0.05, (k, float(err))


def test_refinement_pulls_a_perturbed_pose_back(face_model, scene, refiner):
    """Colour alone (landmark weight 0), the true albedo and light: a 2.2 degree, 3.6 mm
    error shrinks (to about 0.6 degree and 1 mm at this small size)."""
    p, albedo, frames, landmarks = scene
    crops = _crops(face_model, p, frames)
    r = Refiner(face_model, TrackerConfig(),
                RefineSettings(size=R, iterations=10, landmark_weight=0.0), "cpu")
    turn = axis_angle_to_matrix_np(np.asarray([np.radians(2.0), np.radians(-1.0), 0.0]))
    moved = replace(p, rotation=matrix_to_axis_angle(axis_angle_to_matrix_np(p.rotation) @ turn)
                    .astype(np.float32), translation=p.translation + np.float32([0.3, -0.2, 0]))
    tex = torch.as_tensor(albedo[:, :albedo.shape[0]]).permute(2, 0, 1).contiguous()
    idx = np.asarray([0, 3])
    state, sh, before, after = r.refine_frames(moved, crops, landmarks, idx,
                                               torch.as_tensor(p.identity),
                                               float(p.focal[0]), tex,
                                               torch.as_tensor(p.sh[0]))
    got = state.rotation.numpy()
    err = np.degrees(np.linalg.norm(matrix_to_axis_angle(
        np.einsum("tji,tjk->tik", axis_angle_to_matrix_np(p.rotation[idx]), got)), axis=1))
    shift = np.linalg.norm(state.translation.numpy() - p.translation[idx], axis=1)
    print("rotation error deg", err, "translation cm", shift, "rms", before, after)
    assert np.all(after < 0.5 * before)
    assert np.median(err) < 1.0 and np.median(shift) < 0.2
    np.testing.assert_allclose(sh.numpy()[:, 0], p.sh[idx, 0], atol=0.05)


def test_refine_runs_end_to_end(face_model, scene):
    """The whole refinement on 4 frames: keyframes (identity, focal, albedo, light), then
    every frame; finite, smoothed, and the colour error goes down."""
    p, _, frames, landmarks = scene
    crops = _crops(face_model, p, frames)
    settings = RefineSettings(size=R, albedo_size=32, keyframes=3, keyframe_steps=8,
                              iterations=2, batch=3)
    start = replace(p, focal=p.focal * 1.05, sh=np.zeros_like(p.sh))
    out = refine(face_model, start, crops, landmarks, TrackerConfig(), settings, "cpu")
    q = out.params
    assert q.frames == 4 and q.valid.all()
    for key in ("rotation", "translation", "expression", "gaze", "sh", "identity", "focal"):
        assert np.all(np.isfinite(getattr(q, key))), key
    assert out.texture.shape == (32, 32, 3)
    assert np.all(np.isfinite(out.rmse_before)) and np.all(out.rmse_after <= out.rmse_before + 1e-3)
    assert abs(float(q.focal[0]) / float(p.focal[0]) - 1.0) < 0.1
    assert set(out.seconds) == {"keyframes", "frames"}
    with pytest.raises(ValueError, match="3 crops and 4 landmark frames for 4 parameter frames"):
        refine(face_model, start, FaceCrops(crops.images[:3], crops.boxes[:3], crops.inside[:3]),
               landmarks, TrackerConfig(), settings, "cpu")


@pytest.mark.gpu
def test_cuda_refines_as_the_cpu_does(face_model, scene):
    """The per-frame stage on CUDA (CuPy rasterizer) lands where the CPU's does."""
    p, albedo, frames, landmarks = scene
    crops = _crops(face_model, p, frames)
    turn = axis_angle_to_matrix_np(np.asarray([np.radians(1.5), 0.0, 0.0]))
    moved = replace(p, rotation=matrix_to_axis_angle(axis_angle_to_matrix_np(p.rotation) @ turn)
                    .astype(np.float32))
    tex = torch.as_tensor(albedo[:, :albedo.shape[0]]).permute(2, 0, 1).contiguous()
    out = {}
    for dev in ("cpu", "cuda"):
        r = Refiner(face_model, TrackerConfig(), RefineSettings(size=R, iterations=3), dev)
        state, _, _, after = r.refine_frames(
            moved, crops, landmarks, np.arange(p.frames), torch.as_tensor(p.identity, device=dev),
            float(p.focal[0]), tex.to(dev), torch.as_tensor(p.sh[0], device=dev))
        out[dev] = (state.rotation.cpu().numpy(), state.translation.cpu().numpy(), after)
    np.testing.assert_allclose(out["cuda"][0], out["cpu"][0], atol=2e-3)
    np.testing.assert_allclose(out["cuda"][1], out["cpu"][1], atol=2e-2)
    np.testing.assert_allclose(out["cuda"][2], out["cpu"][2], atol=1e-3)
