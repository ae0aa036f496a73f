"""GPU parity: the CuPy kernel against the reference rasterizer, conditioning on CUDA against
the CPU, bad input on the GPU. Run on the lent machine: `pytest -m gpu tests/renderer`."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from renderer.conditioning import Camera, ConditioningRenderer, GraphedRenderer
from renderer.raster_ref import RasterError, rasterize_reference
from renderer.synth import SynthActor

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    pytest.importorskip("cupy")
    return torch.device("cuda")


def _cupy(*args, **kwargs):
    from renderer.raster_cupy import rasterize_cupy

    return rasterize_cupy(*args, **kwargs)


def _compare(ref, got, min_agree=0.999, bary_tol=1e-4):
    ids_ref, ids_got = ref.triangle.cpu(), got.triangle.cpu()
    same = ids_ref == ids_got
    assert same.float().mean() >= min_agree, float(same.float().mean())
    both = same & (ids_ref >= 0)
    if both.any():
        diff = (ref.bary.cpu()[both] - got.bary.cpu()[both]).abs().max()
        assert diff <= bary_tol, float(diff)
        rel = ((ref.depth.cpu()[both] - got.depth.cpu()[both]).abs()
               / ref.depth.cpu()[both]).max()
        assert rel <= 1e-5, float(rel)


HAND_MADE = [
    ([[[1.0, 1.0, 10.0], [1.0, 7.0, 10.0], [7.0, 1.0, 10.0]]], [[0, 1, 2]], 8, 8, True),
    ([[[1.0, 1.0, 10.0], [7.0, 1.0, 10.0], [1.0, 7.0, 10.0]]], [[0, 1, 2]], 8, 8, False),
    ([[[0.0, 0.0, 5.0], [0.0, 8.0, 5.0], [8.0, 8.0, 5.0], [8.0, 0.0, 5.0]]],
     [[0, 1, 2], [0, 2, 3]], 8, 8, True),
    ([[[1.0, 1.0, 20.0], [1.0, 7.0, 20.0], [7.0, 1.0, 20.0], [1.0, 1.0, 10.0],
       [1.0, 7.0, 10.0], [7.0, 1.0, 10.0], [1.0, 1.0, 10.0], [1.0, 7.0, 10.0],
       [7.0, 1.0, 10.0]]], [[0, 1, 2], [3, 4, 5], [6, 7, 8]], 8, 8, True),
    ([[[-3.3, 2.1, 20.0], [5.7, 60.2, 40.0], [61.9, 11.4, 30.0]]], [[0, 1, 2]], 64, 48, True),
]


@pytest.mark.parametrize("verts, tris, h, w, cull", HAND_MADE)
def test_kernel_equals_reference_on_hand_made_triangles(cuda, verts, tris, h, w, cull):
    v = torch.tensor(verts, dtype=torch.float32)
    t = torch.tensor(tris)
    ref = rasterize_reference(v, t, h, w, cull_back=cull)
    got = _cupy(v.to(cuda), t.to(cuda), h, w, cull_back=cull)
    assert torch.equal(ref.triangle, got.triangle.cpu())
    assert torch.equal(ref.bary, got.bary.cpu())
    assert torch.equal(ref.depth, got.depth.cpu())


def _face_screen(model, size, frames, seed=0):
    """Screen vertices of a moving, talking face (CPU float32) and the drawn triangles."""
    actor = SynthActor(model, seed=seed, size=size, texture_size=16, supersample=1)
    p = actor.motion(frames)
    r = ConditioningRenderer(model, None, size, "cpu")
    f, cx, cy = Camera.of(p).scaled_to(size)
    v = r.vertices(p.identity, p.expression, p.gaze)
    from tracker.rotation import axis_angle_to_matrix
    x = v @ axis_angle_to_matrix(torch.from_numpy(p.rotation)).transpose(-1, -2) \
        + torch.from_numpy(p.translation)[:, None]
    screen = torch.stack([f * x[..., 0] / x[..., 2] + cx, f * x[..., 1] / x[..., 2] + cy,
                          x[..., 2]], -1).contiguous()
    return screen, r._tris


@pytest.mark.parametrize("size", [256, 512])
def test_kernel_matches_reference_on_faces(cuda, face_model, size):
    screen, tris = _face_screen(face_model, size, 4)
    ref = rasterize_reference(screen, tris, size, size)
    got = _cupy(screen.to(cuda), tris.to(cuda), size, size)
    _compare(ref, got)
    torch_gpu = rasterize_reference(screen.to(cuda), tris.to(cuda), size, size)
    _compare(ref, torch_gpu)


def test_outputs_are_torch_views_of_the_kernel_memory(cuda):
    import cupy

    v = torch.tensor(HAND_MADE[0][0], dtype=torch.float32, device=cuda)
    out = _cupy(v, torch.tensor([[0, 1, 2]], device=cuda), 8, 8)
    assert out.triangle.is_cuda and out.triangle.dtype == torch.int32
    assert cupy.from_dlpack(out.triangle).data.ptr == out.triangle.data_ptr()


def test_kernel_runs_on_the_current_torch_stream(cuda, face_model):
    screen, tris = _face_screen(face_model, 128, 2)
    screen, tris = screen.to(cuda), tris.to(cuda)
    base = _cupy(screen, tris, 128, 128)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        again = _cupy(screen, tris, 128, 128)
    side.synchronize()
    assert torch.equal(base.triangle, again.triangle)


def test_bad_input_on_the_gpu_is_background_or_an_error(cuda):
    tri = torch.tensor([[0, 1, 2]], device=cuda)
    nan = torch.tensor([[[1.0, 1.0, 10.0], [1.0, float("nan"), 10.0], [7.0, 1.0, 10.0]]],
                       device=cuda)
    behind = torch.tensor([[[1.0, 1.0, -10.0], [1.0, 7.0, -10.0], [7.0, 1.0, -10.0]]],
                          device=cuda)
    for v in (nan, behind):
        assert (_cupy(v, tri, 8, 8).triangle == -1).all()
    huge = torch.tensor([[[-1e30, -1e30, 10.0], [-1e30, 1e30, 10.0], [1e30, -1e30, 10.0]]],
                        device=cuda)
    out = _cupy(huge, tri, 512, 512)
    assert out.triangle.shape == (1, 512, 512)
    empty = _cupy(nan, torch.zeros((0, 3), dtype=torch.int64, device=cuda), 4, 4)
    assert (empty.triangle == -1).all()
    with pytest.raises(RasterError, match="triangle vertex ids must lie in 0..2"):
        _cupy(nan, torch.tensor([[0, 1, 5]], device=cuda), 8, 8)
    with pytest.raises(RasterError, match="needs CUDA tensors"):
        _cupy(nan.cpu(), tri.cpu(), 8, 8)
    with pytest.raises(RasterError, match="image size must be positive"):
        _cupy(nan, tri, 0, 8)
    torch.cuda.synchronize()  # any asynchronous fault would surface here


def test_one_triangle_covering_the_whole_image(cuda):
    v = torch.tensor([[[-10.0, -10.0, 10.0], [-10.0, 2000.0, 10.0], [2000.0, -10.0, 10.0]]],
                     device=cuda)
    out = _cupy(v, torch.tensor([[0, 1, 2]], device=cuda), 512, 512)
    assert (out.triangle == 0).all()


def _random_params(model, size, frames):
    actor = SynthActor(model, seed=5, size=size, texture_size=16, supersample=1)
    return actor.motion(frames)


def test_conditioning_on_gpu_matches_cpu(cuda, face_model):
    size = 128
    p = _random_params(face_model, size, 6)
    tex = np.random.default_rng(0).uniform(0.2, 0.9, (64, 128, 3)).astype(np.float32)
    cpu = ConditioningRenderer(face_model, tex, size, "cpu").render(p)
    gpu = ConditioningRenderer(face_model, tex, size, cuda).render(p)
    assert gpu.frames.is_cuda
    agree = (cpu.masks == gpu.masks.cpu()).float().mean()
    assert agree >= 0.999
    diff = (cpu.frames - gpu.frames.cpu()).abs()
    assert diff.mean() < 2e-3
    assert torch.quantile(diff.flatten()[::7], 0.999) < 0.05
    one = ConditioningRenderer(face_model, tex, size, cuda, batch=1)
    assert torch.allclose(one.frames(p).cpu(), gpu.frames.cpu(), atol=1e-5)
    # the dense (no host synchronisation) and sparse pixel paths on the GPU
    args = (p.identity, p.expression, p.rotation, p.translation, p.gaze, Camera.of(p))
    sh = torch.as_tensor(p.sh, device=cuda)
    dense = one.shade(one.surface(*args, dense=True), sh)
    sparse = one.shade(one.surface(*args, dense=False), sh)
    assert torch.allclose(dense.frames, sparse.frames, atol=1e-5)
    assert torch.equal(dense.masks, sparse.masks)


def test_graphed_live_frame_matches_eager(cuda, face_model):
    size = 256
    p = _random_params(face_model, size, 3)
    r = ConditioningRenderer(face_model, None, size, cuda)
    g = GraphedRenderer(r, p.identity, Camera.of(p))
    for k in range(3):
        out = g(p.expression[k:k + 1], p.rotation[k:k + 1], p.translation[k:k + 1],
                p.sh[k:k + 1], p.gaze[k:k + 1])
        eager = r.frames(p, [k])
        assert torch.allclose(out.frames, eager, atol=1e-5)


def test_nan_and_behind_camera_frames_on_gpu(cuda, face_model):
    p = _random_params(face_model, 64, 3)
    rot = p.rotation.copy()
    rot[1] = np.nan
    tr = p.translation.copy()
    tr[2, 2] = -60.0
    r = ConditioningRenderer(face_model, None, 64, cuda)
    out = r.render_arrays(p.identity, p.expression, rot, tr, p.sh, p.gaze, Camera.of(p))
    torch.cuda.synchronize()
    assert out.masks[0].sum() > 0 and (out.masks[1:] == 0).all() and (out.frames[1:] == 0).all()
    assert (r.frames(replace(p, translation=np.tile([[0, 0, 0.001]], (3, 1)).astype(
        np.float32))) >= 0).all()
