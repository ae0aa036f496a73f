"""The reference rasterizer on hand-made triangles: ids, barycentrics, depth, conventions."""

import numpy as np
import pytest
import torch

from renderer.raster_ref import Raster, RasterError, rasterize_reference


def _screen(*tris_uvz):
    """[1, 3k, 3] screen vertices and [k, 3] triangles from k triangles' (u, v, z) corners."""
    verts = torch.tensor([c for tri in tris_uvz for c in tri], dtype=torch.float32)[None]
    tris = torch.arange(verts.shape[1]).reshape(-1, 3)
    return verts, tris


def _inside_centres(corners, h, w):
    """Pixels whose centre lies strictly inside the 2D triangle (float64 analytic test)."""
    ii, jj = np.mgrid[0:h, 0:w]
    x, y = jj + 0.5, ii + 0.5
    (a, b, c) = [np.asarray(p[:2], np.float64) for p in corners]

    def cross(p, q):
        return (q[0] - p[0]) * (y - p[1]) - (q[1] - p[1]) * (x - p[0])

    e = np.stack([cross(b, c), cross(c, a), cross(a, b)])
    return (e > 1e-9).all(0) | (e < -1e-9).all(0), (np.abs(e) <= 1e-9).any(0)


FRONT = ((1.0, 1.0, 10.0), (1.0, 7.0, 10.0), (7.0, 1.0, 10.0))  # area2 < 0: front face


def test_front_triangle_covers_its_pixel_centres_with_id_bary_depth():
    verts, tris = _screen(FRONT)
    r = rasterize_reference(verts, tris, 8, 8)
    assert isinstance(r, Raster)
    assert r.triangle.shape == (1, 8, 8) and r.triangle.dtype == torch.int32
    assert r.bary.shape == (1, 8, 8, 3) and r.depth.shape == (1, 8, 8)
    inside, on_edge = _inside_centres(FRONT, 8, 8)
    covered = r.triangle[0].numpy() == 0
    assert (covered[inside]).all()
    assert not covered[~inside & ~on_edge].any()
    # the hypotenuse u + v = 8 passes through pixel centres: they are covered (inclusive)
    assert covered[1, 6] and covered[6, 1]
    # pixel (row 1, col 1) at (1.5, 1.5): weights of a=(1,1), b=(1,7), c=(7,1)
    assert torch.allclose(r.bary[0, 1, 1], torch.tensor([5 / 6, 1 / 12, 1 / 12]), atol=1e-6)
    assert torch.allclose(r.depth[0][r.triangle[0] == 0], torch.tensor(10.0))


def test_empty_pixels_hold_minus_one_zero_bary_zero_depth():
    verts, tris = _screen(FRONT)
    r = rasterize_reference(verts, tris, 8, 8)
    empty = r.triangle[0] == -1
    assert empty[0, 0] and empty[7, 7]
    assert (r.bary[0][empty] == 0).all() and (r.depth[0][empty] == 0).all()
    assert (r.mask[0] == ~empty).all()


def test_back_faces_are_culled_unless_asked():
    back = (FRONT[0], FRONT[2], FRONT[1])  # reversed winding
    verts, tris = _screen(back)
    assert (rasterize_reference(verts, tris, 8, 8).triangle == -1).all()
    both = rasterize_reference(verts, tris, 8, 8, cull_back=False)
    front = rasterize_reference(*_screen(FRONT), 8, 8)
    assert torch.equal(both.triangle, front.triangle)
    # barycentrics follow the triangle's own vertex order (b and c swapped)
    assert torch.allclose(both.bary[0, 1, 1], torch.tensor([5 / 6, 1 / 12, 1 / 12]), atol=1e-6)


def test_nearer_triangle_wins_in_either_order_and_ties_go_to_the_lower_id():
    far = tuple((u, v, 20.0) for u, v, _ in FRONT)
    near = tuple((u, v, 10.0) for u, v, _ in FRONT)
    for order, nearest in (((far, near), 1), ((near, far), 0)):
        r = rasterize_reference(*_screen(*order), 8, 8)
        assert set(r.triangle[0].unique().tolist()) == {-1, nearest}
        assert torch.allclose(r.depth[0][r.triangle[0] >= 0], torch.tensor(10.0))
    r = rasterize_reference(*_screen(near, near), 8, 8)
    assert set(r.triangle[0].unique().tolist()) == {-1, 0}


def test_shared_edge_through_pixel_centres_leaves_no_cracks():
    # a square 0..8 split along its diagonal; both halves front-facing, sharing vertex ids
    verts = torch.tensor([[[0.0, 0.0, 5.0], [0.0, 8.0, 5.0], [8.0, 8.0, 5.0],
                           [8.0, 0.0, 5.0]]])
    tris = torch.tensor([[0, 1, 2], [0, 2, 3]])
    r = rasterize_reference(verts, tris, 8, 8)
    assert (r.triangle[0] >= 0).all()  # every pixel centre of the square is covered
    ii, jj = np.mgrid[0:8, 0:8]
    below = ii > jj  # left-lower half belongs to triangle 0
    assert (r.triangle[0].numpy()[below] == 0).all()
    assert (r.triangle[0].numpy()[ii < jj] == 1).all()
    # centres exactly on the diagonal: equal depth, the lower id wins
    assert (r.triangle[0].numpy()[ii == jj] == 0).all()


def test_barycentrics_are_perspective_correct():
    f, c = 80.0, 32.0
    cam = np.array([[-3.0, -2.0, 20.0], [-1.0, 4.0, 40.0], [4.0, -1.0, 30.0]])
    if np.dot(np.cross(cam[1] - cam[0], cam[2] - cam[0]), cam[0]) > 0:  # make it face us
        cam = cam[[0, 2, 1]]
    uvz = np.stack([f * cam[:, 0] / cam[:, 2] + c, f * cam[:, 1] / cam[:, 2] + c, cam[:, 2]], 1)
    r = rasterize_reference(torch.tensor(uvz, dtype=torch.float32)[None],
                            torch.tensor([[0, 1, 2]]), 64, 64)
    hit = r.triangle[0] == 0
    assert hit.sum() > 100
    ii, jj = torch.nonzero(hit, as_tuple=True)
    p = (r.bary[0][hit].double() @ torch.tensor(cam))  # camera-space surface points
    u = f * p[:, 0] / p[:, 2] + c
    v = f * p[:, 1] / p[:, 2] + c
    assert torch.allclose(u, jj.double() + 0.5, atol=1e-3)
    assert torch.allclose(v, ii.double() + 0.5, atol=1e-3)
    assert torch.allclose(r.depth[0][hit].double(), p[:, 2], rtol=1e-5)
    assert torch.allclose(r.bary[0][hit].sum(-1), torch.tensor(1.0), atol=1e-5)


def test_near_plane_and_non_finite_vertices_drop_the_triangle():
    behind = ((1.0, 1.0, 10.0), (1.0, 7.0, -1.0), (7.0, 1.0, 10.0))
    nan = ((1.0, 1.0, 10.0), (1.0, float("nan"), 10.0), (7.0, 1.0, 10.0))
    inf = ((1.0, 1.0, 10.0), (1.0, float("inf"), 10.0), (7.0, 1.0, 10.0))
    for tri in (behind, nan, inf):
        assert (rasterize_reference(*_screen(tri), 8, 8).triangle == -1).all()


def test_huge_coordinates_are_clipped_to_the_image_quickly():
    huge = ((-1e30, -1e30, 10.0), (-1e30, 1e30, 10.0), (1e30, -1e30, 10.0))
    r = rasterize_reference(*_screen(huge), 16, 16)
    assert r.triangle.shape == (1, 16, 16)


def test_batch_equals_frames_one_by_one():
    verts, tris = _screen(FRONT, ((2.0, 2.0, 5.0), (2.0, 6.0, 6.0), (6.0, 3.0, 7.0)))
    moved = verts + torch.tensor([1.0, 0.5, 0.0])
    batch = rasterize_reference(torch.cat([verts, moved]), tris, 8, 8)
    for k, one in enumerate((verts, moved)):
        single = rasterize_reference(one, tris, 8, 8)
        assert torch.equal(batch.triangle[k], single.triangle[0])
        assert torch.equal(batch.bary[k], single.bary[0])


def test_no_triangles_or_no_frames_give_background():
    verts, _ = _screen(FRONT)
    r = rasterize_reference(verts, torch.zeros((0, 3), dtype=torch.int64), 4, 6)
    assert r.triangle.shape == (1, 4, 6) and (r.triangle == -1).all()
    r = rasterize_reference(verts[:0], torch.tensor([[0, 1, 2]]), 4, 6)
    assert r.triangle.shape == (0, 4, 6)


@pytest.mark.parametrize("args, message", [
    ((torch.zeros(1, 3, 2), torch.tensor([[0, 1, 2]]), 4, 4),
     "screen vertices must be [B, V, 3] (u, v, z), got [1, 3, 2]"),
    ((torch.zeros(1, 3, 3, dtype=torch.float64), torch.tensor([[0, 1, 2]]), 4, 4),
     "screen vertices must be float32, got torch.float64"),
    ((torch.zeros(1, 3, 3), torch.tensor([0, 1, 2]), 4, 4), "triangles must be [F, 3], got [3]"),
    ((torch.zeros(1, 3, 3), torch.tensor([[0.0, 1.0, 2.0]]), 4, 4),
     "triangles must be int32 or int64, got torch.float32"),
    ((torch.zeros(1, 3, 3), torch.tensor([[0, 1, 2]]), 0, 4),
     "image size must be positive, got 0 x 4"),
    ((torch.zeros(1, 3, 3), torch.tensor([[0, 1, 3]]), 4, 4),
     "triangle vertex ids must lie in 0..2, got 0..3"),
    ((torch.zeros(1, 3, 3), torch.tensor([[0, -1, 2]]), 4, 4),
     "triangle vertex ids must lie in 0..2, got -1..2"),
])
def test_bad_inputs_are_named(args, message):
    with pytest.raises(RasterError) as err:
        rasterize_reference(*args)
    assert str(err.value) == message
