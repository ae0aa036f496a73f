"""Conditioning images: shapes, ranges, correspondence, gaze map, window, bad input."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from renderer.conditioning import (
    Camera,
    ConditioningRenderer,
    LiveWindow,
    RendererError,
    stack_window,
    window_indices,
)
from renderer.sh import ambient_sh, directional_sh
from tracker.face_model import gaze_to_eyelook
from tracker.params import FaceParams, ParamsError

S = 64


def _params(model, frames=3, size=S, **changes):
    p = FaceParams.empty(frames, model.expression_names, (size, size), 2.0 * size)
    tr = p.translation.copy()
    tr[:, 1] = -1.0
    p = replace(p, translation=tr)
    return replace(p, **changes) if changes else p


@pytest.fixture(scope="module")
def renderer(face_model):
    return ConditioningRenderer(face_model, None, S, "cpu")


def test_frames_and_masks_shapes_ranges_background(face_model, renderer):
    p = _params(face_model, 3)
    frames = renderer.frames(p)
    masks = renderer.masks(p)
    assert frames.shape == (3, 9, S, S) and frames.dtype == torch.float32
    assert masks.shape == (3, 1, S, S) and masks.dtype == torch.float32
    assert frames.min() >= 0 and frames.max() <= 1
    assert set(masks.unique().tolist()) == {0.0, 1.0}
    assert 0.15 < masks.mean() < 0.8
    assert (frames * (1 - masks) == 0).all()  # background 0 in every channel
    corr = frames[:, 3:6][masks.expand(-1, 3, -1, -1) > 0]
    assert corr.min() >= 0 and corr.max() <= 1 and corr.std() > 0.1


def test_vertices_match_the_face_model(face_model, renderer):
    rng = np.random.default_rng(0)
    ident = rng.normal(size=100).astype(np.float32)
    expr = rng.uniform(0, 1, (2, 53)).astype(np.float32)
    gaze = rng.uniform(-0.3, 0.3, (2, 2, 2)).astype(np.float32)
    mine = renderer.vertices(ident, expr, gaze).numpy()
    ref = face_model.vertices(ident, expr, gaze)[:, :mine.shape[1]]
    assert np.abs(mine - ref).max() < 1e-4


def test_ambient_light_times_albedo_on_skin(face_model):
    tex = np.full((8, 16, 3), 0.5, np.float32)
    tex[..., 2] = 0.25
    r = ConditioningRenderer(face_model, tex, S, "cpu")
    p = _params(face_model, 1)  # ambient irradiance 1
    f = r.frames(p)[0]
    centre = f[:3, S // 2 - 2:S // 2 + 2, S // 2 - 2:S // 2 + 2].reshape(3, -1)  # the nose
    assert torch.allclose(centre, torch.tensor([0.5, 0.5, 0.25])[:, None], atol=1e-4)
    brighter = replace(p, sh=p.sh * 1.5)
    assert torch.allclose(r.frames(brighter)[0][:3, S // 2, S // 2],
                          torch.tensor([0.75, 0.75, 0.375]), atol=1e-4)


def test_uv_tiles_face_left_half_head_right_half(face_model):
    tex = np.zeros((8, 16, 3), np.uint8)
    tex[:, :8, 0] = 255  # tile 0 (face): red
    tex[:, 8:, 2] = 255  # tile 1 (head and neck): blue
    r = ConditioningRenderer(face_model, tex, S, "cpu")
    rot = np.asarray([[0, 0, 0], [0, np.pi, 0]], np.float32)  # front, back
    p = _params(face_model, 2, rotation=rot)
    f = r.frames(p)
    m = r.masks(p)[:, 0] > 0
    assert f[0, 0, S // 2, S // 2] > 0.9 and f[0, 2, S // 2, S // 2] == 0  # nose: face
    back = f[1][:, m[1]]
    assert (back[2] > 0.9).float().mean() > 0.9 and f[1, 2, S // 2, S // 2] > 0.9  # head


def test_directional_light_shades_the_lit_side(face_model, renderer):
    sh = (ambient_sh(0.2) + directional_sh([-1.0, 0.0, -0.3], 1.0))[None]  # from image left
    p = _params(face_model, 1, sh=sh.astype(np.float32))
    f = renderer.frames(p)[0]
    m = renderer.masks(p)[0, 0] > 0
    left = f[0][:, : S // 2][m[:, : S // 2]].mean()
    right = f[0][:, S // 2:][m[:, S // 2:]].mean()
    assert left > right + 0.1


def test_correspondence_sticks_to_the_surface(face_model, renderer):
    """The nose tip keeps its correspondence colour when the head turns and moves."""
    nose = face_model.neutral[face_model.landmark_68[30]]
    rot = np.asarray([[0, 0, 0], [0.1, 0.35, 0.05]], np.float32)
    tr = np.asarray([[0, -1, 50], [2, 0, 55]], np.float32)
    p = _params(face_model, 2, rotation=rot, translation=tr)
    f = renderer.frames(p)
    lo, hi = renderer.mean_box
    want = torch.tensor((nose - lo) / (hi - lo), dtype=torch.float32)
    f_px, cx, cy = Camera.of(p).scaled_to(S)
    for k in range(2):
        angle = np.linalg.norm(rot[k])
        from tracker.rotation import axis_angle_to_matrix
        r = axis_angle_to_matrix(torch.from_numpy(rot[k])).numpy()
        x = r @ nose + tr[k]
        j, i = int(f_px * x[0] / x[2] + cx), int(f_px * x[1] / x[2] + cy)
        assert torch.allclose(f[k, 3:6, i, j], want, atol=0.03), angle


def _pupil_centre(frame):
    g = frame[6:9]
    pupil = (g[0] > 0.9) & (g[1] < 0.1) & (g[2] < 0.1)
    ii, jj = torch.nonzero(pupil, as_tuple=True)
    return pupil.sum().item(), float(jj.float().mean()), float(ii.float().mean())


def test_gaze_map_has_eyes_and_pupils_that_move_with_gaze(face_model):
    r = ConditioningRenderer(face_model, None, 128, "cpu")
    gaze = np.zeros((3, 2, 2), np.float32)
    gaze[1, :, 0] = 0.35  # yaw toward the subject's left: image right
    gaze[2, :, 1] = 0.3  # pitch up
    expr = np.zeros((3, 53), np.float32)
    expr[:, face_model.eyelook_indices] = gaze_to_eyelook(gaze)
    p = _params(face_model, 3, 128, gaze=gaze, expression=expr)
    f = r.frames(p)
    g = f[:, 6:9]
    white = (g > 0.99).all(1)
    assert white[0].sum() > 20  # sclera visible
    assert (g[0].sum(0) > 0).float().mean() < 0.05  # gaze map only on the eyes
    n0, u0, v0 = _pupil_centre(f[0])
    n1, u1, _ = _pupil_centre(f[1])
    n2, _, v2 = _pupil_centre(f[2])
    assert n0 > 4 and n1 > 4 and n2 > 4
    assert u1 > u0 + 1.0  # moved right
    assert v2 < v0 - 0.5  # moved up
    # the correspondence image barely changes with gaze away from the eyes (eyeLook
    # blendshapes move the lids)
    assert (f[0, 3:6, 90:] - f[1, 3:6, 90:]).abs().max() < 0.02


def test_closed_eyes_hide_the_gaze_map(face_model, renderer):
    expr = np.zeros((2, 53), np.float32)
    expr[1, face_model.expression_index("eyeBlink_L")] = 1.0
    expr[1, face_model.expression_index("eyeBlink_R")] = 1.0
    f = renderer.frames(_params(face_model, 2, expression=expr))
    assert f[1, 6:9].sum() < 0.1 * f[0, 6:9].sum()


def test_batched_equals_one_by_one_and_indices(face_model):
    r = ConditioningRenderer(face_model, None, S, "cpu", batch=2)
    rng = np.random.default_rng(1)
    p = _params(face_model, 5, rotation=rng.uniform(-0.3, 0.3, (5, 3)).astype(np.float32))
    all_frames = r.frames(p)
    for i in range(5):
        assert torch.equal(r.frames(p, [i])[0], all_frames[i])
    assert torch.equal(r.frames(p, np.array([4, 1])), all_frames[[4, 1]])
    assert torch.equal(r.masks(p, [3]), r.render(p).masks[[3]])


def test_dense_and_sparse_pixel_paths_agree(face_model, renderer):
    p = _params(face_model, 2, rotation=np.asarray([[0, 0.3, 0], [0.2, 0, 0]], np.float32))
    cam = Camera.of(p)
    args = (p.identity, p.expression, p.rotation, p.translation, p.gaze, cam)
    sh = torch.from_numpy(p.sh)
    sparse = renderer.shade(renderer.surface(*args, dense=False), sh)
    dense = renderer.shade(renderer.surface(*args, dense=True), sh)
    assert torch.allclose(sparse.frames, dense.frames, atol=1e-6)
    assert torch.equal(sparse.masks, dense.masks)


def test_window_follows_the_timestamp_rule(face_model, renderer):
    ts = np.asarray([0, 1, 2, 5, 6], np.float32) / 25.0  # frames 3 and 4 dropped
    rot = np.zeros((5, 3), np.float32)
    rot[:, 1] = np.linspace(0, 0.4, 5)
    p = _params(face_model, 5, rotation=rot, timestamps=ts)
    w = renderer.window(p, 4, 25.0, n_w=5)
    assert w.shape == (45, S, S) and w.dtype == torch.float32
    idx = window_indices(ts, 4, 25.0, 5)
    assert idx.tolist() == [2, 2, 2, 3, 4]  # instants 2..6 periods
    assert torch.equal(w, stack_window(renderer.frames(p), idx))
    first = renderer.window(p, 0, 25.0, n_w=3)
    assert torch.equal(first, renderer.frames(p, [0])[0].repeat(3, 1, 1))


def test_live_window_matches_window_indices():
    live = LiveWindow(fps=10.0, n_w=4)
    ts = [0.0, 0.1, 0.2, 0.45, 0.5, 0.61]
    frames = [torch.full((9, 2, 2), float(k)) for k in range(len(ts))]
    for k, t in enumerate(ts):
        w = live.push(t, frames[k])
        idx = window_indices(np.asarray(ts[:k + 1]), k, 10.0, 4)
        assert torch.equal(w, torch.cat([frames[i] for i in idx])), k
    assert live.push(0.61, frames[0])[-9:].eq(0).all()  # an equal timestamp: the newest wins


def test_live_window_restarts_and_keeps_only_what_it_needs():
    live = LiveWindow(fps=10.0, n_w=3)
    for i, t in enumerate([0.0, 0.1, 0.3]):
        live.push(t, torch.full((9, 2, 2), float(i)))
    # instants 0.1, 0.2, 0.3 -> frames at 0.1, 0.1 (0.2 was never there), 0.3
    assert live.window()[::9, 0, 0].tolist() == [1.0, 1.0, 2.0]
    live.push(0.05, torch.full((9, 2, 2), 7.0))  # time went back: a new stream
    assert len(live) == 1
    assert live.window()[::9, 0, 0].tolist() == [7.0, 7.0, 7.0]
    for i in range(200):
        live.push(1.0 + i / 10.0, torch.zeros(9, 2, 2))
    assert len(live) <= 4  # only what the window can still use is kept
    for _ in range(200):
        live.push(50.0, torch.zeros(9, 2, 2))
    assert len(live) == LiveWindow.MAX_FRAMES  # a bound whatever the timestamps do
    with pytest.raises(RendererError, match="fps > 0"):
        LiveWindow(fps=0.0)


def test_non_finite_or_behind_camera_frames_are_background(face_model, renderer):
    p = _params(face_model, 3)
    rot = p.rotation.copy()
    rot[1, 0] = np.nan
    sh = p.sh.copy()
    sh[2, 3, 1] = np.inf
    out = renderer.render_arrays(p.identity, p.expression, rot, p.translation, sh, p.gaze,
                                 Camera.of(p))
    assert out.masks[0].sum() > 0
    assert (out.frames[1:] == 0).all() and (out.masks[1:] == 0).all()
    behind = _params(face_model, 1, translation=np.asarray([[0, 0, -50]], np.float32))
    assert (renderer.frames(behind) == 0).all()
    with pytest.raises(ParamsError, match="holds NaN"):
        _params(face_model, 1, rotation=np.full((1, 3), np.nan, np.float32))


def test_empty_region_list_gives_background(face_model):
    r = ConditioningRenderer(face_model, None, 32, "cpu", regions=())
    p = _params(face_model, 2, size=32)
    assert (r.frames(p) == 0).all() and (r.masks(p) == 0).all()


def test_bad_sizes_and_textures_are_named(face_model):
    with pytest.raises(RendererError, match="render size must be positive, got 0"):
        ConditioningRenderer(face_model, None, 0, "cpu")
    with pytest.raises(RendererError, match=r"albedo texture must be \(A, 2A, 3\)"):
        ConditioningRenderer(face_model, np.zeros((8, 8, 3)), S, "cpu")
    with pytest.raises(RendererError, match="unknown mesh region 'hair'"):
        ConditioningRenderer(face_model, None, S, "cpu", regions=("hair",))
    r = ConditioningRenderer(face_model, None, 16, "cpu")
    p = _params(face_model, 1, size=16, image_size=np.asarray([0, 0]))
    with pytest.raises(RendererError, match="image_size must be positive, got 0 x 0"):
        r.frames(p)
    with pytest.raises(IndexError):
        r.frames(_params(face_model, 1, size=16), [3])


def test_non_square_camera_fits_the_whole_image(face_model):
    cam = Camera(focal=500.0, cx=320.0, cy=240.0, height=480, width=640)
    f, cx, cy = cam.scaled_to(64)
    assert f == pytest.approx(50.0) and cx == pytest.approx(32.0) and cy == pytest.approx(32.0)
